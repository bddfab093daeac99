"""Shared by the bf16 and fp8 layout-parity tests: train a tiny model one step under each layout
and under one process in the same precision, and measure how far apart they are."""
from dataclasses import replace
from pathlib import Path

from plait.ir.dsl import load_model
from plait.ir.job import Precision
from plait.ir.plan import Layout
from plait.runtime.harness.parity import Case, Setup, parity_worker, reference, spawn_cases
from plait.runtime.harness.parity_compare import assemble

MODELS = Path(__file__).resolve().parents[2] / "specs" / "models"
VS_FP32 = "single vs fp32"
SINGLE = Case("single", Layout())


def layout_errors(name: str, cases: list[Case], tmp, precision: Precision, steps: int = 2) -> dict:
    """{case: {"loss": rel. error, "grads": {param: rel. error}, dtypes}} of each layout against
    one process in ``precision``, and (VS_FP32) that process against the fp32 reference module
    (step-0 gradients; ``steps`` steps are trained, the parameters' dtypes recorded)."""
    setup = Setup(load_model(MODELS / f"{name}.plait"), global_batch=4, seq=32, steps=steps,
                  precision=precision)
    records = spawn_cases(parity_worker, [SINGLE] + cases, str(tmp), setup)
    ref_grads = assemble(records["single"], "grads")
    ref_loss = records["single"][0]["loss"]
    fp32 = reference(replace(setup, precision=None))  # the fp32 reference module, torch AdamW
    out = {VS_FP32: diff(ref_loss, ref_grads, [fp32["loss"]], fp32["grads"])}
    for case in cases:
        grads = assemble(records[case.name], "grads")
        out[case.name] = diff([r["loss"] for r in records[case.name]], grads, ref_loss, ref_grads)
        out[case.name]["param_dtypes"] = {p.dtype for p in assemble(records[case.name], "params").values()}
    return out


def diff(losses, grads: dict, ref_loss, ref_grads: dict) -> dict:
    """Relative loss error and per-tensor relative gradient errors (norm-wise)."""
    losses = losses if isinstance(losses, list) else [losses]
    ref_loss = ref_loss[0] if isinstance(ref_loss, list) else ref_loss
    assert set(grads) == set(ref_grads)
    rel = {n: ((grads[n].double() - ref_grads[n].double()).norm()
               / ref_grads[n].double().norm().clamp_min(1e-30)).item() for n in ref_grads}
    return {"loss": max(abs(l - ref_loss) / ref_loss for l in losses), "grads": rel,
            "grad_dtypes": {g.dtype for g in grads.values()}}
