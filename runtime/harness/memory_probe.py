"""Memory truth: what the real runtime holds on each rank, by tensor class, to check the planner's
memory terms against (tests/runtime/test_memory_truth.py, benchmarks/memory_truth.py).

  weights, grads          the rank's parameters and their gradients (local shards under FSDP)
  master, master_grads    ZeRO-1's flat fp32 shards the optimizer steps, and their gradients
  moments                 Adam's exp_avg and exp_avg_sq
  saved                   bytes autograd keeps for backward per micro-batch (every tensor packed by
                          torch.autograd.graph.saved_tensors_hooks, each storage once, parameters
                          excluded, FSDP's gathered ones too: it frees them after forward); measured on one micro-batch, so no storage is freed and
                          reused while the forward packs
  live                    bytes of the forward's tensors still alive when backward starts (pp = 1):
                          sees recompute's stash too, which the hooks above cannot
  gathered                FSDP only: the most bytes of gathered (unsharded) weights and of their
                          not yet reduce-scattered gradients alive at once during one step's
                          forward and backward, sampled after every op

The runtime decides nothing here: it trains one step of the plan it is given and reports.
"""
from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from plait.ir.plan import Layout, ParallelPlan, even_stages

from .parity import Case, spawn_cases
from ..mesh import build_mesh, destroy, init_distributed
from ..train import Trainer

TIMEOUT_S = 120


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if t is not None)


def saved_bytes(trainer: Trainer, step: int = 0) -> int:
    """Bytes autograd keeps for backward during one step (forward + backward), each storage once,
    parameters and their shards excluded."""
    params = {_local(p).untyped_storage().data_ptr() for p in trainer.dp.named.values()}
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor):
        base = t if t._base is None else t._base
        if base.is_leaf and base.requires_grad:  # a weight or a view of one (FSDP's gathered
            return t                               # weights: freed after forward)
        storage = _local(t).untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.dp.zero_grad()
        trainer.forward_backward(step)
    return total[0]


class _Outputs(TorchDispatchMode):
    """Weak references to every tensor an op returns (to see which are still alive later)."""

    def __init__(self):
        super().__init__()
        self.refs: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def live_after_forward(trainer: Trainer, step: int = 0) -> int:
    """Bytes of tensors made during one micro-batch's forward (pp = 1: the whole model) that are
    still alive when backward starts, each storage once, weights excluded. Unlike the saved-tensor
    hooks this also sees what torch.utils.checkpoint stashes (recompute's inputs, selective
    recompute's kept outputs); it also counts the loss and the stage output."""
    if trainer.plan.layout.pp != 1:
        raise ValueError("live_after_forward runs the single stage of a pp = 1 plan")
    params = {_local(p).untyped_storage().data_ptr() for p in trainer.dp.named.values()}
    batch = trainer.loader.local_batch(step)
    stage, loss_fn = trainer.program.stage(0), trainer.program.loss
    trainer.dp.zero_grad()
    mode = _Outputs()
    with mode:
        loss = loss_fn(stage(batch.tokens), batch.labels)
    # FSDP's stage root keeps its own weights (the final norm) gathered from forward to backward:
    # weights too (the memory model's FSDP buffer), not activations; the units are sharded again
    params |= {_local(p).untyped_storage().data_ptr() for p in stage.parameters()}
    seen: set[int] = set()
    total = 0
    for ref in mode.refs:
        t = ref()
        if t is None or (t.is_leaf and t.requires_grad):
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in params or storage.data_ptr() in seen or not storage.nbytes():
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    loss.backward()
    return total


class _Gathered(TorchDispatchMode):
    """After every op: the bytes of FSDP's gathered weights (unsharded parameters and all-gather
    outputs not yet copied out: a prefetch in flight) and unsharded gradients (on the parameters
    and in reduce-scatter input buffers) alive now, each storage once; keeps the peak."""

    def __init__(self, groups):
        super().__init__()
        self.groups, self.peak = groups, 0
        self.ctxs = list({id(g.comm_ctx): g.comm_ctx for g in groups}.values())

    def _tensors(self):
        for group in self.groups:
            if group._all_gather_result is not None:
                yield group._all_gather_result.all_gather_output
            for fp in group.fsdp_params:
                param = getattr(fp, "_unsharded_param", None)
                yield param
                yield getattr(param, "grad", None)
                yield getattr(fp, "unsharded_accumulated_grad", None)
        for ctx in self.ctxs:  # (attributes set at FSDP's lazy init, on the first forward)
            if getattr(ctx, "all_gather_state", None) is not None:
                yield ctx.all_gather_state.all_gather_result.all_gather_output
            yield from (state.reduce_scatter_input for state in getattr(ctx, "reduce_scatter_states", ()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen: set[int] = set()
        total = 0
        for t in self._tensors():
            if t is None:
                continue
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        self.peak = max(self.peak, total)
        return out


def gathered_bytes(trainer: Trainer, step: int = 0) -> int | None:
    """FSDP: peak bytes of gathered weights plus unsharded gradients during one step's forward
    and backward (None under other data-parallel kinds)."""
    from torch.distributed.fsdp import fully_shard

    if trainer.plan.layout.dp_kind != "fsdp":
        return None
    groups = [g for stage in trainer.dp.units for m in stage
              for g in fully_shard.state(m)._fsdp_param_groups]
    mode = _Gathered(groups)
    trainer.dp.zero_grad()
    with mode:
        trainer.forward_backward(step)
    return mode.peak


def state_bytes(trainer: Trainer) -> dict[str, int]:
    """Per tensor class after a full step (gradients still in place): the tensors the data-parallel
    wrapper holds; a tensor whose storage an earlier class already holds costs nothing more (a
    ZeRO-1 master gradient that is a view of the fp32 gradient buffer)."""
    earlier: set[int] = set()
    out = {}
    for cls, tensors in trainer.dp.state_tensors().items():
        tensors = [_local(t) for t in tensors if t is not None]
        out[cls] = _bytes(t for t in tensors if t.untyped_storage().data_ptr() not in earlier)
        earlier |= {t.untyped_storage().data_ptr() for t in tensors}
    return out


def probe(trainer: Trainer) -> dict:
    """One step of saved-tensor accounting, then a full step (reduce, clip, AdamW) for the state."""
    live = live_after_forward(trainer) if trainer.plan.layout.pp == 1 else None
    gathered = gathered_bytes(trainer)
    saved = saved_bytes(trainer)
    trainer.dp.finish_step()
    return {"saved": saved, "live": live, "gathered": gathered, **state_bytes(trainer),
            "micro_batches": trainer.plan.num_microbatches}


def probe_plan(job, layout: Layout) -> ParallelPlan:
    """One micro-batch per step (global batch = dp * mbs), even stages."""
    return ParallelPlan(job=job.name, model=job.model.name, cluster=job.cluster.name,
                        world=layout.world, layout=layout,
                        stages=even_stages(job.model.num_layers, layout.pp, layout.vpp,
                                           recompute=layout.recompute),
                        global_batch=layout.dp * layout.mbs, seq_len=job.seq_len)


def _worker(rank: int, world: int, job, cases: list[Case], out_dir: str) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", TIMEOUT_S, f"file://{out_dir}/rendezvous", rank, world)
    try:
        for case in cases:
            plan = probe_plan(job, case.layout)
            mesh = build_mesh(plan.layout, TIMEOUT_S)
            trainer = Trainer(job, plan, mesh)
            torch.save(probe(trainer), Path(out_dir) / f"{case.name}.rank{rank}.pt")
    finally:
        destroy()


def measure(job, layouts: dict[str, Layout], out_dir: str | None = None) -> dict[str, list[dict]]:
    """{case name: [per-rank measurements]}; one process spawn per world size."""
    cases = [Case(name, lay) for name, lay in layouts.items()]
    return spawn_cases(_worker, cases, out_dir, job)
