"""The dense MLP's dsl facet: `mlp { ffn = ..., activation = ..., bias = ... }` and the ffn prune
axis. The protocol is at the top of
plait/kinds/attention/dsl.py. Imports only ir."""
from __future__ import annotations

from typing import Optional

from plait.ir.dsl.literals import changed, number
from plait.ir.dsl.reader import Reader
from plait.ir.model import ACTIVATIONS, MLP, ModelSpec
from plait.kinds import absent

HYBRID = False
PRUNE_AXES = ("ffn",)
JOB_OPTIONS = None


def read(r: Optional[Reader], hidden: int) -> Optional[MLP]:
    if r is None:
        return None
    spec = MLP(ffn=r.int("ffn"), activation=r.choice("activation", ACTIVATIONS, "swiglu"),
               bias=r.bool("bias", False))
    r.finish()
    return spec


check_layers = absent.no_layer_checks


def format_block(block: MLP, model: ModelSpec) -> list:
    return [("ffn", number(block.ffn)), ("activation", block.activation)] + changed(block, ("bias",))


def axis_width(model: ModelSpec, axis: str) -> int:
    return model.block("mlp").ffn


structure_problem = absent.no_structure_problem
read_job_options = absent.no_job_options
format_job_options = absent.no_job_option_entries
document_mask_problem = absent.no_document_mask_problem
