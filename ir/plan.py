"""Plans: a folded 5D layout, its pipeline partition, and what the cost model predicts for it.

Attention / dense layers run on TP x CP x DP x PP, MoE layers on ETP x EP x EDP x PP (MoE Parallel
Folding); PP is shared. ``dp`` and ``edp`` are derived from the world size.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Literal, Optional

from .errors import LayoutError
from .job import MoEOptions
from .model import ModelSpec
from .serde import from_json, to_json

DP_KINDS = ("replicated", "zero1", "fsdp")
RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("1f1b", "interleaved", "gpipe", "zero-bubble")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"
DIMS = ("tp", "cp", "ep", "dp", "pp")  # the names a rank order may list
DISPATCHERS = ("alltoall", "allgather")  # MoE token dispatchers
CP_COMMS = ("ring", "alltoall")  # context-parallel attention: K/V ring | all-to-all (Ulysses)


@lru_cache(maxsize=64)  # the cost model asks per process group of every layout it prices
def parse_order(order: str) -> tuple[str, ...]:
    """The five dimension names in rank order; names missing from ``order`` are appended last
    (Megatron appends them too, which only matters when their size is 1)."""
    names = tuple(n.strip().lower() for n in order.split("-") if n.strip())
    unknown = [n for n in names if n not in DIMS]
    if unknown or len(set(names)) != len(names):
        raise LayoutError(f"order {order!r} must list distinct names from {'-'.join(DIMS)}",
                          hint='the default is "tp-cp-ep-dp-pp"')
    return names + tuple(n for n in DIMS if n not in names)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual stages per pipeline rank (interleaved schedule when > 1)
    ep: int = 1
    etp: int = 1
    edp: int = 1
    mbs: int = 1  # micro-batch size (sequences)
    sp: bool = False  # sequence parallel with TP
    dp_kind: str = "zero1"  # replicated | zero1 (distributed optimizer) | fsdp
    recompute: str = "none"  # default for stages that do not say otherwise
    dispatcher: str = "alltoall"
    cp_comm: str = "ring"  # context-parallel attention: ring (K/V passed around) | alltoall (Ulysses)
    order: str = DEFAULT_ORDER

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def expert_world(self) -> int:
        return self.etp * self.ep * self.edp * self.pp

    def short(self) -> str:
        s = f"tp{self.tp} cp{self.cp} dp{self.dp} pp{self.pp}"
        if self.cp > 1 and self.cp_comm != "ring":
            s += f" cp-{self.cp_comm}"
        if self.vpp > 1:
            s += f" vpp{self.vpp}"
        if self.ep > 1 or self.edp != self.dp * self.cp:
            s += f" | etp{self.etp} ep{self.ep} edp{self.edp}"
        return s + f" mbs{self.mbs}"


def dense_layout(layout: Layout) -> Layout:
    """A dense model has no experts: its (unused) expert side spans the same world, as Megatron's
    defaults do (etp = tp, ep = 1, edp = dp * cp)."""
    if layout.expert_world == layout.world or layout.ep > 1:
        return layout
    return replace(layout, etp=layout.tp, ep=1, edp=layout.dp * layout.cp)


@dataclass(frozen=True)
class Stage:
    """One (virtual) pipeline stage: layers [first, last) of the model's layer sequence."""

    pp_rank: int
    virtual: int
    first: int
    last: int
    recompute: str = "none"
    # The embedding lives on the first stage, final norm + head + loss on the last.

    @property
    def num_layers(self) -> int:
        return self.last - self.first


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device on one pipeline rank."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    buffers: float = 0.0  # communication buffers, MoE dispatch, logits
    reserve: float = 0.0  # allocator fragmentation and runtime context

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.buffers + self.reserve)


@dataclass(frozen=True)
class Prediction:
    step_time: float = 0.0  # seconds per optimizer step
    tokens_per_s: float = 0.0
    mfu: float = 0.0  # model FLOPs / (peak x time), Megatron's convention
    tflops_per_gpu: float = 0.0
    bubble: float = 0.0  # fraction of the step the pipeline is idle
    memory: tuple[MemoryBreakdown, ...] = ()  # per pipeline rank
    exposed_comm: tuple[tuple[str, float], ...] = ()  # seconds per kind (tp, cp, ep, dp, pp)
    # FLOPs actually executed incl. recomputation, per GPU per second (SC'21 Table 1 convention)
    hardware_tflops_per_gpu: float = 0.0

    @property
    def peak_memory(self) -> float:
        return max((m.total for m in self.memory), default=0.0)


@dataclass(frozen=True)
class Optimality:
    """How far the plan's stage partition is from proven optimal for its layout."""

    proven: bool = True  # the partition is proven optimal (for the cost model's objective)
    gap: float = 0.0  # when not proven: (found - proven bound) / found
    method: str = ""  # tied | chain | ilp | even split meets the lower bound
    nodes: int = 0  # branch-and-bound nodes the ILP explored (its deterministic work limit)

    def line(self) -> str:
        if self.proven:
            return f"stage partition proven optimal ({self.method})" if self.method else \
                "stage partition proven optimal"
        return (f"stage partition NOT proven optimal: within {self.gap:.2%} of the proven bound "
                f"({self.method}, node limit reached after {self.nodes} nodes)")


@dataclass(frozen=True)
class ParallelPlan:
    job: str
    model: str
    cluster: str
    world: int
    layout: Layout
    stages: tuple[Stage, ...]
    global_batch: int
    seq_len: int
    schedule: str = "1f1b"
    prediction: Prediction = field(default_factory=Prediction)
    explanation: tuple[str, ...] = ()
    precision: str = "bf16"  # the job's training precision (for exporters)
    moe: Optional[MoEOptions] = None  # the job's token-routing options, for MoE models
    layer_pattern: str = ""  # the model's layers as a Megatron hybrid pattern (M * - E)
    optimality: Optimality = field(default_factory=Optimality)
    # sha256 (first 16 hex digits) of each input: model, cluster, job, calibration, plait version
    fingerprints: tuple[tuple[str, str], ...] = ()

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.layout.dp * self.layout.mbs)

    def stages_of(self, pp_rank: int) -> tuple[Stage, ...]:
        return tuple(sorted((s for s in self.stages if s.pp_rank == pp_rank),
                            key=lambda s: s.virtual))

    def to_json(self) -> str:
        return to_json(self)

    @staticmethod
    def from_json(text: str) -> "ParallelPlan":
        return from_json(ParallelPlan, text)

    def with_prediction(self, prediction: Prediction) -> "ParallelPlan":
        return replace(self, prediction=prediction)


def even_stages(num_layers: int, pp: int, vpp: int = 1, recompute: str = "none") -> tuple[Stage, ...]:
    """Contiguous split of ``num_layers`` into pp*vpp chunks; chunk c runs on pp rank c % pp
    (the interleaved assignment), earlier chunks take the remainder."""
    chunks = pp * vpp
    if num_layers < chunks:
        raise ValueError(f"{num_layers} layers cannot fill pp*vpp = {pp}*{vpp} = {chunks} stages")
    base, extra = divmod(num_layers, chunks)
    stages, first = [], 0
    for c in range(chunks):
        n = base + (1 if c < extra else 0)
        stages.append(Stage(pp_rank=c % pp, virtual=c // pp, first=first, last=first + n,
                            recompute=recompute))
        first += n
    return tuple(stages)


# ------------------------------------------------------------------------------------------------
# Compression plans
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerKeep:
    """What one kept layer of the source model keeps; indices refer to the source model, ascending.
    ``units``: ffn neurons (mlp), query heads (attention), heads (mamba) or experts (moe);
    ``channels``: the head channels every kept mamba head keeps."""

    layer: int
    kind: str
    units: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()


@dataclass(frozen=True)
class PruneCandidate:
    """One architecture the pruning ILP found, with its exact counts and what it retains."""

    model: ModelSpec
    params: int
    active_params: int
    weight_bytes: int
    retained: tuple[tuple[str, float], ...]  # axis -> fraction of its importance kept
    score: float  # product of the retained fractions (the ILP maximises its logarithm)
    tokens_per_s: Optional[float] = None  # the planner's prediction on the job's train setup
    layout: Optional[str] = None  # the layout that prediction is for


@dataclass(frozen=True)
class PrunePlan:
    """The chosen candidate made concrete: which embedding channels and which layers, neurons,
    heads and experts of the source model survive. ``candidates`` ranks the alternatives (the
    chosen one first)."""

    job: str
    source: str  # source model name
    importance: str  # activation | magnitude | random | uniform (no weights)
    hidden: tuple[int, ...]
    layers: tuple[LayerKeep, ...]
    candidates: tuple[PruneCandidate, ...]

    @property
    def chosen(self) -> PruneCandidate:
        return self.candidates[0]

    @property
    def model(self) -> ModelSpec:
        return self.chosen.model

    def to_json(self) -> str:
        return to_json(self)

    @staticmethod
    def from_json(text: str) -> "PrunePlan":
        return from_json(PrunePlan, text)
