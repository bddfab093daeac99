"""The MoE block's dsl facet: `moe { experts = ..., top_k = ..., ffn = ..., router = ... }` in a
model, the `moe { dispatcher = ..., capacity_factor = ... }` options of a train job, and the
experts prune axis. The protocol is at the top of
plait/kinds/attention/dsl.py. Imports only ir."""
from __future__ import annotations

from typing import Optional

from plait.ir.dsl import ast
from plait.ir.dsl.jobs import DISPATCHERS
from plait.ir.dsl.literals import changed, number
from plait.ir.dsl.reader import Reader, to_float
from plait.ir.job import MoEOptions
from plait.ir.model import ACTIVATIONS, ModelSpec, MoE
from plait.kinds import absent

HYBRID = False
PRUNE_AXES = ("experts",)
JOB_OPTIONS = MoEOptions


def read(r: Optional[Reader], hidden: int) -> Optional[MoE]:
    if r is None:
        return None
    spec = MoE(
        experts=r.int("experts"), top_k=r.int("top_k"), ffn=r.int("ffn"),
        activation=r.choice("activation", ACTIVATIONS, "swiglu"),
        shared_ffn=r.int("shared_ffn", 0, minimum=0), shared_gate=r.bool("shared_gate", False),
        router=r.choice("router", ("softmax", "sigmoid"), "softmax"),
        pre_softmax=r.bool("pre_softmax", False), norm_topk=r.bool("norm_topk", True),
        expert_bias=r.bool("expert_bias", False),
        groups=r.int("groups", 1), topk_groups=r.int("topk_groups", 1), group_top=r.int("group_top", 0, minimum=0),
        scaling_factor=r.float("scaling_factor", 1.0, positive=True),
        aux_loss=r.float("aux_loss", 0.0, minimum=0.0), z_loss=r.float("z_loss", 0.0, minimum=0.0),
    )
    _check_moe(r, spec)
    r.finish()
    return spec


def _check_moe(r: Reader, m: MoE) -> None:
    def at(key):
        entry = r.entries.get(key)
        return entry.value.pos if entry is not None else r.pos

    if m.top_k > m.experts:
        raise r.ctx.error(f"top_k ({m.top_k}) exceeds experts ({m.experts})", at("top_k"))
    if m.experts % m.groups:
        raise r.ctx.error(f"groups ({m.groups}) must divide experts ({m.experts})", at("groups"),
                          hint="group-limited routing splits the experts into equal groups")
    if m.topk_groups > m.groups:
        raise r.ctx.error(f"topk_groups ({m.topk_groups}) exceeds groups ({m.groups})", at("topk_groups"))
    eligible = m.topk_groups * (m.experts // m.groups)
    if m.top_k > eligible:
        raise r.ctx.error(f"top_k ({m.top_k}) exceeds the {eligible} experts in the best topk_groups "
                          f"({m.topk_groups}) groups of {m.experts // m.groups}", at("top_k"))
    if m.groups > 1 and not 0 < m.group_score_top <= m.experts // m.groups:
        raise r.ctx.error(f"a group's score sums its best {m.group_score_top} experts, but a group has "
                          f"{m.experts // m.groups}", at("group_top" if m.group_top else "topk_groups"),
                          hint="group_top sets how many experts score a group")
    if m.shared_gate and not m.shared_ffn:
        raise r.ctx.error("shared_gate needs a shared expert", at("shared_gate"), hint="set shared_ffn")


check_layers = absent.no_layer_checks


_MOE_KEYS = ("shared_ffn", "shared_gate", "router", "pre_softmax", "norm_topk", "expert_bias", "groups",
             "topk_groups", "group_top", "scaling_factor", "aux_loss", "z_loss")


def format_block(block: MoE, model: ModelSpec) -> list:
    entries = [("experts", number(block.experts)), ("top_k", number(block.top_k)), ("ffn", number(block.ffn)),
               ("activation", block.activation)]
    return entries + changed(block, _MOE_KEYS)


def axis_width(model: ModelSpec, axis: str) -> int:
    return model.block("moe").experts


def structure_problem(model: ModelSpec, axis: str, width: int) -> Optional[tuple[str, str]]:
    moe = model.block("moe")
    if width < moe.top_k:
        return f"experts ({width}) must be at least top_k ({moe.top_k})", "every token picks top_k experts"
    if width % moe.groups:
        return (f"experts ({width}) must be a multiple of the routing groups ({moe.groups}): "
                f"{width} % {moe.groups} = {width % moe.groups}", "group-limited routing needs equal groups")
    return None


# --- a train job's MoE options -----------------------------------------------------------------

def read_job_options(r: Optional[Reader]) -> MoEOptions:
    """`moe { dispatcher = ..., capacity_factor = ... | dropless = true, ... }` of a train job."""
    if r is None:
        return MoEOptions()
    capacity = r.value("capacity_factor", None)
    dropless = r.bool("dropless", None)
    if isinstance(capacity, ast.Ident) and capacity.name == "none":
        capacity = None
    factor = None if capacity is None else to_float(r.ctx, capacity, "capacity_factor", positive=True)
    if factor is not None and dropless:
        raise r.ctx.error("give capacity_factor or dropless = true, not both", r.entries["dropless"].pos)
    if factor is None and dropless is False:
        raise r.ctx.error("dropless = false needs a capacity_factor", r.entries["dropless"].pos,
                          hint="add capacity_factor = 1.0")
    options = MoEOptions(dispatcher=r.choice("dispatcher", DISPATCHERS, "alltoall"), capacity_factor=factor,
                         drop_policy=r.choice("drop_policy", ("probs", "position"), "probs"),
                         pad_to_capacity=r.bool("pad_to_capacity", False),
                         expert_bias_rate=_bias_rate(r))
    if options.pad_to_capacity and factor is None:
        raise r.ctx.error("pad_to_capacity needs a capacity_factor (dropless routing has no capacity)",
                          r.entries["pad_to_capacity"].pos)
    r.finish()
    return options


def _bias_rate(r: Reader) -> float:
    value = r.value("expert_bias_rate", None)
    default = MoEOptions().expert_bias_rate
    return default if value is None else to_float(r.ctx, value, "expert_bias_rate", minimum=0.0)


def format_job_options(options: MoEOptions) -> list:
    entries = [("dispatcher", options.dispatcher)]
    entries.append(("capacity_factor", number(options.capacity_factor)) if options.capacity_factor is not None
                   else ("dropless", "true"))
    return entries + changed(options, ("drop_policy", "pad_to_capacity", "expert_bias_rate"))


document_mask_problem = absent.no_document_mask_problem
