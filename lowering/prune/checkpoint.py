"""Read, check and write model weights as safetensors in the reference model's names.

A prune job's ``weights`` may be plait's own checkpoint (reference names, e.g. written by
``save_weights`` or a previous prune) or a Hugging Face checkpoint directory (config.json beside
the safetensors; names mapped by lowering/weights.py). Whatever the source, the tensors are checked
against the model spec — every name present, every shape right — with the numbers in the error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from plait.ir.errors import PlaitError
from plait.ir.model import ModelSpec


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the reference model's state dict (built on the meta device)."""
    from plait.lowering.build import build_model

    with torch.device("meta"):
        model = build_model(spec, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_weights(spec: ModelSpec, state: Mapping[str, torch.Tensor], where: str = "the weights") -> None:
    expected = expected_shapes(spec)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [(k, tuple(state[k].shape), s) for k, s in expected.items() if k in state and tuple(state[k].shape) != s]
    if not (missing or unexpected or wrong):
        return
    lines = []
    if wrong:
        lines += [f"{k}: {where} have {got}, model {spec.name!r} needs {need}" for k, got, need in wrong[:4]]
    if missing:
        lines.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    summary = f"{len(wrong)} shape mismatches, " if wrong else ""
    raise PlaitError(f"{where} do not match model {spec.name!r}: {summary}" + "; ".join(lines),
                     hint="check that the weights belong to this model spec (hidden, widths, layer count)")


def read_weights(spec: ModelSpec, path: str | Path) -> dict[str, torch.Tensor]:
    """The reference-named state dict of ``spec`` from a safetensors file or directory."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise PlaitError(f"weight file not found: {path}")
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise PlaitError(f"no *.safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    names = set(expected_shapes(spec))
    if not (set(state) & names) and path.is_dir() and (path / "config.json").exists():
        state = _from_hf(spec, path)
    check_weights(spec, state, where=f"the weights in {path}")
    return state


def _from_hf(spec: ModelSpec, path: Path) -> dict[str, torch.Tensor]:
    from plait.lowering.build import build_model
    from plait.lowering.weights import load_hf_weights

    model = build_model(spec)
    load_hf_weights(model, str(path), spec)
    return {k: v.detach() for k, v in model.state_dict().items()}


def save_weights(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
