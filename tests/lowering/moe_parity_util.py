"""The MoE numerics matrix harness: train step 0 of the compiled tiny-moe program on gloo ranks
(the real runtime: mesh, Trainer, pipeline schedule, gradient reductions, clipping, AdamW) and the
single-device reference with the same per-rank semantics.

Reference semantics: every (DP rank, micro-batch) is one call of the reference model, as it is one
call of the MoE layers in the parallel run (its aux loss, its capacity); each rank's tokens of a
call are a capacity segment: under sequence parallelism a TP rank's sequence chunk, under context
parallelism a CP rank's two zigzag chunks (`build_model(capacity_segments=tp*cp, capacity_cp=cp)`). Each
call's loss is back-propagated with its aux losses, then gradients are divided by the number of
calls (the runtime's micro-batch and DP averaging), clipped by their global norm, and AdamW steps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional

import torch

from plait.ir.cluster import local_cpu
from plait.ir.dsl import load_model
from plait.ir.job import Data, MoEOptions, Optimizer, Precision, TrainJob
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.lowering.build import build_model
from plait.runtime.data import BatchLoader, SyntheticTokens
from plait.runtime.moe_balance import bias_blocks, update_expert_biases
from plait.runtime.optim import lr_at
from plait.runtime.parity import assemble
from plait.runtime.train import ReferenceTrainer, Trainer

from moe_dist_util import bind_layout, max_err

SPEC = load_model(__file__.rsplit("/tests/", 1)[0] + "/specs/models/tiny-moe.plait")
# the same model with aux-loss-free balancing: a selection bias updated once per step
BIAS_SPEC = replace(SPEC, moe=replace(SPEC.moe, expert_bias=True))
SEQ = 16
OPTIMIZER = Optimizer(lr=1e-3, min_lr=1e-4, warmup=1, weight_decay=0.1, grad_clip=0.05)


@dataclass(frozen=True)
class MoECase:
    layout: Layout
    moe: Optional[MoEOptions] = None
    micro: int = 1  # micro-batches per DP rank
    steps: int = 1  # > 1: whole training steps (Trainer.train_step), expert-bias updates included
    expert_bias: bool = False  # BIAS_SPEC instead of SPEC
    z_loss: float = 0.0  # > 0: the spec with this router z-loss coefficient too

    @property
    def global_batch(self) -> int:
        return self.layout.dp * self.layout.mbs * self.micro

    @property
    def spec(self):
        spec = BIAS_SPEC if self.expert_bias else SPEC
        return replace(spec, moe=replace(spec.moe, z_loss=self.z_loss)) if self.z_loss else spec

    def job(self) -> TrainJob:
        return TrainJob(name="moe-parity", model=self.spec, cluster=local_cpu(self.layout.world),
                        global_batch=self.global_batch, seq_len=SEQ, precision=Precision("fp32"),
                        optimizer=OPTIMIZER, moe=self.moe or MoEOptions(), steps=self.steps,
                        data=Data(synthetic=True, seed=0))

    def plan(self) -> ParallelPlan:
        lay = self.layout
        return ParallelPlan(job="moe-parity", model=self.spec.name, cluster="local-cpu",
                            world=lay.world, layout=lay,
                            stages=even_stages(self.spec.num_layers, lay.pp, lay.vpp),
                            global_batch=self.global_batch, seq_len=SEQ, moe=self.moe)


def source() -> SyntheticTokens:
    return SyntheticTokens(SPEC.vocab, seed=0)


def expert_biases(modules) -> dict[str, torch.Tensor]:
    """Expert bias of every MoE layer by layer index (module paths differ per program)."""
    out = {}
    for module in modules:
        for path, m in module.named_modules():
            found = re.search(r"layers\.(\d+)\.mixer$", path)
            if found and m in bias_blocks([m]):
                out[int(found.group(1))] = m.expert_bias.detach().clone()
    return out


def run_steps(case: MoECase, mesh) -> dict:
    """``case.steps`` whole training steps (the runtime's step loop, bias updates included)."""
    trainer = Trainer(case.job(), case.plan(), mesh, source=source())
    logs = trainer.fit(case.steps)
    return {"loss": logs[-1].loss, "params": trainer.dp.full_parameters(),
            "biases": expert_biases(trainer.stage_modules), "shards": dict(trainer.program.shards),
            "experts": trainer.program.experts,
            "coords": dict(trainer.program.coords, edp=mesh.coord("edp"))}


def run_rank(rank: int, world: int, cases: dict[str, MoECase]) -> dict:
    out = {}
    for name, case in cases.items():
        mesh = bind_layout(case.layout)
        if case.steps > 1:
            out[name] = run_steps(case, mesh)
            continue
        trainer = Trainer(case.job(), case.plan(), mesh, source=source())
        trainer.dp.zero_grad()
        loss = trainer.forward_backward(0)
        trainer.dp.reduce()
        grads = trainer.dp.reduced_grads()
        trainer.dp.set_lr(lr_at(0, OPTIMIZER, 1))
        trainer.dp.clip_and_step()
        program = trainer.program
        out[name] = {"loss": float(loss), "grads": grads, "params": trainer.dp.full_parameters(),
                     "shards": dict(program.shards), "experts": program.experts,
                     "coords": dict(program.coords, edp=mesh.coord("edp"))}
    return out


def reference(case: MoECase, bias_rate: Optional[float] = None) -> dict:
    """The single-device run of ``case`` (``bias_rate`` overrides the job's expert-bias rate)."""
    lay, moe = case.layout, case.moe
    segments = (lay.tp if lay.sp else 1) * lay.cp
    model = build_model(case.spec, seed=0, moe_options=moe, capacity_segments=segments,
                        capacity_cp=lay.cp)
    trainer = ReferenceTrainer(model, OPTIMIZER)
    rate = case.job().moe.expert_bias_rate if bias_rate is None else bias_rate
    for step in range(case.steps):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, grads = _reference_step(model, case, step)
        trainer.step(step, case.steps)
        update_expert_biases([model], rate)  # one device: its load is the global load
    return {"loss": loss, "grads": grads, "biases": expert_biases([model]),
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _reference_step(model, case: MoECase, step: int) -> tuple[float, dict]:
    """Forward + backward of every (DP rank, micro-batch) call of ``step``; gradients averaged
    over the calls. -> (mean loss, gradients)."""
    lay = case.layout
    calls, losses = lay.dp * case.micro, []
    for d in range(lay.dp):
        batch = BatchLoader(source(), SEQ, case.global_batch, 0, dp_rank=d,
                            dp_size=lay.dp).local_batch(step)
        for tokens, labels in zip(batch.tokens.chunk(case.micro), batch.labels.chunk(case.micro)):
            loss = model(tokens, labels)
            loss.backward()
            losses.append(float(loss.detach()))
    grads = {}
    for n, p in model.named_parameters():
        p.grad /= calls
        grads[n] = p.grad.clone()
    return sum(losses) / calls, grads


def errors(records: list[dict], ref: dict) -> dict[str, float]:
    """Largest error of the loss, of any gradient and of any parameter after the step (relative
    to the tensor's scale when it exceeds 1), with the worst tensor's name."""
    out = {"loss": max(abs(r["loss"] - ref["loss"]) for r in records)}
    for key in ("grads", "params"):
        if key not in records[0]:  # multi-step runs keep no gradients
            continue
        got = assemble(records, key)
        missing = sorted(set(ref[key]) - set(got))
        assert not missing, f"{key} missing from the parallel run: {missing}"
        worst = max(ref[key], key=lambda n: max_err(got[n], ref[key][n]))
        out[key] = max_err(got[worst], ref[key][worst])
        out[f"worst {key}"] = worst
    return out
