"""Building blocks of the single-device reference model (the numerical ground truth)."""
from .attention import SelfAttention
from .mlp import FeedForward
from .model import CausalLM, Layer
from .norms import GatedRMSNorm, RMSNorm, make_norm

__all__ = ["CausalLM", "Layer", "SelfAttention", "FeedForward", "RMSNorm", "GatedRMSNorm", "make_norm"]
