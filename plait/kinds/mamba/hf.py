"""The Mamba2 mixer's hf facet: checkpoint names (Nemotron-H's mixer parameters are the reference
module's) and Nemotron-H config fields. No llama-family checkpoint holds one. The protocol is at
the top of plait/kinds/attention/hf.py. Imports only ir."""
from __future__ import annotations

from plait.ir.errors import PlaitError
from plait.ir.hf_recipes import Ref
from plait.ir.model import ModelSpec

DECODER_SLOT = None
DECODER_NORM = ""


def llama_names(spec: ModelSpec, p: str, local: str) -> list:
    raise PlaitError("a llama-family checkpoint has no Mamba layers", hint="use a nemotron_h checkpoint")


def hybrid_names(spec: ModelSpec, p: str, local: str) -> list:
    return [Ref(p + "mixer." + local)]


def nemotron_h_fields(spec: ModelSpec) -> dict:
    m = spec.mamba
    return dict(mamba_num_heads=m.heads, mamba_head_dim=m.head_dim, n_groups=m.groups,
                ssm_state_size=m.state, conv_kernel=m.conv, chunk_size=m.chunk,
                use_conv_bias=m.conv_bias, use_bias=m.proj_bias, mamba_hidden_act="silu",
                time_step_limit=(m.dt_min, float("inf")))  # the dt floor the forward clamps at
