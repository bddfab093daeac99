"""Per-unit cost tables and the pipeline schedule: what one micro-batch costs on each stage, how
many micro-batches each rank holds, the bubble, and the step time.

Step time (1F1B and Megatron's interleaved schedule, Narayanan et al.):

    step = (m + (pp - 1) / vpp) * t_max + exposed data-parallel sync + optimizer step

with t_max the busiest rank's forward + backward time of one micro-batch over all its chunks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

from plait.ir import counts
from plait.ir import kinds as block_kinds  # `kinds` names a unit's layer kinds below
from plait.ir.job import TrainJob
from plait.ir.plan import RECOMPUTE, Layout, Stage
from plait.ir.precision import PrecisionPolicy

from . import comm, compute, memory
from .context import Context, layer_kinds

OPTIONS = RECOMPUTE  # ("none", "selective", "full"): index 0, 1, 2 in every per-option tuple


@dataclass(frozen=True)
class UnitCost:
    """One pipeline unit (e.g. [attention, moe]) for one micro-batch on one rank."""

    kinds: tuple[str, ...]
    fwd: float  # forward seconds incl. exposed communication
    bwd: tuple[float, float, float]  # backward seconds per recompute option, incl. the recompute
    act: tuple[float, float, float]  # stored activation bytes per in-flight micro-batch
    transient: tuple[float, float, float]  # bytes alive only while this unit runs its backward
    dense_params: float
    expert_params: float
    comm: tuple[tuple[str, float], ...]  # exposed seconds per kind, forward + backward, no recompute
    recompute_comm: tuple[tuple[str, float], ...]  # what a full recompute repeats
    flops: float  # forward FLOPs per micro-batch on this rank
    fp32_params: float = 0.0  # of dense_params, those a bf16 / fp8 model keeps in fp32
    # FSDP seconds this unit's own compute hides of its forward gather and its gradient
    # reduce-scatter: exposed when it opens (gather) or closes (scatter) a chunk (CostTable)
    fsdp_edge: float = 0.0

    def time(self, option: int) -> float:
        return self.fwd + self.bwd[option]


@dataclass(frozen=True)
class Extra:
    """Embedding (first stage) or final norm + head + loss (last stage)."""

    time: float  # forward + backward per micro-batch
    params: float
    buffer: float  # bytes alive per micro-batch (logits)
    comm: tuple[tuple[str, float], ...] = ()


def _add(acc: dict, items) -> dict:
    for k, v in items:
        acc[k] = acc.get(k, 0.0) + v
    return acc


def block_comm(ctx: Context, kind: str, work: compute.Work) -> tuple[dict, dict]:
    """(forward exposed seconds per group, backward exposed seconds per group) of one layer of
    ``kind`` whose forward work is ``work`` (its cost facet's ``comm``)."""
    return block_kinds.facet(kind, "cost").comm(ctx, work)


def host_seconds(ctx: Context, kinds: tuple[str, ...]) -> tuple[float, float]:
    """(forward, backward) host seconds of a unit's blocks: the measured forward + backward of
    each kind (host_us_KIND), a third of it forward, else kernel_us per block and pass, plus what
    context parallelism's replacement ops and a layer's experts add (the cost facet's cp_host,
    experts_host); under FSDP also what FSDP2 itself spends around the unit's collectives
    (fsdp_host_seconds)."""
    fwd = bwd = 0.0
    for kind in kinds:
        total = getattr(ctx.cal, f"host_us_{kind}", 0.0) * 1e-6
        if total <= 0:
            total = 3 * ctx.cal.kernel_us * 1e-6
        facet = block_kinds.facet(kind, "cost")
        total += facet.cp_host(ctx) + facet.experts_host(ctx)
        fwd, bwd = fwd + total / 3, bwd + 2 * total / 3
    fsdp = fsdp_host_seconds(ctx)
    return fwd + fsdp / 3, bwd + 2 * fsdp / 3


def fsdp_host_seconds(ctx: Context) -> float:
    """Host seconds FSDP2 spends per unit and micro-batch beyond its three collectives (hooks,
    copy-in / copy-out, the gradients' chunk-cat, DTensor wrapping: fsdp_host_us, measured by
    `plait calibrate`, runtime/calibrate_fsdp.py); a third of it around the forward's gather, the
    rest around the backward's gather and scatter. 0 without FSDP or unmeasured."""
    return ctx.cal.fsdp_host_us * 1e-6 if ctx.layout.dp_kind == "fsdp" else 0.0


def tied_on_one_stage(ctx: Context) -> bool:
    """The head shares the embedding's weight on the same stage: FSDP's root holds both
    (runtime/fsdp.py stage_units)."""
    return ctx.model.tie_embeddings and ctx.layout.pp == 1


def with_host(ctx: Context, device_s: float, host_s: float) -> float:
    """Seconds of work that keeps the device busy ``device_s`` and its host ``host_s``: their sum
    where the host runs the kernels itself (host_sync, CPU), else the longer of the two."""
    return device_s + host_s if ctx.cal.host_sync >= 0.5 else max(device_s, host_s)


def build_unit(ctx: Context, kinds: tuple[str, ...],
               bf16_linears: tuple[bool, ...] = ()) -> UnitCost:
    """``bf16_linears[i]``: layer i of the unit keeps bf16 linears in an fp8 job (its ends)."""
    fwd_c = bwd_c = sel = fwd_t = bwd_t = flops = 0.0
    fwd_comm: dict = {}
    bwd_comm: dict = {}
    act_none = act_sel = transient_sel = 0.0
    dense = expert = fp32_kept = 0.0
    bf16_ctx = ctx.with_bf16_linears() if any(bf16_linears) else ctx
    for i, kind in enumerate(kinds):
        work = compute.block_work(bf16_ctx if bf16_linears and bf16_linears[i] else ctx, kind)
        f, b = block_comm(ctx, kind, work)
        _add(fwd_comm, f.items()), _add(bwd_comm, b.items())
        fwd_c, bwd_c, sel, flops = (fwd_c + work.forward, bwd_c + work.backward,
                                    sel + work.selective, flops + work.flops)
        a_none, a_sel = memory.block_activations(ctx, kind)
        act_none, act_sel = act_none + a_none, act_sel + a_sel
        transient_sel = max(transient_sel, a_none - a_sel)
        d, e = memory.block_params_on_rank(ctx, kind)
        dense, expert = dense + d, expert + e
        fp32_kept += memory.block_fp32_kept_on_rank(ctx, kind)
    host_f, host_b = host_seconds(ctx, kinds)
    fwd_c, bwd_c = with_host(ctx, fwd_c, host_f), with_host(ctx, bwd_c, host_b)
    # the backward's window leaves out a full recompute's re-forward, which the prefetch model
    # would let hide the gathers too: kept out because measured stacks overlap FSDP traffic less
    # than that model (benchmarks/fidelity.py, physics-only column: FSDP rows too fast)
    fsdp_f, fsdp_b, edge = fsdp_exposed(ctx, *comm.fsdp_unit(ctx, dense, expert), fwd_c, bwd_c)
    if fsdp_f or fsdp_b:
        _add(fwd_comm, [("dp", fsdp_f)]), _add(bwd_comm, [("dp", fsdp_b)])
    fwd_t = fwd_c + sum(fwd_comm.values())
    bwd_t = bwd_c + sum(bwd_comm.values())
    refwd = fwd_t - fsdp_f  # a recomputed forward reuses the weights gathered for backward
    total_comm = _add(dict(fwd_comm), bwd_comm.items())
    return UnitCost(
        kinds=kinds, fwd=fwd_t, bwd=(bwd_t, bwd_t + sel, bwd_t + refwd),
        act=(act_none, act_sel, len(kinds) * memory.unit_input(ctx)),
        transient=(0.0, transient_sel, act_none),
        dense_params=dense, expert_params=expert,
        comm=tuple(sorted(total_comm.items())),
        recompute_comm=tuple(sorted((k, v) for k, v in fwd_comm.items() if k != "dp")),
        flops=flops, fp32_params=fp32_kept, fsdp_edge=edge)


def fsdp_exposed(ctx: Context, gather: float, scatter: float, fwd: float,
                 bwd: float) -> tuple[float, float, float]:
    """(forward, backward) exposed seconds of one unit's FSDP ``gather`` and gradient ``scatter``
    beside its ``fwd`` / ``bwd`` compute seconds, and ``edge``: what that compute hid of the
    forward gather and the gradient scatter (exposed where nothing precedes or follows the unit:
    CostTable.chunk_time). Forward: the gather hides behind the forward (comm.hidden). Backward:
    the gather again, then the gradients' scatter, one after the other on the links: each runs
    beside the share of the backward compute its length takes."""
    hid_fwd = comm.hidden(ctx, "fsdp", gather, fwd)
    moved = gather + scatter
    share = bwd / moved if moved > 0 else 0.0
    hid_gather = comm.hidden(ctx, "fsdp", gather, share * gather)
    hid_scatter = comm.hidden(ctx, "fsdp", scatter, share * scatter)
    return gather - hid_fwd, moved - hid_gather - hid_scatter, hid_fwd + hid_scatter


def ends_fsdp(ctx: Context, params: float, work: compute.Work) -> tuple[float, float, float]:
    """fsdp_exposed of the embedding's or the head's FSDP traffic beside its own compute."""
    return fsdp_exposed(ctx, *comm.fsdp_unit(ctx, params, 0.0), work.forward, work.backward)


@lru_cache(maxsize=16)  # a function of the job alone, asked by every CostTable of a search
def _unit_keys(job: TrainJob, unit_kinds) -> tuple[tuple[tuple[str, ...], tuple[bool, ...]], ...]:
    """(kinds, which of its layers keep bf16 linears) per unit: the fp8 recipe's bf16 ends cost
    what they run (bf16 GEMMs); in other jobs the flags are all False."""
    policy = PrecisionPolicy.of(job)
    keys, layer = [], 0
    for kinds in unit_kinds:
        flags = tuple(policy.kind == "fp8" and policy.gemm_precision(layer + i) == "bf16"
                      for i in range(len(kinds)))
        keys.append((kinds, flags if any(flags) else ()))
        layer += len(kinds)
    return tuple(keys)


class CostTable:
    """Everything the stage partitioner and the evaluator need for one (job, layout)."""

    def __init__(self, job: TrainJob, layout: Layout, unit_kinds: tuple[tuple[str, ...], ...]):
        self.job, self.layout = job, layout
        self.ctx = ctx = Context(job, layout)
        self._vpp_twins: dict = {layout.vpp: self}  # vpp -> with_vpp's table (the search asks often)
        keys = _unit_keys(job, unit_kinds)
        built = {k: build_unit(ctx, *k) for k in dict.fromkeys(keys)}
        # one object per distinct cost (a bf16-end unit costs as much as an fp8 one where the
        # device has no faster fp8): the partitioners index unit types by identity
        canonical: dict = {}
        distinct = {k: canonical.setdefault(u, u) for k, u in built.items()}
        self.units: tuple[UnitCost, ...] = tuple(distinct[k] for k in keys)
        # the distinct costs in order of first use (equal costs are one object: no hashing)
        self.distinct_units = tuple({id(u): u for u in self.units}.values())
        self.unit_index, offset = {}, 0  # first layer of a unit -> its index
        for i, kinds in enumerate(unit_kinds):
            self.unit_index[offset] = i
            offset += len(kinds)
        self.unit_index[offset] = len(unit_kinds)
        self.homogeneous = len(canonical) == 1
        self.first = self._embedding()
        self.last = self._head()
        self.p2p = comm.pp_exchange(ctx)  # activations forward, gradients backward, per chunk
        self.fsdp_edge = max(u.fsdp_edge for u in self.units)
        # per chunk and micro-batch: the stage send / receive, and FSDP's first gather and last
        # reduce-scatter, which no compute of the chunk hides (PyTorch's FSDP notes: "the 1st
        # all-gather will not be able to overlap with anything"; the gradients of the chunk's
        # first unit are complete only at the end of its backward, and NCCL runs one
        # collective at a time, so the next forward's gather waits for that scatter)
        self.chunk_time = self.p2p + self.fsdp_edge
        self.capacity = job.cluster.device.memory
        self.microbatches = ctx.microbatches
        self.buffers = memory.comm_buffers(ctx, layer_kinds(job.model))

    def _embedding(self) -> Extra:
        ctx = self.ctx
        work = compute.embedding_work(ctx)
        tp = comm.reduce_scatter(ctx, ctx.group("dense", "tp"),
                                 ctx.tokens * ctx.model.hidden * ctx.act_bytes)
        params = memory.embedding_params_on_rank(ctx)
        # FSDP shards the embedding as a unit of its own (runtime/fsdp.py): the step's first
        # gather and its last gradient scatter, with nothing before or after to hide them. Tied
        # to the head on one stage it stays with the stage, FSDP's root (see _head): gathered
        # once per micro-batch
        if tied_on_one_stage(ctx):
            fsdp, units = sum(comm.fsdp_unit(ctx, params, 0.0)), 0
        else:
            fsdp, units = sum(ends_fsdp(ctx, params, work)), 1
        busy = with_host(ctx, work.forward + work.backward, units * fsdp_host_seconds(ctx))
        return Extra(time=busy + 2 * tp + fsdp, params=params,
                     buffer=0.0, comm=(("dp", fsdp), ("tp", 2 * tp)))

    def _head(self) -> Extra:
        ctx = self.ctx
        work = compute.head_work(ctx)
        tp = comm.all_gather(ctx, ctx.group("dense", "tp"),
                             ctx.tokens * ctx.model.hidden * ctx.act_bytes) if ctx.layout.sp else 0.0
        # the SP gather forward and its scatter back, and the loss's two all-reduces
        tp = 2 * tp + comm.vocab_loss_comm(ctx)
        params = memory.head_params_on_rank(ctx)
        norm = counts.final_norm_params(ctx.model)
        # under FSDP the head is a unit of its own and the final norm stays with the stage, FSDP's
        # root (runtime/fsdp.py shard_stage): gathered once per micro-batch, kept from forward
        # to backward, its gradients scattered at the end of the backward, nothing beside either
        exposed_f, exposed_b, _ = ends_fsdp(ctx, params - norm, work)
        root = sum(comm.fsdp_unit(ctx, norm, 0.0))
        fsdp = exposed_f + exposed_b + root
        units = 1 if tied_on_one_stage(ctx) else 2  # the root, and the head's own unit
        busy = with_host(ctx, work.forward + work.backward, units * fsdp_host_seconds(ctx))
        return Extra(time=busy + tp + fsdp, params=params,
                     buffer=memory.logits_buffer(ctx), comm=(("dp", fsdp), ("tp", tp)))

    def with_vpp(self, vpp: int) -> "CostTable":
        """The same table under another virtual-pipeline size (unit costs do not depend on it);
        one per vpp, shared by every table of the family."""
        other = self._vpp_twins.get(vpp)
        if other is None:
            other = copy.copy(self)
            other.layout = replace(self.layout, vpp=vpp)
            other.__dict__.pop("schedule_factor", None)
            # the schedule's sends depend on vpp (comm.pp_exchange: 1F1B's fused exchanges)
            other.p2p = comm.pp_exchange(Context(self.job, other.layout))
            other.chunk_time = other.p2p + other.fsdp_edge
            self._vpp_twins[vpp] = other
        return other

    def units_of(self, stage) -> tuple[UnitCost, ...]:
        """The units of a Stage (whose first/last count layers) — stages cut at unit boundaries."""
        try:
            return self.units[self.unit_index[stage.first]:self.unit_index[stage.last]]
        except KeyError:
            raise ValueError(f"stage [{stage.first}, {stage.last}) does not cut the model at unit "
                             "boundaries") from None

    def layer_of(self, unit: int) -> int:
        """First layer of unit ``unit`` (``len(units)`` gives the number of layers)."""
        return self._layer_of[unit]

    @cached_property
    def _layer_of(self) -> dict:
        return {i: layer for layer, i in self.unit_index.items()}

    @property
    def chunks(self) -> int:
        return self.layout.pp * self.layout.vpp

    @cached_property
    def schedule_factor(self) -> float:
        """Step time in units of the busiest rank's per-micro-batch time: m + (pp - 1) / vpp."""
        return self.microbatches + (self.layout.pp - 1) / self.layout.vpp

    def inflight(self, rank: int) -> float:
        lay = self.layout
        return memory.inflight(lay.pp, lay.vpp, self.microbatches, rank)

    def buffer_bytes(self, rank: int) -> float:
        """Buffers on ``rank`` that do not depend on the partition: comm buffers, the largest FSDP
        gather, logits on the last rank."""
        out = self.buffers + self.fsdp_buffer
        return out + (self.last.buffer if rank == self.layout.pp - 1 else 0.0)

    @cached_property
    def fsdp_buffer(self) -> float:
        """FSDP's gathered units and unsharded gradients at their peak, over the whole model's
        unit sequence (embedding, units, head): a bound for any stage's window."""
        layers = [u.dense_params + u.expert_params for u in self.units]
        ends = memory.embedding_params_on_rank(self.ctx), memory.head_params_on_rank(self.ctx)
        return memory.fsdp_buffers(self.ctx, [ends[0], *layers, ends[1]])

    @property
    def reserve_fixed(self) -> float:
        return self.ctx.cal.reserve_gib * memory.GiB

    @property
    def fragmentation(self) -> float:
        return self.ctx.cal.fragmentation

    def static_bytes(self, dense: float, expert: float, fp32_kept: float = 0.0) -> float:
        s = memory.state_bytes(self.ctx, dense, expert, fp32_kept)
        return s["weights"] + s["grads"] + s["optimizer"]

    def unit_static(self, u: UnitCost) -> float:
        return self.static_bytes(u.dense_params, u.expert_params, u.fp32_params)


def even_sizes(n: int, chunks: int) -> tuple[int, ...]:
    """``n`` units in ``chunks`` contiguous chunks, the first ones taking the remainder."""
    base, extra = divmod(n, chunks)
    return tuple(base + (1 if c < extra else 0) for c in range(chunks))


def stages_of(table: CostTable, sizes, options) -> tuple[Stage, ...]:
    """Stages (layer ranges, chunk c on rank c mod pp) of a partition given in units per chunk."""
    pp, out, unit = table.layout.pp, [], 0
    for c, (size, o) in enumerate(zip(sizes, options)):
        out.append(Stage(pp_rank=c % pp, virtual=c // pp, first=table.layer_of(unit),
                         last=table.layer_of(unit + size), recompute=OPTIONS[o]))
        unit += size
    return tuple(out)

