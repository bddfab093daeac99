"""Job IR: what to train (or prune), where, and with which fixed choices."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from . import kinds
from .cluster import Cluster
from .model import ModelSpec

# Every parallel dimension a job's `layout {}` block may pin. Values: an int, a bool / name for the
# non-numeric knobs, or absent (= auto).
LAYOUT_KEYS: tuple[str, ...] = (
    "tp", "cp", "dp", "pp", "vpp", "ep", "etp", "edp", "mbs",
    "sp", "dp_shard", "recompute", "dispatcher", "order", "cp_comm",
)


@dataclass(frozen=True)
class Precision:
    kind: Literal["bf16", "fp8", "fp32"] = "bf16"
    # fp8 recipe (transformer-engine): "delayed" | "tensorwise" | "blockwise" | "mxfp8"
    fp8_recipe: Optional[str] = None
    # Leading / trailing layers whose GEMMs stay bf16 under fp8 (Nemotron-H keeps 4 at each end;
    # `fp8(bf16_ends = N)` sets both). See ir/precision.py.
    fp8_skip_first: int = 4
    fp8_skip_last: int = 4

    @property
    def param_bytes(self) -> int:
        return 4 if self.kind == "fp32" else 2


@dataclass(frozen=True)
class Optimizer:
    kind: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup: int = 0  # steps
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    grad_clip: float = 1.0
    # steps whose loss or gradient norm is not finite that a run may skip (no update) before it
    # stops; 0: the first one stops the run (Megatron-style skipping when > 0)
    skip_bad_steps: int = 0


@dataclass(frozen=True)
class MoEOptions:
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    capacity_factor: Optional[float] = None  # None: dropless
    drop_policy: Literal["probs", "position"] = "probs"
    pad_to_capacity: bool = False
    # aux-loss-free balancing (models whose MoE has expert_bias): bias += rate * sign(mean - load)
    # once per optimizer step; Megatron-Core's --moe-router-bias-update-rate defaults to 1e-3
    expert_bias_rate: float = 1e-3


@dataclass(frozen=True)
class LayoutPins:
    """Dimensions pinned by the job; a key that is absent is `auto`."""

    pins: tuple[tuple[str, Union[int, bool, str]], ...] = ()

    def get(self, key: str, default=None):
        return dict(self.pins).get(key, default)

    def as_dict(self) -> dict:
        return dict(self.pins)


@dataclass(frozen=True)
class DataSource:
    """One named dataset of a blend. ``epochs``: the most passes the job may make over it."""

    name: str
    path: str  # absolute: a `plait data prepare` directory or a Megatron PREFIX (.bin/.idx)
    epochs: Optional[float] = None


@dataclass(frozen=True)
class DataPhase:
    """A blend in force from ``at`` on: a fraction of the job's tokens (0 <= at < 1) when
    ``at_tokens`` is None, else from token ``at_tokens``. Weights sum to 1; a source a phase does
    not name is not drawn in it."""

    name: str
    weights: tuple[tuple[str, float], ...]
    at: float = 0.0
    at_tokens: Optional[int] = None


@dataclass(frozen=True)
class Data:
    path: Optional[str] = None  # a dataset built by `plait data prepare`; None with synthetic
    synthetic: bool = False
    tokenizer: str = "byte"
    seed: int = 1234
    # Validation: every ``val_every`` steps, the mean loss over ``val_batches`` global batches of
    # the held-out last ``val_fraction`` of the dataset's windows (which training never reads; the
    # same batches each time, as Megatron-LM's eval_iters). val_every = 0: no validation.
    val_every: int = 0
    val_fraction: float = 0.0
    val_batches: int = 10
    # a blend (`data { sources { ... } ... }`): named sources and phases in order; empty: `path`
    sources: tuple[DataSource, ...] = ()
    phases: tuple[DataPhase, ...] = ()
    # Packing (runtime/packing.py): attend within each packed document only, positions restarting
    # per document; and the objective: "sft" counts only the tokens the datasets' loss masks keep
    # (assistant turns, from `plait data prepare --chat`).
    document_mask: bool = False
    objective: str = "pretrain"


OBJECTIVES = ("pretrain", "sft")


def document_mask_problem(model: ModelSpec) -> Optional[str]:
    """Why ``model`` cannot keep packed documents apart, or None: the first of its kinds (registry
    order) whose dsl facet says it cannot (a Mamba layer's scan state is not reset at document
    starts); such a model is refused rather than silently mixing documents."""
    present = set(model.layers)
    problems = (kinds.facet(k, "dsl").document_mask_problem(model) for k in kinds.names() if k in present)
    return next((p for p in problems if p is not None), None)


@dataclass(frozen=True)
class TrainJob:
    name: str
    model: ModelSpec
    cluster: Cluster
    global_batch: int  # sequences per optimizer step
    seq_len: int
    precision: Precision = field(default_factory=Precision)
    optimizer: Optimizer = field(default_factory=Optimizer)
    moe: MoEOptions = field(default_factory=MoEOptions)
    layout: LayoutPins = field(default_factory=LayoutPins)
    steps: int = 100
    data: Data = field(default_factory=Data)
    seed: int = 0
    timeout: float = 300.0  # seconds a collective may wait before the run reports who is missing

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


# ------------------------------------------------------------------------------------------------
# Compression: a prune job (structured pruning + distillation of a trained model)
# ------------------------------------------------------------------------------------------------

# Width axes a prune job may narrow. Head counts are totals: attention heads stay a multiple of
# kv_heads (the same number kept in every KV group), mamba heads a multiple of the mamba groups.
PRUNE_AXES: tuple[str, ...] = (
    "hidden", "ffn", "attention_heads", "mamba_heads", "mamba_head_dim", "experts",
)


@dataclass(frozen=True)
class AxisSearch:
    """How one width axis may change. ``keep``: untouched; ``fixed``: exactly ``value``;
    ``search``: any snapped width in [low, high] (None: the planner's default bounds) on multiples
    of ``step`` (None: the axis's hardware multiple)."""

    name: str
    mode: Literal["keep", "fixed", "search"] = "keep"
    value: Optional[int] = None
    low: Optional[int] = None
    high: Optional[int] = None
    step: Optional[int] = None


@dataclass(frozen=True)
class PruneTarget:
    """Budgets the pruned model must meet (every one given applies)."""

    params: Optional[int] = None
    active_params: Optional[int] = None
    weight_memory: Optional[float] = None  # bytes of the weights stored at ``precision``
    precision: Literal["bf16", "fp8", "fp32"] = "bf16"
    throughput: Optional[float] = None  # training tokens/s on the prune job's `train` setup

    @property
    def empty(self) -> bool:
        return (self.params is None and self.active_params is None and self.weight_memory is None
                and self.throughput is None)


@dataclass(frozen=True)
class Calibration:
    """Forward passes that score importance. ``data``: a dataset directory (`plait data prepare`);
    None: the corpus bundled with plait."""

    data: Optional[str] = None
    samples: int = 64  # sequences
    seq_len: int = 128
    batch: int = 8
    seed: int = 0
    method: Literal["activation", "magnitude", "random"] = "activation"
    depth: Literal["cosine", "perplexity"] = "cosine"  # block importance: 1 - cos(in, out) or loss increase


@dataclass(frozen=True)
class Distill:
    """Knowledge distillation of the pruned student from the frozen original (the teacher):
    loss = (1 - lm_loss) * T^2 * KL(teacher_T || student_T) + lm_loss * cross-entropy."""

    steps: int = 0
    global_batch: int = 8
    seq_len: int = 128
    temperature: float = 1.0
    lm_loss: float = 0.0
    optimizer: Optimizer = field(default_factory=lambda: Optimizer(lr=1e-3, min_lr=1e-4, warmup=10))
    data: Optional[str] = None  # None: the bundled corpus
    seed: int = 0
    checkpoint_every: int = 50


@dataclass(frozen=True)
class PruneJob:
    name: str
    model: ModelSpec
    target: PruneTarget = field(default_factory=PruneTarget)
    axes: tuple[AxisSearch, ...] = ()  # axes not listed are kept
    depth: tuple[str, ...] = ()  # block kinds that may lose layers
    weights: Optional[str] = None  # safetensors file or directory (absolute); None: plan only
    train: Optional[TrainJob] = None  # the training setup throughput refers to
    layout: LayoutPins = field(default_factory=LayoutPins)  # the pruned model must run under these
    calibration: Calibration = field(default_factory=Calibration)
    distill: Distill = field(default_factory=Distill)
    output: Optional[str] = None  # run directory (absolute); None: runs/<name>

    def axis(self, name: str) -> AxisSearch:
        return next((a for a in self.axes if a.name == name), AxisSearch(name))
