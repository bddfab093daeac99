"""Sliding-window attention in Hugging Face configs, both ways (part of attention's hf facet):
which decoder layers of a llama-like family attend within a window, as transformers (5.x) builds
that family's model.

  mistral, mixtral   every layer, window = sliding_window (null: none; Mistral's class default is
                     4096). MistralModel ignores layer_types (it only warns), so plait does too.
  qwen2, qwen3       window = sliding_window if use_sliding_window; layer i slides when layer_types
                     says "sliding_attention", by default when i >= max_window_layers (the bottom
                     max_window_layers keep full attention).
  qwen2_moe          the same from layer_types; its default slides the even layers i below
                     max_window_layers (transformers' Qwen2MoeConfig rule).
  qwen3_moe          every layer when use_sliding_window (its modeling reads no layer_types).

In the IR the window is an attribute of the attention block (ir/model.py: Attention.window, and
full_layers, the attention layers that keep full attention). A window is mask-only: it changes no
weight, so the weight names and parameter counts are those of the family without one.
"""
from __future__ import annotations

from typing import Optional

from plait.ir.errors import PlaitError
from plait.ir.model import ModelSpec

from .windows import attention_windows

LAYER_TYPES = ("full_attention", "sliding_attention")
EVERY_LAYER = ("mistral", "mixtral", "qwen3_moe")  # one window for all layers, no layer_types


def _window_size(c) -> Optional[int]:
    """The window transformers' config class keeps (None: no sliding layers at all)."""
    if c.model_type in ("mistral", "mixtral"):
        window = c.get("sliding_window")
    else:  # the Qwen classes keep sliding_window only when use_sliding_window is set
        use = c.expect("use_sliding_window", (True, False), False, "use_sliding_window is a boolean")
        window = c.get("sliding_window") if use else None
        c.ignore("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise c.error("sliding_window", window, "a window is a positive number of tokens")
    return window


def _layer_types(c, num_layers: int, window: Optional[int]) -> list[str]:
    if c.model_type == "mistral":
        c.ignore("layer_types")  # MistralModel applies sliding_window to every layer regardless
    if c.model_type in EVERY_LAYER:
        return [LAYER_TYPES[window is not None]] * num_layers
    bottom = int(c.get("max_window_layers", 28))
    if c.model_type == "qwen2_moe":
        default = [LAYER_TYPES[window is not None and i % 2 == 0 and i < bottom] for i in range(num_layers)]
    else:
        default = [LAYER_TYPES[window is not None and i >= bottom] for i in range(num_layers)]
    types = list(c.get("layer_types") or default)
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown or len(types) != num_layers:
        raise c.error("layer_types", types, f"one of {' / '.join(LAYER_TYPES)} per layer "
                                            f"({num_layers} layers)")
    if window is None and "sliding_attention" in types:
        raise c.error("layer_types", sorted(set(types)),
                      "sliding layers need use_sliding_window = true and a sliding_window")
    return types


def read_window(c, num_layers: int) -> tuple[Optional[int], tuple[int, ...]]:
    """(window, full_layers) of a llama-like config's decoder layers: (None, ()) without sliding."""
    if c.model_type == "llama":  # LlamaModel has no window: a config that sets one is a mistake
        c.expect("sliding_window", (None,), None, "llama has no sliding window; is it a mistral config?")
        return None, ()
    if c.model_type == "qwen3_moe":
        c.ignore("max_window_layers")  # older configs carry it; Qwen3-MoE's modeling never reads it
    window = _window_size(c)
    types = _layer_types(c, num_layers, window)
    if "sliding_attention" not in types:
        return None, ()
    return window, tuple(i for i, t in enumerate(types) if t == "full_attention")


def window_fields(spec: ModelSpec, family: str) -> dict:
    """The config keys that give ``spec``'s attention windows to ``family`` (read back by
    read_window; a family that cannot say it fails hf_write's round-trip check)."""
    a = spec.attention
    if family in ("mistral", "mixtral"):  # explicit null: mistral's class would default to 4096
        return {"sliding_window": a.window}
    if family == "llama":
        if a.window is not None:
            raise PlaitError("llama configs have no sliding window",
                             hint="export as mistral (or qwen2 with qkv biases)")
        return {}
    out = {"use_sliding_window": a.window is not None, "sliding_window": a.window}
    if a.window is not None and family != "qwen3_moe":
        out["layer_types"] = [LAYER_TYPES[w is not None] for w in attention_windows(spec)]
        prefix = a.full_layers == tuple(range(len(a.full_layers)))
        if family in ("qwen2", "qwen3") and prefix:  # what transformers before layer_types read
            out["max_window_layers"] = len(a.full_layers)
    return out
