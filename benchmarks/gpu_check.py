"""The GPU path in one command: tiny-dense and a ~1B Llama (and tiny-hybrid when mamba-ssm imports)
trained in bf16 and fp8 with the fused kernels `plait doctor` reports, on 1 GPU and, when 2+ are
visible, under TP2 and DP2 over NCCL, plus tiny-dense in fp8 under TP2 + SP (whole-tensor fp8
scales over TP) and under CP2 (the ring with SDPA's flash kernel per chunk pair). One table per run:

  loss vs CPU fp32   largest relative gap of the first steps' losses to the fp32 reference module
                     trained on the CPU on the same batches (bf16: <= 2e-2, fp8: <= 5e-2)
  tokens/s, MFU      measured (mean of the timed steps; MFU over the bf16 peak, as the planner's)
                     next to the cost model's prediction for the same job, layout and device
  peak GiB           torch.cuda.max_memory_allocated next to the plan's predicted peak
  kernels            what kernels.bind put into the compiled program

    .venv/bin/python benchmarks/gpu_check.py            # on a CUDA machine (< 8 minutes on an H100)
    .venv/bin/python benchmarks/gpu_check.py --dry-run  # the same code on the CPU: tiny-dense, gloo

Exit status 1 when a loss check fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from plait.ir import counts
from plait.ir.cluster import Cluster, local_cpu
from plait.ir.dsl import load_file, load_model, parse_text
from plait.ir.job import Data, Optimizer, Precision, TrainJob
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.lowering.build import build_model
from plait.planner.cost.evaluate import evaluate
from plait.planner.cost.pipeline import CostTable
from plait.planner.layouts import units
from plait.runtime import data as data_mod
from plait.runtime import device as device_mod
from plait.runtime import kernels
from plait.runtime.data import BatchLoader
from plait.runtime.mesh import build_mesh, destroy, init_distributed
from plait.runtime.train import ReferenceTrainer, Trainer

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
LLAMA_1B = """
model "llama-1b" {
  vocab = 128256, hidden = 2048, tie_embeddings = true
  attention { heads = 32, kv_heads = 8, head_dim = 64, rope = rope(theta = 500000) }
  mlp { ffn = 8192 }
  layers = 16 * [attention, mlp]
}
"""
TOLERANCE = {"bf16": 2e-2, "fp8": 5e-2}
OPTIMIZER = Optimizer(lr=3e-4, min_lr=3e-5, warmup=2)


@dataclass(frozen=True)
class Case:
    model: str
    precision: str
    layout: Layout
    seq: int
    steps: int
    check: int  # first steps compared with the CPU fp32 reference

    @property
    def name(self) -> str:
        return f"{self.model} {self.precision} {self.layout.short()}"


def model_spec(name: str):
    if name == "llama-1b":
        return parse_text(LLAMA_1B).models["llama-1b"]
    return load_model(ROOT / "specs" / "models" / f"{name}.plait")


def precision(kind: str, spec) -> Precision:
    ends = min(4, (spec.num_layers - 1) // 2)  # Nemotron-H's 4, fewer on the tiny models
    return Precision("fp8", "tensorwise", ends, ends) if kind == "fp8" else Precision(kind)


def cluster(world: int, dry: bool) -> Cluster:
    if dry or not torch.cuda.is_available():
        return local_cpu(world)
    name = torch.cuda.get_device_name(0).lower()
    file = "h200-sxm-141gb" if "h200" in name else "a100-sxm4-80gb" if "a100" in name else "h100-sxm5-80gb"
    device = next(iter(load_file(str(ROOT / "specs" / "devices" / f"{file}.plait")).devices.values()))
    return dataclasses.replace(local_cpu(world), name="this-machine", device=device, backend="nccl")


def job_of(case: Case, world: int, dry: bool, data: str) -> TrainJob:
    spec = model_spec(case.model)
    return TrainJob(name="gpu-check", model=spec, cluster=cluster(world, dry),
                    global_batch=case.layout.dp * case.layout.mbs, seq_len=case.seq,
                    precision=precision(case.precision, spec), optimizer=OPTIMIZER, steps=case.steps,
                    data=Data(path=data), seed=0)


def plan_of(job: TrainJob, layout: Layout) -> ParallelPlan:
    return ParallelPlan(job=job.name, model=job.model.name, cluster=job.cluster.name,
                        world=layout.world, layout=layout,
                        stages=even_stages(job.model.num_layers, layout.pp, layout.vpp),
                        global_batch=job.global_batch, seq_len=job.seq_len)


def cpu_reference(job: TrainJob, steps: int) -> list[float]:
    """Losses of the fp32 reference module on the CPU for the first ``steps`` batches."""
    model = build_model(job.model, dtype=torch.float32, seed=job.seed)
    trainer = ReferenceTrainer(model, job.optimizer)
    loader = BatchLoader(data_mod.open_source(job.data.path, job.model.vocab), job.seq_len,
                         job.global_batch, job.data.seed)
    losses = []
    for step in range(steps):
        batch = loader.local_batch(step)
        losses.append(float(trainer.forward_backward(batch.tokens, batch.labels)))
        trainer.step(step, job.steps)
    return losses


def run_case(case: Case, world: int, rank: int, dry: bool, data: str) -> dict:
    job = job_of(case, world, dry, data)
    plan = plan_of(job, case.layout)
    placement = device_mod.activate(device_mod.choose(job.cluster.backend, rank))
    if placement.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(job, plan, build_mesh(plan.layout, TIMEOUT_S, device=placement.device))
    logs = trainer.fit(case.steps)
    timed = logs[max(case.check, len(logs) // 2):] or logs[-1:]
    tokens_s = sum(l.tokens_per_s for l in timed) / len(timed)
    pred = evaluate(CostTable(job, case.layout, units(job.model)), plan.stages)
    flops = tokens_s * counts.flops_per_token(job.model, job.seq_len)
    return {"losses": [l.loss for l in logs[:case.check]], "tokens_s": tokens_s,
            "mfu": flops / (world * job.cluster.device.peak_flops("bf16")),
            "pred_tokens_s": pred.tokens_per_s, "pred_mfu": pred.mfu,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if placement.is_cuda else None,
            "pred_gib": pred.peak_memory / 2**30, "kernels": sorted(set(trainer.kernels.values()))}


def worker(rank: int, world: int, cases: list[Case], dry: bool, data: str, out: str) -> None:
    backend = "nccl" if torch.cuda.is_available() and not dry else "gloo"
    init_distributed(backend, TIMEOUT_S, f"file://{out}/rendezvous-{world}", rank, world)
    try:
        results = {c.name: run_case(c, world, rank, dry, data) for c in cases}
    finally:
        destroy()
    if rank == 0:
        Path(out, f"world{world}.json").write_text(json.dumps(results))


def cases_for(world: int, dry: bool) -> list[Case]:
    if dry:  # the CPU: tiny-dense only, a few steps
        one = [Case("tiny-dense", p, Layout(mbs=4), 64, 4, 2) for p in ("bf16", "fp8")]
        return one if world == 1 else [Case("tiny-dense", "bf16", lay, 64, 3, 2)
                                       for lay in (Layout(tp=2, sp=True, mbs=4), Layout(dp=2, mbs=2))
                                       ] + sharded_kernel_cases(64, 3, 2)
    models = [("tiny-dense", 4, 256), ("llama-1b", 2, 2048)]
    if kernels.probe("mamba-ssm")[0] is not None:
        models.append(("tiny-hybrid", 4, 256))
    if world == 1:
        return [Case(m, p, Layout(mbs=mbs), seq, 30, 3) for m, mbs, seq in models for p in ("bf16", "fp8")]
    return [Case(m, "bf16", lay, seq, 20, 3) for m, mbs, seq in models[:2]
            for lay in (Layout(tp=2, sp=True, mbs=mbs), Layout(dp=2, mbs=mbs))] + sharded_kernel_cases(256, 20, 3)


def sharded_kernel_cases(seq: int, steps: int, check: int) -> list[Case]:
    """On 2 ranks: fp8 under TP2 + SP (the fp8 backend with whole-tensor scales over the TP
    group) and the context-parallel ring (SDPA's flash backend per chunk pair on CUDA)."""
    return [Case("tiny-dense", "fp8", Layout(tp=2, sp=True, mbs=4), seq, steps, check),
            Case("tiny-dense", "bf16", Layout(cp=2, mbs=4), seq, steps, check)]


def report(results: dict, refs: dict) -> tuple[Table, bool]:
    t = Table(title="GPU check: measured next to the cost model")
    for col in ("case", "loss vs CPU fp32", "tokens/s (model)", "MFU (model)", "peak GiB (model)",
                "kernels"):
        t.add_column(col)
    ok = True
    for name, r in results.items():
        model, kind = name.split()[:2]
        ref = refs[name]
        gap = max(abs(a - b) / b for a, b in zip(r["losses"], ref))
        good = gap <= TOLERANCE[kind]
        ok &= good
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        t.add_row(name, f"{gap:.2e} {'ok' if good else 'FAIL'}",
                  f"{r['tokens_s']:,.0f} ({r['pred_tokens_s']:,.0f})",
                  f"{r['mfu']:.1%} ({r['pred_mfu']:.1%})", f"{peak} ({r['pred_gib']:.2f})",
                  ", ".join(r["kernels"]))
    return t, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU (gloo), tiny-dense only")
    args = parser.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    worlds = [1, 2] if dry or torch.cuda.device_count() >= 2 else [1]
    results, refs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "corpus")
        data_mod.prepare([data_mod.bundled_corpus()], data)
        for world in worlds:
            cases = cases_for(world, dry)
            mp.spawn(worker, args=(world, cases, dry, data, tmp), nprocs=world, join=True)
            results.update(json.loads(Path(tmp, f"world{world}.json").read_text()))
            for case in cases:  # the CPU fp32 reference on the same global batches
                refs[case.name] = cpu_reference(dataclasses.replace(
                    job_of(case, world, True, data), precision=Precision("fp32")), case.check)
    table, ok = report(results, refs)
    Console(width=200).print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
