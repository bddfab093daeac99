"""(IR, Plan) -> each rank's program: trace the reference model, run the pass list, and print the
per-stage GraphModule code.

The pass list below is the table of contents of lowering; every pass is verified after it runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.fx

from plait.ir.errors import LayoutError
from plait.ir.model import ModelSpec
from plait.ir.plan import Layout, ParallelPlan, dense_layout  # noqa: F401  (re-exported)
from plait.ir.precision import PrecisionPolicy
from plait.planner.groups import group_of

from .passes.base import Pass, Target, run_passes
from .passes.context_parallel import CONTEXT_PARALLEL
from .passes.data_parallel import DATA_PARALLEL, GRAD_SYNC, GradSync
from .passes.dispatch_experts import DISPATCH_EXPERTS
from .passes.fp8_linears import FP8_LINEARS
from .passes.recompute import RECOMPUTE_PASS, UNITS, regions
from .passes.sequence_parallel import SEQUENCE_PARALLEL
from .passes.shard_tensor_parallel import SHARD_TENSOR_PARALLEL, SHARDS, ShardSpec
from .passes.split_pipeline import LOSS, SPLIT_PIPELINE, STAGE_IO, stage_name
from .moe.sync import EXPERTS, ExpertSync
from .trace import trace_model

PASSES: list[Pass] = [
    DISPATCH_EXPERTS,       # MoE mixers -> this rank's EP x ETP experts behind a token dispatcher
    SHARD_TENSOR_PARALLEL,  # column/row-parallel linears, vocab-parallel embedding, head, loss
    SEQUENCE_PARALLEL,      # all-gather / reduce-scatter along the sequence around TP regions
    CONTEXT_PARALLEL,       # zigzag sequence split over CP: ring / all-to-all attention, Mamba states
    DATA_PARALLEL,          # which gradients are averaged over DP and summed over TP
    FP8_LINEARS,            # fp8 GEMMs for the linears of the policy's fp8 layers (bf16 ends kept)
    SPLIT_PIPELINE,         # fx split_module by the plan's stages; the loss as its own child
    RECOMPUTE_PASS,         # layers of recomputing stages run under checkpoint (full / selective)
]


def coords(layout: Layout, rank: int) -> dict[str, int]:
    """This rank's index in its tp, cp, dp and pp groups (Megatron order, `planner.groups`)."""
    layout = dense_layout(layout)
    if not 0 <= rank < layout.world:
        raise LayoutError(f"rank {rank} is outside the layout's {layout.world} ranks")
    return {axis: group_of(layout, "dense", axis, rank).index(rank) for axis in ("tp", "cp", "dp", "pp")}


@dataclass
class RankProgram:
    """What one rank runs: its pipeline chunks (stage GraphModules), the loss (last pp rank), and
    the facts the runtime needs (parameter shards, gradient reductions, stage boundary shapes)."""

    rank: int
    coords: dict[str, int]
    plan: ParallelPlan
    pipe: torch.fx.GraphModule

    @property
    def chunk_indices(self) -> list[int]:
        pp, vpp = self.plan.layout.pp, self.plan.layout.vpp
        return [v * pp + self.coords["pp"] for v in range(vpp)]

    @property
    def num_chunks(self) -> int:
        return self.plan.layout.pp * self.plan.layout.vpp

    def stage(self, chunk: int) -> torch.fx.GraphModule:
        return self.pipe.get_submodule(stage_name(chunk))

    @property
    def loss(self) -> torch.fx.GraphModule:
        return self.pipe.get_submodule(LOSS)

    @property
    def holds_loss(self) -> bool:
        return self.num_chunks - 1 in self.chunk_indices

    @property
    def shards(self) -> dict[str, ShardSpec]:
        return self.pipe.meta[SHARDS]

    @property
    def grad_sync(self) -> GradSync:
        return self.pipe.meta[GRAD_SYNC]

    @property
    def experts(self) -> ExpertSync:
        """Expert parameters and their EDP gradient reduction (empty for dense models)."""
        return self.pipe.meta.get(EXPERTS, ExpertSync())

    @property
    def stage_io(self) -> dict:
        return self.pipe.meta[STAGE_IO]

    def local_modules(self) -> list[tuple[int, torch.fx.GraphModule]]:
        return [(c, self.stage(c)) for c in self.chunk_indices]

    def local_parameters(self) -> dict[str, torch.nn.Parameter]:
        """This rank's parameters by reference name (its chunks only)."""
        out: dict[str, torch.nn.Parameter] = {}
        for _, module in self.local_modules():
            out.update(dict(module.named_parameters()))
        return out


def lower(model: torch.nn.Module, spec: ModelSpec, plan: ParallelPlan, rank: int,
          log: Optional[Callable[[str], None]] = None,
          precision: Optional[PrecisionPolicy] = None) -> RankProgram:
    """Lower the reference ``model`` (its weights become this rank's shards) for ``rank``;
    ``precision`` (default fp32) says which layers' linears run in fp8."""
    plan = replace(plan, layout=dense_layout(plan.layout))
    c = coords(plan.layout, rank)
    target = Target(spec=spec, plan=plan, tp_rank=c["tp"], pp_rank=c["pp"], rank=rank, cp_rank=c["cp"],
                    precision=precision or PrecisionPolicy("fp32", spec.num_layers))
    gm = trace_model(model, spec, batch=plan.layout.mbs, seq=plan.seq_len)
    pipe = run_passes(gm, PASSES, target, log)
    return RankProgram(rank=rank, coords=c, plan=plan, pipe=pipe)


def program_text(program: RankProgram) -> dict[str, str]:
    """Readable Python of each of this rank's children (GraphModule.code), keyed by file name."""
    files = {}
    for c, module in program.local_modules():
        units = dict(module.get_submodule(UNITS).named_children()) if hasattr(module, UNITS) else {}
        files[f"{stage_name(c)}.py"] = _header(program, stage_name(c)) + module.code + "".join(
            f"\n\n# recompute region {name}\n{region.code}" for name, region in regions(module).items()
        ) + "".join(f"\n\n# FSDP unit {name}\n{unit.code}" for name, unit in units.items())
    if program.holds_loss:
        files[f"{LOSS}.py"] = _header(program, LOSS) + program.loss.code
    return files


def _header(program: RankProgram, name: str) -> str:
    inp, in_dtype, out, out_dtype = program.stage_io[name]
    named = dict(program.pipe.get_submodule(name).named_parameters())
    params = sum(p.numel() for p in named.values())
    coords_text = " ".join(f"{k}{v}" for k, v in program.coords.items())
    return (f"# rank {program.rank} ({coords_text}) {name}: in {list(inp)} {in_dtype}, "
            f"out {list(out) if out else 'scalar'} {out_dtype}; {params:,} local parameters\n"
            f"# gradients: {program.grad_sync.describe(set(named))}\n"
            + (f"# experts: {program.experts.describe()}\n" if set(program.experts.params) & set(named)
               else ""))


def write_programs(programs: list[RankProgram], out_dir: str | Path) -> list[Path]:
    """DIR/plan.json, DIR/rank{r}/stage{c}.py (+ loss.py), DIR/rank{r}/shards.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "plan.json"]
    written[0].write_text(programs[0].plan.to_json() + "\n")
    for program in programs:
        rank_dir = out / f"rank{program.rank}"
        rank_dir.mkdir(exist_ok=True)
        for name, text in program_text(program).items():
            (rank_dir / name).write_text(text)
            written.append(rank_dir / name)
        shards = {n: vars(s) for n, s in program.shards.items()}
        (rank_dir / "shards.json").write_text(json.dumps(shards, indent=1) + "\n")
        written.append(rank_dir / "shards.json")
    return written
