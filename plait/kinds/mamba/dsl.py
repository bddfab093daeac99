"""The Mamba2 mixer's dsl facet: `mamba { heads = ..., head_dim = ..., groups = ..., state = ... }`
and its prune axes (heads, head_dim). A model with mamba layers is written as a Megatron hybrid
pattern. The protocol is at the top of
plait/kinds/attention/dsl.py. Imports only ir."""
from __future__ import annotations

from typing import Optional

from plait.ir.dsl.literals import changed, number
from plait.ir.dsl.reader import Reader
from plait.ir.model import Mamba2, ModelSpec
from plait.kinds import absent

HYBRID = True
PRUNE_AXES = ("mamba_heads", "mamba_head_dim")
JOB_OPTIONS = None


def read(r: Optional[Reader], hidden: int) -> Optional[Mamba2]:
    if r is None:
        return None
    spec = Mamba2(heads=r.int("heads"), head_dim=r.int("head_dim"), groups=r.int("groups", 1),
                  state=r.int("state"), conv=r.int("conv", 4), chunk=r.int("chunk", 128),
                  conv_bias=r.bool("conv_bias", True), proj_bias=r.bool("proj_bias", False),
                  dt_min=r.float("dt_min", 0.0, minimum=0.0))
    if spec.heads % spec.groups:
        raise r.ctx.error(f"mamba heads ({spec.heads}) must be divisible by groups ({spec.groups})",
                          r.entries["groups"].value.pos)
    expand = r.float("expand", None, positive=True)
    if expand is not None and spec.d_inner != expand * hidden:
        raise r.ctx.error(f"expand ({expand:g}) disagrees with heads * head_dim / hidden "
                          f"({spec.heads} * {spec.head_dim} / {hidden} = {spec.d_inner / hidden:g})",
                          r.entries["expand"].value.pos, hint="drop expand or fix heads / head_dim")
    r.finish()
    return spec


check_layers = absent.no_layer_checks


def format_block(block: Mamba2, model: ModelSpec) -> list:
    entries = [("heads", number(block.heads)), ("head_dim", number(block.head_dim)),
               ("groups", number(block.groups)), ("state", number(block.state))]
    entries += changed(block, ("conv", "chunk", "conv_bias", "proj_bias", "dt_min"))
    if block.d_inner % model.hidden == 0:
        entries.append(("expand", number(block.d_inner // model.hidden)))
    return entries


def axis_width(model: ModelSpec, axis: str) -> int:
    m = model.block("mamba")
    return m.heads if axis == "mamba_heads" else m.head_dim


def structure_problem(model: ModelSpec, axis: str, width: int) -> Optional[tuple[str, str]]:
    groups = model.block("mamba").groups
    if axis == "mamba_heads" and width % groups:
        return (f"mamba heads ({width}) must be a multiple of the mamba groups ({groups}): "
                f"{width} % {groups} = {width % groups}",
                "the same number of heads is kept in every group; groups are never pruned")
    return None


read_job_options = absent.no_job_options
format_job_options = absent.no_job_option_entries


def document_mask_problem(model: ModelSpec) -> Optional[str]:
    """A Mamba layer would need its scan state and conv window reset at every document start,
    which plait does not lower."""
    return (f"model {model.name!r} has Mamba layers; document masking resets attention only "
            "(the Mamba state is not reset at document boundaries)")
