"""`plait export hf CKPT -o DIR`: a training checkpoint (any layout) as a Hugging Face model.

    DIR/config.json                          the family's config (ir/hf_write.py, checked by re-import)
    DIR/model-0000k-of-0000N.safetensors     weights in the family's hub names and the chosen dtype
    DIR/model.safetensors.index.json         tensor -> shard file
    DIR/tokenizer*                           when the run's dataset was tokenized by an HF tokenizer

The checkpoint is verified against its manifest first; tensors are read one at a time from their
global chunks (ckpt_store.Reader), so the export never holds more than one shard in memory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from plait.ir.errors import PlaitError
from plait.ir.hf_write import hf_config, infer_family
from plait.ir.model import ModelSpec
from plait.ir.outputs import output_kind
from plait.ir.serde import from_dict
from plait.lowering.weight_names import export_recipe, kept_in_fp32, split_recipe

from .ckpt_chunks import chunks
from .ckpt_integrity import find, read_meta, verify
from .ckpt_store import Reader

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 << 30  # transformers' default max_shard_size


def checkpoint_tensors(reader: Reader, kinds: tuple[str, ...] = ("model", "buffer")):
    """(reference name, global tensor) of every model parameter and persistent buffer (``kinds``),
    one at a time from the checkpoint's chunks."""
    for key in reader.tensors:
        kind, _, name = key.partition("/")
        if kind not in kinds:
            continue
        info = reader.tensors[key]
        full = torch.empty(info["shape"], dtype=getattr(torch, info["dtype"]))
        reader.fill(key, full, chunks(tuple(info["shape"])))
        yield name, full


def hf_tensors(named, spec: ModelSpec, family: str, dtype: torch.dtype):
    """(hf name, tensor) for every (reference name, tensor) of ``named``, in ``dtype`` but for
    the tensors the family keeps in fp32 (the routers of DeepSeek-V3 and Nemotron-H)."""
    for name, full in named:
        for hf_name, t in split_recipe(export_recipe(family, spec, name), full).items():
            kept = torch.promote_types(dtype, torch.float32) if kept_in_fp32(family, hf_name) else dtype
            yield hf_name, t.to(kept).contiguous()


def _write_shards(out: Path, tensors, max_bytes: int) -> dict[str, str]:
    """Greedy shards of at most ``max_bytes`` (a larger tensor gets its own); returns the weight
    map (hf name -> file)."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current:
        shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return weight_map


def _tokenizer(meta: dict, out: Path) -> Optional[str]:
    """Save the run's HF tokenizer beside the weights (None for the byte tokenizer / synthetic)."""
    name = (meta.get("job_fields", {}).get("dataset") or {}).get("tokenizer")
    if not name or name in ("byte", "bytes"):
        return None
    from .data import get_tokenizer

    get_tokenizer(name).hf.save_pretrained(str(out))
    return name


def _source(path: Path):
    """(spec, named tensors, step, metadata) of a training checkpoint, or of a `plait prune` run
    directory (its pruned student: model.plait and the distilled, else the sliced, weights)."""
    if (path / PRUNE_SPEC).is_file() and output_kind(path) == PRUNE_KIND:
        from plait.ir.dsl import load_model
        from plait.lowering.prune.checkpoint import read_weights

        spec = load_model(str(path / PRUNE_SPEC))
        weights = next((path / w for w in PRUNE_WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise PlaitError(f"prune run {path} has no weights yet ({' or '.join(PRUNE_WEIGHTS)})",
                             hint="finish the run with `plait prune JOB`")
        return spec, read_weights(spec, weights).items(), None, {}
    where = find(path)
    meta = read_meta(where)
    verify(where)
    return from_dict(ModelSpec, meta["model"]), checkpoint_tensors(Reader(where)), meta["step"], meta


PRUNE_KIND, PRUNE_SPEC = "prune run", "model.plait"
PRUNE_WEIGHTS = ("distilled.safetensors", "model.safetensors")


def export_hf(ckpt: str | Path, out: str | Path, dtype: str = "bf16", family: Optional[str] = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write the checkpoint (or prune run) at ``ckpt`` as a Hugging Face model directory ``out``;
    returns a summary (family, step, files, tensors, tokenizer)."""
    if dtype not in DTYPES:
        raise PlaitError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    spec, named, step, meta = _source(Path(ckpt))
    family = family or infer_family(spec)
    config = hf_config(spec, family, str(DTYPES[dtype]).removeprefix("torch."))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = _write_shards(out, hf_tensors(named, spec, family, DTYPES[dtype]), max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"family": family, "step": step, "tensors": len(weight_map),
            "files": sorted(set(weight_map.values())), "tokenizer": _tokenizer(meta, out)}
