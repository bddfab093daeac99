"""The mamba kind's sharding plan (protocol: plait/kinds/attention/parallelize.py), Megatron-Core's
MambaMixer layout.

in_proj's output is the concatenation [z | x | B | C | dt]; a contiguous chunk of it would hand a
rank parts of the wrong components, so each component is chunked on its own and the rank's pieces
are concatenated again (a *segmented* split). Likewise the conv channels [x | B | C]. The per-head
vectors (dt_bias, A_log, D) and the gated-norm weight (whose group size d_inner / groups stays the
same on every rank because groups divide by tp) are plain contiguous chunks; out_proj is
row-parallel. After the split the mixer's forward reads its local sizes from the parameters
(see lowering/modules/mamba.py), so the graph needs no other rewrite.

Under CP the causal conv takes its predecessor chunks' halos and the SSD scan passes its states
across chunks (lowering/mamba_cp.py).
"""
from __future__ import annotations

from plait.ir.model import ModelSpec
from plait.ir.plan import CP_COMMS
from plait.kinds import absent
from plait.lowering.mamba_cp import cp_causal_conv1d, cp_ssd_scan
from plait.lowering.modules import mamba as reference
from plait.lowering.shard_plans import ParamSplit, SequenceOp, TensorParallelPlan

from .layout import conv_sizes, in_proj_sizes

SEQUENCE_OPS = (
    SequenceOp(reference.causal_conv1d, dict.fromkeys(CP_COMMS, cp_causal_conv1d)),
    SequenceOp(reference.ssd_scan, dict.fromkeys(CP_COMMS, cp_ssd_scan)),
)


def _column_side(spec: ModelSpec) -> tuple[ParamSplit, ...]:
    """The column-parallel side of a Mamba2 mixer, sharded when its in_proj is called."""
    in_proj, conv = in_proj_sizes(spec.mamba), conv_sizes(spec.mamba)
    return (
        ParamSplit("in_proj.weight", 0, in_proj), ParamSplit("in_proj.bias", 0, in_proj),
        ParamSplit("conv1d.weight", 0, conv), ParamSplit("conv1d.bias", 0, conv),
        ParamSplit("dt_bias", 0), ParamSplit("A_log", 0), ParamSplit("D", 0),
        ParamSplit("norm.weight", 0),
    )


def tensor_parallel(spec: ModelSpec) -> TensorParallelPlan:
    return TensorParallelPlan(row=("out_proj",), split_on={"in_proj": _column_side(spec)})


def sequence_ops() -> tuple[SequenceOp, ...]:
    return SEQUENCE_OPS


routed_experts = absent.no_routed_experts
