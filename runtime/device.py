"""Where a rank computes: the one decision of device and process-group backend.

    nccl cluster and CUDA visible   -> NCCL, cuda:{LOCAL_RANK} (torch.cuda.set_device)
    anything else                   -> gloo on the CPU

`choose` decides once per process (the worker calls it before joining the default group); the
answer travels as `Mesh.device`, which the trainer, pipeline stages, optimizer shards and the data
loader all read, so no other module asks torch.cuda for itself.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from plait.ir.errors import PlaitError

log = logging.getLogger("plait.device")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    backend: str  # "nccl" | "gloo"
    device: torch.device
    reason: str  # why, for the log

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def local_rank(environ=None) -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 when run by hand)."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("LOCAL_RANK", 0))
    except ValueError:
        raise PlaitError(f"LOCAL_RANK={env.get('LOCAL_RANK')!r} is not an integer") from None


def choose(backend: str, rank_on_node: Optional[int] = None) -> Placement:
    """The backend and device for a cluster whose spec says ``backend``."""
    if backend != "nccl":
        return Placement("gloo", CPU, f"cluster backend {backend}: gloo on the CPU")
    if not torch.cuda.is_available():
        return Placement("gloo", CPU, "cluster backend nccl, but no CUDA device is visible: "
                                      "gloo on the CPU")
    index = local_rank() if rank_on_node is None else rank_on_node
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise PlaitError(f"local rank {index} needs a CUDA device, but {count} are visible",
                         hint="start at most one process per GPU (torchrun --nproc-per-node)")
    return Placement("nccl", torch.device("cuda", index), f"NCCL on cuda:{index} of {count}")


def activate(placement: Placement) -> Placement:
    """Make the placement's GPU this process's current device (NCCL binds to it)."""
    if placement.is_cuda:
        torch.cuda.set_device(placement.device)
    log.info("device: %s", placement.reason)
    return placement
