"""Checks `plait run` makes before any rank starts, so a wrong input is one message naming the file
and the mismatch instead of a traceback from every rank minutes later:

  - the dataset exists, is non-empty, holds one global batch (plus the validation split), its token
    ids are below the model's vocabulary, its tokenizer is the job's and, with --weights, the
    checkpoint's;
  - --weights holds every tensor the model needs with its full shape;
  - a job names its data: no silent fall back to the bundled byte-level corpus.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


from plait.ir.errors import PlaitError
from plait.ir.job import TrainJob

CHUNK = 1 << 26  # tokens per read while scanning for the largest id


def check_inputs(job: TrainJob, weights: Optional[str], bundled: bool = False) -> None:
    if not (job.data.synthetic or job.data.path or job.data.sources or bundled):
        raise PlaitError(f"job {job.name!r} names no dataset",
                         hint='set data = "DIR" (from `plait data prepare`) or data = synthetic '
                              "in the job, or pass --data DIR; --data bundled trains on the small "
                              "corpus shipped with plait (byte tokens)")
    if job.data.sources:
        check_blend(job)
    elif job.data.path:
        check_dataset(job, weights)
    if weights:
        check_weights(job, weights)


def check_blend(job: TrainJob) -> None:
    """A blend's sources exist, fit the model's vocabulary and keep their epoch caps (building the
    loader checks all three)."""
    from plait.ir.datarecipe import check_sources_exist

    from .data_blend import blended_loader

    check_sources_exist(job)
    loader = blended_loader(job, job.seq_len, job.global_batch)
    check_loss_masks(job, loader.sources)


def check_loss_masks(job: TrainJob, sources) -> None:
    """The SFT objective counts the tokens of the datasets' loss masks: at least one dataset
    must carry one (`plait data prepare --chat`), or every token would count."""
    if job.data.objective != "sft":
        return
    masked = [s for s in sources if getattr(_unwrapped(s), "mask_tokens", None) is not None]
    if not masked:
        raise PlaitError("objective = sft, but no dataset of the job has a loss mask",
                         hint="prepare conversations with `plait data prepare --chat`")


def _unwrapped(source):
    while hasattr(source, "source"):  # validation splits, vocabulary checks
        source = source.source
    return source


def check_dataset(job: TrainJob, weights: Optional[str] = None) -> None:
    from plait.ir.datarecipe import training_windows

    from .data import META, MemmapTokens

    root = Path(job.data.path)
    source = MemmapTokens(root)  # PlaitError when it is missing, empty or its metadata unreadable
    check_loss_masks(job, [source])
    tokens, vocab = source.tokens, job.model.vocab
    windows = source.num_windows(job.seq_len + 1)
    train = training_windows(windows, job.data)
    if train < job.global_batch:
        raise PlaitError(f"dataset {root} holds {len(tokens):,} tokens: {train} training windows "
                         f"of seq_len + 1 = {job.seq_len + 1} tokens, fewer than one global batch "
                         f"of {job.global_batch}", hint="use more text, or a smaller global_batch "
                                                       "or seq_len")
    largest = max(int(tokens[i:i + CHUNK].max()) for i in range(0, len(tokens), CHUNK))
    if largest >= vocab:
        raise PlaitError(f"dataset {root} holds token id {largest}; model {job.model.name!r} has a "
                         f"vocabulary of {vocab} (ids 0..{vocab - 1})",
                         hint="prepare the dataset with the model's tokenizer")
    meta_tok = source.meta.get("tokenizer", "byte")
    if job.data.tokenizer != "byte" and job.data.tokenizer != meta_tok:
        raise PlaitError(f"dataset {root / META} was tokenized with {meta_tok!r}; the job names "
                         f"tokenizer {job.data.tokenizer!r}")
    if weights:
        _tokenizer_matches_weights(root, source.meta, Path(weights))


def _tokenizer_matches_weights(root: Path, meta: dict, weights: Path) -> None:
    """A checkpoint that ships a tokenizer was trained on its ids: the dataset must use it too."""
    folder = weights if weights.is_dir() else weights.parent
    vocab = hf_tokenizer_vocab(folder)
    if vocab is None:
        return
    if meta.get("tokenizer", "byte") == "byte":
        raise PlaitError(f"dataset {root} is byte-tokenized, but --weights {folder} ships its own "
                         f"tokenizer ({vocab} tokens)",
                         hint=f"prepare the data with it: `plait data prepare FILES -o DIR "
                              f"--tokenizer {folder}`")
    if int(meta["vocab"]) != vocab:
        raise PlaitError(f"dataset {root}'s tokenizer {meta['tokenizer']!r} has {meta['vocab']} "
                         f"tokens; the tokenizer of --weights {folder} has {vocab}",
                         hint=f"prepare the data with `--tokenizer {folder}`")


def hf_tokenizer_vocab(folder: Path) -> Optional[int]:
    """Tokens in a Hugging Face tokenizer.json (vocabulary plus added tokens), None without one;
    read as JSON, nothing executed."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        ids = set(spec["model"]["vocab"].values()) if isinstance(spec["model"]["vocab"], dict) \
            else set(range(len(spec["model"]["vocab"])))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlaitError(f"{path} is not a tokenizer.json ({type(e).__name__}: {e})") from None
    ids |= {t["id"] for t in spec.get("added_tokens", [])}
    return len(ids)


def check_weights(job: TrainJob, path: str) -> None:
    """Every tensor the model needs is in the checkpoint with its full shape (read from the
    safetensors headers against the model built on the meta device)."""
    import torch

    from plait.lowering.build import build_model
    from plait.lowering.weights import hf_candidates, model_type_of, open_source, recipe_shape, resolve_recipe

    model_type, source = model_type_of(path), open_source(path)
    with torch.device("meta"):
        model = build_model(job.model, device="meta", seed=job.seed)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for name in dict(model.named_parameters()):
        full = recipe_shape(source, resolve_recipe(source, name, hf_candidates(model_type, job.model, name)))
        if tuple(full) != tuple(expected[name]):
            raise PlaitError(f"--weights {path}: {name!r} is {tuple(full)} in the checkpoint, model "
                             f"{job.model.name!r} needs {tuple(expected[name])}",
                             hint="check that the checkpoint belongs to this model spec")
