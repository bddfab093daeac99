"""The dense MLP's hf facet: checkpoint names and Nemotron-H config fields. The protocol is at the
top of plait/kinds/attention/hf.py. Imports only ir."""
from __future__ import annotations

from plait.ir.hf_recipes import Ref
from plait.ir.model import ModelSpec

DECODER_SLOT = 1
DECODER_NORM = "post_attention_layernorm."


def llama_names(spec: ModelSpec, p: str, local: str) -> list:
    return [Ref(p + "mlp." + local)]


def hybrid_names(spec: ModelSpec, p: str, local: str) -> list:
    return [Ref(p + "mixer." + local)]


def nemotron_h_fields(spec: ModelSpec) -> dict:
    return dict(intermediate_size=spec.mlp.ffn, mlp_hidden_act="relu2", mlp_bias=spec.mlp.bias)
