"""Building blocks of the single-device reference model (the numerical ground truth)."""
from .attention import SelfAttention
from .experts import GroupedExperts
from .mamba import Mamba2Mixer
from .mlp import FeedForward
from .model import CausalLM, Layer
from .moe import MoEBlock, update_expert_bias
from .norms import GatedRMSNorm, RMSNorm, make_norm

__all__ = ["CausalLM", "Layer", "SelfAttention", "FeedForward", "MoEBlock", "GroupedExperts", "Mamba2Mixer",
           "RMSNorm", "GatedRMSNorm", "make_norm", "update_expert_bias"]
