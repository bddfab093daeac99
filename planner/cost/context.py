"""What every cost term needs about one (job, layout): device calibration, token counts per rank,
and the shape of each process group on the real topology.

Calibration values live in the device specs (`calibration { key = value }`); the defaults below are
only for devices nobody calibrated (they are physically plausible, not fitted).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
import copy
from functools import cached_property, lru_cache

from plait.ir import kinds
from plait.ir.cluster import Cluster, Device
from plait.ir.job import TrainJob
from plait.ir.model import ModelSpec
from plait.ir.plan import Layout

from ..groups import DENSE_GROUPS, EXPERT_GROUPS, parse_order


# compute runs 18.9% slower beside a collective on average (Lee et al. 2025, arXiv 2507.03114)
OVERLAP_DEFAULT = round(1 / 1.189, 2)


@dataclass(frozen=True)
class Calibration:
    """Efficiencies of one device kind (and the software stack measured on it)."""

    gemm_eff: float = 0.75  # achieved fraction of peak for large, well-shaped GEMMs
    gemm_knee: float = 128.0  # a GEMM dimension d scales efficiency by ~1/(1 + knee/d)
    attn_eff: float = 0.50  # flash-attention core (and SSM scan) fraction of peak, forward
    # the attention core's efficiency falls with the length one kernel call sees:
    # attn_eff / (1 + attn_knee / s) (planner/cost/compute.py attention_eff): per query tile the
    # kernel's prologue / epilogue and the causal diagonal's half-masked tiles are amortised over
    # s / tile key tiles. 0: no length dependence (devices nobody measured)
    attn_knee: float = 0.0
    # backward kernels of the attention core reach this fraction of the forward's rate
    # (FlashAttention-2, Dao 2023: up to 73% of A100 peak forward, 63% backward -> 0.86)
    attn_bwd_ratio: float = 0.86
    scan_eff: float = 0.0  # Mamba2's SSD scan fraction of peak (0: as attn_eff)
    # the scan's backward rate over its forward's (backward = BWD_CORE x forward / ratio); plait's
    # runtime recomputes the scan in backward (ssd_chunked_recomputed): `plait calibrate`
    # measures ~0.65 on CPU. 1: BWD_CORE x the forward, as before it was measured
    scan_bwd_ratio: float = 1.0
    # the eager scan's elementwise work per token and head beyond its products' FLOPs: per chunk
    # position (the [l x l] decay and score matrices) and per token (runtime/calibrate_scan.py
    # fits both with scan_eff); 0: a fused scan, its rate all in scan_eff
    scan_chunk_ns: float = 0.0
    scan_token_ns: float = 0.0
    # 1: the local experts run as one grouped GEMM (Megatron-Core --moe-grouped-gemm, plait's
    # torch._grouped_mm): the GPU fills across experts, each expert's rows padded to a tile;
    # 0: one GEMM per expert (plait's loop fallback), each paying the small-dimension knee
    grouped_gemm: float = 1.0
    gemm_tile: float = 128.0  # rows of a GEMM tile (CUTLASS / cuBLAS bf16 tiles are 128 rows)
    hbm_eff: float = 0.80  # fraction of HBM bandwidth memory-bound kernels reach
    intra_eff: float = 0.80  # fraction of NVLink bandwidth collectives reach
    inter_eff: float = 0.80  # fraction of the network bandwidth collectives reach
    a2a_eff: float = 0.60  # all-to-all relative to a ring collective on the same links (NVLink)
    # the same for the all-to-all's share that crosses the network (0: a2a_eff). `plait
    # calibrate` measures both levels; they differ (NVSwitch vs NICs, PXN routing, RDMA)
    a2a_inter_eff: float = 0.0
    # an all-to-all is one message per peer: each pays the link latency on top of its bytes, so
    # small messages (fine-grained experts, short micro-batches) reach a smaller share of the link
    a2a_peer_latency: float = 1.0  # x the link latency per peer message (1: the spec's latency)
    fsdp_eff: float = 1.0  # per-layer parameter gathers relative to a bucketed collective
    # per collective kind: the fraction of its seconds hidden while it runs beside compute (its
    # own stream / thread, as FSDP prefetches): hidden = overlap_KIND x min(collective, compute).
    # 1: hidden up to the compute's length; 0: the two serialise (one hardware queue, CUDA_DEVICE_
    # MAX_CONNECTIONS=1). `plait calibrate` measures each kind (GEMMs with the collective beside
    # them against each alone). Default, for devices nobody measured: the NCCL kernels share the
    # SMs and HBM with the GEMMs, which run 18.9% slower on average while they overlap (Lee et al.
    # 2025, arXiv 2507.03114: A100 / H100 / MI250 / MI210), so 1 / 1.189 = 0.84 of the overlapped
    # collective is hidden
    overlap_all_gather: float = OVERLAP_DEFAULT
    overlap_reduce_scatter: float = OVERLAP_DEFAULT
    # FSDP2's unit gathers and gradient scatters beside the units' compute, as its prefetching
    # issues them (runtime/calibrate_fsdp.py measures it through fully_shard itself: on the 2-core
    # CPU VM it hides nothing, while a bare all-gather beside GEMMs hides 0.7)
    overlap_fsdp: float = OVERLAP_DEFAULT
    # measured and kept for the schedules that run the token dispatch beside compute (Megatron's
    # overlap_moe_expert_parallel_comm, DualPipe); plait's runtime and the stacks of the reference
    # rows wait for the dispatch (plait/kinds/moe/cost.py dispatch_comm: exposed), so no cost
    # term reads it yet
    overlap_all_to_all: float = OVERLAP_DEFAULT
    # ring context parallelism's K/V send / recv beside the attention core's kernels
    # (plait/kinds/attention/cost.py comm)
    overlap_p2p: float = OVERLAP_DEFAULT
    # a fact of the stack that runs the job: 1, the data-parallel gradient reduction and ZeRO-1's
    # parameter gather run beside the backward / next forward (Megatron-Core --overlap-grad-reduce
    # / --overlap-param-gather, the stack of the reference rows); 0, after the backward with
    # nothing beside them (plait's runtime: runtime/optim.py Replicated and runtime/zero1.py
    # reduce flat buffers once the step's backward is done; `plait calibrate` writes 0)
    dp_sync_overlap: float = 1.0
    # a fact of the stack too: bytes per parameter its optimizer step moves (ir/counts): a fused
    # Adam, 30 (Megatron-Core, the reference rows' stack); plait's runtime, torch's AdamW after a
    # global-norm clip, counts.adamw_path: 40 with torch's fused kernel (the CPU device and
    # `plait calibrate` write it)
    optimizer_bytes: float = 30.0
    # busiest expert rank over the mean as measured on a trained router (per micro-batch and
    # layer); 0: the expected maximum under balanced random routing (routing_imbalance)
    moe_imbalance: float = 0.0
    kernel_us: float = 0.0  # fixed launch cost per block and pass, microseconds
    # host (Python, dispatch, launch) microseconds of one block's forward + backward, per kind,
    # measured by `plait calibrate` on plait's own modules (0: kernel_us x 3 instead)
    host_us_attention: float = 0.0
    host_us_mlp: float = 0.0
    host_us_moe: float = 0.0  # with the two keys below: the MoE block without its experts
    host_us_mamba: float = 0.0
    # a MoE block's host work per local expert (the loop path's linears where torch._grouped_mm
    # does not run; ~0 where it does) and its shared expert's, measured by `plait calibrate`
    # (runtime/calibrate_host.py); 0 with host_us_moe measured whole (files from before them)
    host_us_moe_expert: float = 0.0
    host_us_moe_shared: float = 0.0
    # host microseconds context parallelism adds to one block's forward + backward at cp = 2 (its
    # replacement ops' extra calls beyond their exchanges), per kind with a CP path, measured by
    # `plait calibrate` (runtime/calibrate_cp.py); 0: not measured, nothing charged
    cp_host_us_attention: float = 0.0
    cp_host_us_mamba: float = 0.0
    # host microseconds FSDP2 spends per unit and micro-batch beyond its collectives (hooks, the
    # shards' copy-in and the parameters' copy-out, DTensor wrapping), measured by `plait
    # calibrate` (runtime/calibrate_fsdp.py); 0: not measured, nothing charged
    fsdp_host_us: float = 0.0
    # 1: the host runs the kernels itself (CPU): host time adds to compute. 0: an accelerator
    # runs them asynchronously: a block takes the longer of its device time and its host time
    host_sync: float = 1.0
    # ranks on one host that share its compute (CPU processes on a few cores): this many run at
    # full rate, more divide it. 0: every rank owns its device (GPUs)
    shared_cores: float = 0.0
    # measured collective latencies replacing the cluster spec's (microseconds; 0: the spec's)
    intra_latency_us: float = 0.0
    inter_latency_us: float = 0.0
    # per latency term of one op inside a node, as training pays it (microseconds; 0: the intra
    # latency above). `plait calibrate` measures each between compute slices (runtime/
    # calibrate_insitu.py): on CPU ranks sharing cores a call pays the arrival skew and the
    # wake-ups, so an all-reduce costs 1.3-1.6x an all-gather, not the 2x of its 2 (n-1) terms,
    # and an exchange with the ring neighbours (p2p: the CP ring's K/V, the pipeline's sends)
    # pays its own. reduce_scatter: all_gather's on NCCL, all_reduce's on gloo (comm.py)
    intra_latency_us_all_reduce: float = 0.0
    intra_latency_us_all_gather: float = 0.0
    intra_latency_us_p2p: float = 0.0
    # an all-gather issued right after another collective of its group with only memory-bound
    # work between (sequence parallelism's gather at a block's start follows the last block's
    # reduce-scatter, forward and backward): its peers arrive together, so it pays the latency of
    # back-to-back calls (the in-situ probe's bare variant), not the arrival skew (0: as above)
    intra_latency_us_all_gather_synced: float = 0.0
    # 1: flash attention. 0: the measured stack materialised the s x s scores (SC'21 Megatron-LM:
    # batched GEMMs, fused scale-mask-softmax, attention dropout)
    flash_attention: float = 1.0
    # 1: the attention kernel repeats K/V to every query head before the core and keeps the
    # copies for backward (PyTorch SDPA, plait's fallback); 0: flash attention reads grouped K/V
    kv_expanded: float = 0.0
    reserve_gib: float = 3.0  # CUDA context, NCCL and allocator pools
    fragmentation: float = 0.08  # allocator fragmentation as a fraction of activations

    @staticmethod
    @lru_cache(maxsize=32)  # every Context asks; a device's values are fixed
    def of(device: Device) -> "Calibration":
        known = {f.name for f in fields(Calibration)}
        values = {k: float(v) for k, v in device.calibration if k in known}
        return Calibration(**values)


@dataclass(frozen=True)
class GroupShape:
    """A process group as the topology sees it: ``size`` ranks on ``nodes`` nodes."""

    size: int
    nodes: int

    @property
    def per_node(self) -> int:
        return max(1, self.size // self.nodes)

    @property
    def crosses_nodes(self) -> bool:
        return self.nodes > 1


@lru_cache(maxsize=65536)
def _first_group_shape(sizes: tuple[int, ...], mask: tuple[bool, ...], gpn: int) -> GroupShape:
    """Shape of the group that holds rank 0 (all groups of one kind are translates of it)."""
    strides, acc = [], 1
    for s in sizes:
        strides.append(acc)
        acc *= s
    ranks = [0]
    for size, stride, m in zip(sizes, strides, mask):
        if m and size > 1:
            ranks = [r + i * stride for i in range(size) for r in ranks]
    return GroupShape(size=len(ranks), nodes=len({r // gpn for r in ranks}))


class Context:
    """Derived quantities of one job under one layout; cheap to build, cached per attribute."""

    def __init__(self, job: TrainJob, layout: Layout):
        self.job, self.layout = job, layout
        self.model, self.cluster = job.model, job.cluster
        self.cal = Calibration.of(job.cluster.device)
        self._groups: dict = {}  # (side, name) -> GroupShape: the unit costs ask each many times

    # -- tokens ----------------------------------------------------------------------------------
    @cached_property
    def tokens(self) -> int:
        """Tokens through one rank's GEMMs per micro-batch: mbs * seq_len / cp."""
        return self.layout.mbs * self.job.seq_len // self.layout.cp

    @cached_property
    def tokens_sp(self) -> float:
        """Tokens of the residual stream held per rank (split over tp with sequence parallel)."""
        return self.tokens / self.layout.tp if self.layout.sp else float(self.tokens)

    @cached_property
    def microbatches(self) -> int:
        return self.job.global_batch // (self.layout.dp * self.layout.mbs)

    # -- device ----------------------------------------------------------------------------------
    @cached_property
    def sharing(self) -> float:
        """How many ranks share one rank's compute: ranks on a host over its shared_cores."""
        cores = self.cal.shared_cores
        if cores <= 0:
            return 1.0
        on_host = min(self.layout.world, self.cluster.gpus_per_node)
        return max(1.0, on_host / cores)

    @cached_property
    def peak(self) -> float:
        return self.cluster.device.peak_flops(self.job.precision.kind) / self.sharing

    @cached_property
    def peak_bf16(self) -> float:
        return self.cluster.device.peak_flops("bf16") / self.sharing

    @cached_property
    def hbm(self) -> float:
        """Memory bandwidth one rank's memory-bound kernels see (bytes/s, before hbm_eff)."""
        return self.cluster.device.hbm / self.sharing

    @cached_property
    def peak_high(self) -> float:
        """Peak of the GEMMs that never run in fp8 (ir/precision.py): expert grouped GEMMs, the
        router, attention scores, the LM head: bf16 in an fp8 job, the job's own otherwise."""
        return self.peak_bf16 if self.job.precision.kind == "fp8" else self.peak

    def with_bf16_linears(self) -> "Context":
        """This context for a layer whose linears stay bf16 under fp8 (the BF16-ends rule)."""
        twin = copy.copy(self)
        twin.__dict__["peak"] = self.peak_high
        return twin

    @cached_property
    def act_bytes(self) -> int:
        """Bytes of one activation element (bf16 unless the job trains in fp32)."""
        return 4 if self.job.precision.kind == "fp32" else 2

    # -- groups ----------------------------------------------------------------------------------
    def group(self, side: str, name: str) -> GroupShape:
        """Shape of the dense/expert group ``name`` (keys of DENSE_GROUPS / EXPERT_GROUPS)."""
        shape = self._groups.get((side, name))
        if shape is None:
            shape = self._groups[(side, name)] = self._group_shape(side, name)
        return shape

    def _group_shape(self, side: str, name: str) -> GroupShape:
        dims = (DENSE_GROUPS if side == "dense" else EXPERT_GROUPS)[name]
        lay = self.layout
        if side == "dense":
            size_of = {"tp": lay.tp, "cp": lay.cp, "ep": 1, "dp": lay.dp, "pp": lay.pp}
        else:
            size_of = {"tp": lay.etp, "cp": 1, "ep": lay.ep, "dp": lay.edp, "pp": lay.pp}
        names = parse_order(lay.order)
        return _first_group_shape(tuple(size_of[n] for n in names), tuple(n in dims for n in names),
                                  self.cluster.gpus_per_node)


def layer_kinds(model: ModelSpec) -> tuple[str, ...]:
    """The block kinds the model's layers use, in the registry's order (deterministic sums)."""
    return tuple(k for k in kinds.names() if k in model.layers)


def op_latency(cluster: Cluster, cal: Calibration, op: str, crosses_nodes: bool) -> float:
    """Seconds per latency term of ``op`` ("all_reduce", "all_gather", "p2p"; "all_gather_synced":
    one whose peers arrive together) on a group: the measured per-op intra-node value when there
    is one (a synced op without its own: the op's), else the level's (cluster_links)."""
    if not crosses_nodes:
        own = getattr(cal, f"intra_latency_us_{op}")
        if own > 0:
            return own * 1e-6
        if op.endswith(SYNCED):
            return op_latency(cluster, cal, op[:-len(SYNCED)], crosses_nodes)
    return cluster_links(cluster, cal)[3 if crosses_nodes else 2]


SYNCED = "_synced"


def cluster_links(cluster: Cluster, cal: Calibration) -> tuple[float, float, float, float]:
    """(intra bandwidth, inter bandwidth, intra latency, inter latency) as collectives see them."""
    a_in = cal.intra_latency_us * 1e-6 if cal.intra_latency_us > 0 else cluster.intra.latency
    a_out = cal.inter_latency_us * 1e-6 if cal.inter_latency_us > 0 else cluster.inter.latency
    return (cluster.intra.bandwidth * cal.intra_eff, cluster.inter.bandwidth * cal.inter_eff,
            a_in, a_out)
