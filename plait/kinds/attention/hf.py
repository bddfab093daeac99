"""Attention's hf facet: its Hugging Face checkpoint names, and its sliding-window config fields
(hf_window.py), which the llama-like family importer and exporter (ir/hf.py, ir/hf_write.py) read
and write through here.

The hf-facet protocol: every kind's ``plait/kinds/<kind>/hf.py`` defines these; the family layouts
in lowering/weight_names.py and ir/hf_write.py call them for the kind of each layer:

    DECODER_SLOT: int | None        the block's place in a llama-family decoder layer (0: first,
                                    attention; 1: second, the feed-forward); None: never in one
    DECODER_NORM: str               its pre-norm's name in such a decoder layer
    llama_names(spec, p, local) -> list[Recipe]
                                    checkpoint recipes (ir/hf_recipes.py; alternatives, the first
                                    whose tensors exist wins) for the reference parameter
                                    ``mixer.<local>`` of a llama-family decoder layer at prefix p
    hybrid_names(spec, p, local) -> list[Recipe]
                                    the same for a Nemotron-H block at prefix p
    nemotron_h_fields(spec) -> dict the Nemotron-H config fields that describe the block (export)

Imports only ir.
"""
from __future__ import annotations

from plait.ir.hf_recipes import Ref
from plait.ir.model import ModelSpec

from .hf_window import read_window, window_fields  # noqa: F401  (the llama-like families' windows)

DECODER_SLOT = 0
DECODER_NORM = "input_layernorm."


def llama_names(spec: ModelSpec, p: str, local: str) -> list:
    return [Ref(p + "self_attn." + local)]


def hybrid_names(spec: ModelSpec, p: str, local: str) -> list:
    return [Ref(p + "mixer." + local)]


def nemotron_h_fields(spec: ModelSpec) -> dict:
    """transformers' Nemotron-H attention: no biases, no positions."""
    a = spec.attention
    return dict(num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
                attention_bias=False)
