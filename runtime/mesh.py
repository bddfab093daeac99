"""torch.distributed initialisation and this rank's process groups, built from the plan's layout
with the Megatron-compatible mapping (`plait.planner.groups.rank_groups`).

Every group gets a timeout and a description ("tp[0, 1]"); lowered graphs reach their groups through
the logical axis names bound here (`plait.lowering.collectives.bind_axis`).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from plait.ir.errors import LayoutError
from plait.ir.plan import Layout
from plait.lowering import collectives
from plait.lowering.compile import dense_layout
from plait.planner.groups import rank_groups

from . import stall
from .device import CPU

DEFAULT_TIMEOUT_S = 120.0
# Axis names the dense runtime needs (keys of rank_groups(layout)["dense"]).
DENSE_AXES = ("tp", "cp", "dp", "dp-cp", "pp", "tp-pp")
# Axis names of the expert side (MoE layers run on ETP x EP x EDP x PP; keys of ["expert"]).
EXPERT_AXES = ("ep", "etp", "etp-ep", "edp")
EMBEDDING_AXIS = "embedding"  # first + last pp rank of a pipeline (tied embedding copies)


@dataclass
class Mesh:
    """This rank's view of the layout: one process group per axis, and its members."""

    rank: int
    world: int
    layout: Layout
    timeout_s: float
    device: torch.device = CPU  # where this rank computes (runtime.device.choose decided it)
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)
    members: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def size(self, axis: str) -> int:
        return len(self.members[axis])

    def coord(self, axis: str) -> int:
        """This rank's index inside its `axis` group."""
        return self.members[axis].index(self.rank)

    def describe(self) -> str:
        coords = " ".join(f"{a}{self.coord(a)}/{self.size(a)}" for a in ("tp", "dp", "pp"))
        return f"rank {self.rank}/{self.world} [{coords}]"


def init_distributed(backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S,
                     init_method: str | None = None, rank: int | None = None,
                     world: int | None = None) -> None:
    """Join the default group (from torchrun's environment unless told otherwise)."""
    if dist.is_initialized():
        return
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _attempt_store(rank, world, timeout) if init_method is None else None
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        return
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank,
                            world_size=world, timeout=timeout)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta):
    """Under torchrun, the job's store with keys of this attempt only: after an elastic restart the
    agent's store still holds the dead attempt's process-group addresses, and ranks that read
    them connect to nothing (seen with torch 2.13). None outside torchrun."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent, timeout=timeout)
    return dist.PrefixStore(f"plait/attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def build_mesh(layout: Layout, timeout_s: float = DEFAULT_TIMEOUT_S,
               device: torch.device = CPU) -> Mesh:
    """Create every dense group of the layout (all ranks create all groups, in the same order, as
    torch.distributed requires) and keep this rank's; bind the axes for lowered graphs."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if layout.world != world:
        raise LayoutError(f"layout tp*cp*dp*pp = {layout.tp}*{layout.cp}*{layout.dp}*{layout.pp} = "
                          f"{layout.world} ranks, but {world} processes were started")
    timeout = datetime.timedelta(seconds=timeout_s)
    mesh = Mesh(rank=rank, world=world, layout=layout, timeout_s=timeout_s, device=device)
    tables = rank_groups(dense_layout(layout))
    table = tables["dense"]
    made: dict[tuple[int, ...], dist.ProcessGroup] = {}
    for axis in DENSE_AXES:
        for ranks in table[axis]:
            group = dist.new_group(ranks, timeout=timeout, group_desc=f"{axis}{list(ranks)}")
            made[tuple(ranks)] = group
            if rank in ranks:
                mesh.groups[axis], mesh.members[axis] = group, tuple(ranks)
    for axis in EXPERT_AXES:  # an expert group with a dense group's ranks is that group
        for ranks in map(tuple, tables["expert"][axis]):
            if ranks not in made:
                made[ranks] = dist.new_group(list(ranks), timeout=timeout,
                                             group_desc=f"{axis}{list(ranks)}")
            if rank in ranks:
                mesh.groups[axis], mesh.members[axis] = made[ranks], ranks
    _embedding_groups(mesh, table["pp"], timeout)
    mesh.groups["world"], mesh.members["world"] = dist.group.WORLD, tuple(range(world))
    bind(mesh)
    stall.start(rank)  # a timed-out collective names the members that did not arrive
    return mesh


def bind(mesh: Mesh) -> Mesh:
    """Make ``mesh``'s axes the ones lowered programs' collectives use (replacing any bound
    before: a process may switch between meshes it built, as the test harnesses do)."""
    collectives.unbind_all()
    for axis, group in mesh.groups.items():
        collectives.bind_axis(axis, group, mesh.members[axis])
    return mesh


def _embedding_groups(mesh: Mesh, pp_groups, timeout) -> None:
    """Megatron's embedding group: the first and last rank of each pipeline, which hold the two
    copies of a tied embedding (only ranks in one get the "embedding" axis)."""
    for ranks in pp_groups:
        if len(ranks) < 2:
            continue
        pair = (ranks[0], ranks[-1])
        group = dist.new_group(list(pair), timeout=timeout, group_desc=f"{EMBEDDING_AXIS}{list(pair)}")
        if mesh.rank in pair:
            mesh.groups[EMBEDDING_AXIS], mesh.members[EMBEDDING_AXIS] = group, pair


def destroy() -> None:
    stall.stop()
    collectives.unbind_all()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_threads() -> None:
    """One compute thread per rank: ranks share the machine's cores."""
    torch.set_num_threads(int(os.environ.get("PLAIT_THREADS", "1")))
