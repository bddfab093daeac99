"""Job IR: what to train (or prune), where, and with which fixed choices."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

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
    # Number of leading / trailing layers kept in bf16 under fp8 (Nemotron-H recipe).
    fp8_skip_first: int = 0
    fp8_skip_last: int = 0

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


@dataclass(frozen=True)
class MoEOptions:
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    capacity_factor: Optional[float] = None  # None: dropless
    drop_policy: Literal["probs", "position"] = "probs"
    pad_to_capacity: bool = False


@dataclass(frozen=True)
class LayoutPins:
    """Dimensions pinned by the job; a key that is absent is `auto`."""

    pins: tuple[tuple[str, Union[int, bool, str]], ...] = ()

    def get(self, key: str, default=None):
        return dict(self.pins).get(key, default)

    def as_dict(self) -> dict:
        return dict(self.pins)


@dataclass(frozen=True)
class Data:
    path: Optional[str] = None  # a dataset built by `plait data prepare`; None with synthetic
    synthetic: bool = False
    tokenizer: str = "byte"
    seed: int = 1234


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

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len
