"""Text from a trained model, as a sanity check of what was trained: `plait generate`.

Two sources: a Hugging Face model directory (config.json, *.safetensors, its tokenizer when it
ships one) or a plait run directory (job.json; the newest checkpoint under its --save, or the one
given; the tokenizer of the run's dataset). The model is plait's reference module on one CPU /
GPU; decoding is greedy or nucleus (top-p) sampling, recomputing the whole window each token (no
KV cache: this is a check, not a server).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from plait.ir.cluster import local_cpu
from plait.ir.errors import PlaitError
from plait.ir.job import TrainJob
from plait.ir.plan import Layout
from plait.ir.serde import from_json
from plait.lowering.build import build_model

from . import data as data_mod


@torch.no_grad()
def sample(model: torch.nn.Module, ids: list[int], new_tokens: int, top_p: Optional[float] = None,
           temperature: float = 1.0, seed: int = 0, window: Optional[int] = None) -> list[int]:
    """``ids`` followed by ``new_tokens`` tokens: the most likely each time (top_p None), else
    drawn from the smallest set of tokens whose probability reaches ``top_p``."""
    generator = torch.Generator().manual_seed(seed)
    out = list(ids)
    for _ in range(new_tokens):
        context = torch.tensor([out[-window:] if window else out])
        logits = model(context)[0, -1].float()
        out.append(int(logits.argmax()) if top_p is None else
                   _nucleus(logits / temperature, top_p, generator))
    return out


def _nucleus(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> int:
    probs, order = torch.softmax(logits, -1).sort(descending=True)
    keep = probs.cumsum(0) - probs < top_p  # the first token is always kept
    probs = probs * keep
    return int(order[torch.multinomial(probs / probs.sum(), 1, generator=generator)])


def from_hf_dir(path: Path) -> tuple[torch.nn.Module, data_mod.Tokenizer]:
    from plait.ir.hf import model_from_hf_file
    from plait.lowering.weights import load_hf_weights

    spec = model_from_hf_file(str(path / "config.json"))
    model = build_model(spec)
    load_hf_weights(model, str(path), spec)
    tokenizer = (data_mod.get_tokenizer(str(path)) if (path / "tokenizer.json").is_file()
                 or (path / "tokenizer_config.json").is_file() else data_mod.ByteTokenizer())
    return model.eval(), tokenizer


def run_checkpoint(run_dir: Path, checkpoint: Optional[str]) -> str:
    """The checkpoint to read: the one given, else the newest under the run's --save."""
    from .checkpoint import find

    if checkpoint:
        return str(find(checkpoint))
    options = json.loads((run_dir / "options.json").read_text())
    if not options.get("save"):
        raise PlaitError(f"run {run_dir} saved no checkpoints (it ran without --save)",
                         hint="pass --checkpoint DIR, or train with --save DIR")
    return str(find(options["save"]))


def from_run_dir(run_dir: Path, checkpoint: Optional[str]) -> tuple[torch.nn.Module, data_mod.Tokenizer]:
    """The run's model with a checkpoint's weights, read by a one-rank Trainer (the checkpoint
    module decides which layouts it can read) and copied into the reference module."""
    from .launch import hand_plan
    from .mesh import build_mesh, destroy, init_distributed
    from .train import Trainer
    from . import checkpoint as ckpt_mod

    run_job = from_json(TrainJob, (run_dir / "job.json").read_text())
    where = run_checkpoint(run_dir, checkpoint)
    job = replace(run_job, cluster=local_cpu(1),  # weights only: no dataset read
                  data=replace(run_job.data, synthetic=True, path=None, val_every=0))
    plan = hand_plan(job, Layout())  # checkpoints hold global tensors: any plan reads them
    with tempfile.TemporaryDirectory(prefix="plait-generate-") as tmp:
        init_distributed("gloo", 300, f"file://{tmp}/rdzv", 0, 1)
        try:
            trainer = Trainer(job, plan, build_mesh(plan.layout, 300))
            ckpt_mod.load(trainer, where)
            model = build_model(job.model, seed=job.seed)
            _copy_parameters(trainer.program.local_parameters(), model)
        finally:
            destroy()
    return model.eval(), _run_tokenizer(run_job)


def _copy_parameters(trained: dict, model: torch.nn.Module) -> None:
    missing = [n for n, _ in model.named_parameters() if n not in trained]
    if missing:
        raise PlaitError(f"the checkpoint did not provide {len(missing)} parameters of the model "
                         f"(first: {missing[0]!r})")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(trained[name])


def _run_tokenizer(job: TrainJob) -> data_mod.Tokenizer:
    """The tokenizer of the dataset the run trained on (byte for the bundled corpus)."""
    meta = Path(job.data.path) / data_mod.META if job.data.path else None
    if meta is None or not meta.is_file():
        return data_mod.ByteTokenizer()
    return data_mod.get_tokenizer(json.loads(meta.read_text()).get("tokenizer", "byte"))
