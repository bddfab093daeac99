"""The reference causal language model: embedding -> layers (pre-norm + residual, one block kind
each) -> final norm -> LM head -> mean cross-entropy.

Module names are contract C4 (TP / PP passes and weight loaders rely on them)::

    embed, pos_embed?, layers[i].norm, layers[i].mixer, final_norm, head? (absent when tied)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from plait.ir.job import MoEOptions
from plait.ir.model import ModelSpec

from .norms import make_norm, upcast


@dataclass(frozen=True)
class MixerOptions:
    """What a job adds to a block spec when its reference mixer is built (see build_model): MoE
    capacity / drop options, and the sequence chunks (and zigzag CP ranks) capacity applies to."""

    moe: MoEOptions = field(default_factory=MoEOptions)
    capacity_segments: int = 1
    capacity_cp: int = 1


class Layer(nn.Module):
    """One pre-norm residual block: ``x + mixer(norm(x))``. ``kind`` is the IR block kind."""

    def __init__(self, kind: str, norm: nn.Module, mixer: nn.Module):
        super().__init__()
        self.kind = kind
        self.norm = norm
        self.mixer = mixer

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        if positions is not None and getattr(self.mixer, "reads_positions", False):
            return x + self.mixer(self.norm(x), positions)
        return x + self.mixer(self.norm(x))

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


IGNORE_INDEX = -100  # a label the loss skips (F.cross_entropy's default ignore_index)


class CausalLM(nn.Module):
    """``document_mask``: forward takes ``positions`` (each token's position in its packed
    document) and attends within documents only. ``loss_mask``: labels equal to IGNORE_INDEX
    contribute nothing; the loss is the sum over the others divided by *all* tokens, so that
    averages over micro-batches and ranks stay linear and the runtime scales the step by
    tokens / counted tokens of the global batch (`Batch.loss_scale`)."""

    def __init__(self, spec: ModelSpec, mixers: list[nn.Module], document_mask: bool = False,
                 loss_mask: bool = False):
        super().__init__()
        self.spec = spec
        self.document_mask, self.loss_mask = document_mask, loss_mask
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        if spec.learned_positions:
            if spec.max_seq is None:
                raise ValueError(f"model {spec.name!r}: learned positions need max_seq")
            self.pos_embed = nn.Embedding(spec.max_seq, spec.hidden)
        self.layers = nn.ModuleList(
            Layer(kind, make_norm(spec.norm, spec.hidden), mixer) for kind, mixer in zip(spec.layers, mixers)
        )
        self.final_norm = make_norm(spec.norm, spec.hidden)
        self.tied = spec.tie_embeddings
        if not self.tied:
            self.head = nn.Linear(spec.hidden, spec.vocab, bias=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.final_norm(hidden)
        if self.tied:
            return F.linear(hidden, self.embed.weight)
        return self.head(hidden)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.document_mask:
            positions = None  # not an input of this model (its traced graph has no such node)
        elif positions is None:
            raise ValueError("a document-masked model needs positions (per packed document)")
        x = self.embed(tokens)
        if self.spec.learned_positions:
            where = torch.arange(tokens.shape[1], device=tokens.device) if positions is None \
                else positions
            x = x + self.pos_embed(where)
        for layer in self.layers:
            x = layer(x, positions)
        logits = self.logits(x)
        if labels is None:
            return logits
        if not self.loss_mask:
            return F.cross_entropy(upcast(logits.flatten(0, 1)), labels.flatten())
        labels = labels.flatten()
        per_token = F.cross_entropy(upcast(logits.flatten(0, 1)), labels, reduction="none")
        # where, not a product: a masked token's loss and gradient are exactly zero
        return torch.where(labels == IGNORE_INDEX, 0.0, per_token).mean()
