"""Importance of a model's structures from forward passes on calibration data (Minitron, Muralidharan
et al. 2024), collected with forward hooks on the reference model:

    embedding channels   every norm's output (the layers' pre-norms and the final norm), per norm
                         aggregated then summed over norms
    a layer's units      its kind's ``importance_hooks`` (prune facet, plait/kinds/<kind>/prune.py):
                         ffn neurons at down_proj's input, attention heads at o_proj's input (L2
                         over each head's channels), mamba heads and head channels on the x
                         segment of in_proj's output, moe experts as the mean L2 norm of an
                         expert's output per token routed to it
    depth                1 - cos(layer input, layer output), mean over tokens; or ("perplexity")
                         the loss increase when the layer is skipped

Activation scores aggregate as Minitron's best setting: mean of |activation| over the sequence,
then L2 over the batch (sum of squares over every calibration batch, square root at the end).

``magnitude_scores`` is the weight-only baseline: the L2 norm of the weights that read and write
each structure.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from plait.ir import kinds
from plait.ir.model import ModelSpec
from plait.planner.prune.scores import ImportanceScores, LayerScores

Reduce = Callable[[torch.Tensor], torch.Tensor]  # a float64 vector summed over data-parallel ranks


class _SeqBatch:
    """Sum over batches of (mean over the sequence of a [b, s, n] score)^2, per channel n."""

    def __init__(self):
        self.sq: Optional[torch.Tensor] = None

    def add(self, per_token: torch.Tensor) -> None:  # [b, s, n], already non-negative
        agg = per_token.double().mean(dim=1).square().sum(dim=0)
        self.sq = agg if self.sq is None else self.sq + agg

    def result(self) -> torch.Tensor:
        return self.sq.sqrt()


class _Collector:
    """The hooks of one calibration run and what they accumulated."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.norms = [_SeqBatch() for _ in range(len(model.layers) + 1)]
        self.units = [_SeqBatch() for _ in model.layers]
        self.channels = [_SeqBatch() for _ in model.layers]
        self.routed_sum: dict[int, torch.Tensor] = {}  # "routed" scores (experts): sums, tokens per unit
        self.routed_tokens: dict[int, torch.Tensor] = {}
        self.cos_sum = [0.0] * len(model.layers)
        self.tokens = [0] * len(model.layers)
        self.handles = []

    def attach(self) -> None:
        m = self.model
        for i, layer in enumerate(m.layers):
            self._hook(layer.norm, self._norm(i))
            self._hook(layer, self._depth(i))
            for module, reads, measure in kinds.facet(layer.kind, "prune").importance_hooks(layer.mixer):
                if reads == "input":
                    self._pre(module, lambda mod, args, i=i, measure=measure: self._add(i, measure(args, None)))
                else:
                    self._hook(module, lambda mod, args, out, i=i, measure=measure: self._add(i, measure(args, out)))
        self._hook(m.final_norm, self._norm(len(m.layers)))

    def _add(self, i: int, measured: dict) -> None:
        """One hook's scores of layer ``i``: per-token unit / channel scores, or routed sums."""
        for field, value in measured.items():
            if field == "routed":
                sums, tokens = value
                self.routed_sum[i] = self.routed_sum.get(i, 0) + sums
                self.routed_tokens[i] = self.routed_tokens.get(i, 0) + tokens
            else:
                {"units": self.units, "channels": self.channels}[field][i].add(value)

    def unit_scores(self, i: int) -> torch.Tensor:
        if i in self.routed_sum:  # a mean over the tokens routed to each unit
            return self.routed_sum[i] / self.routed_tokens[i].clamp(min=1)
        return self.units[i].result()

    def channel_scores(self, i: int) -> Optional[torch.Tensor]:
        return self.channels[i].result() if self.channels[i].sq is not None else None

    def detach(self) -> None:
        for h in self.handles:
            h.remove()

    def reduce(self, sum_over_ranks: "Reduce") -> None:
        """Sum every accumulator over the ranks that scored other batches (all are sums, so the
        result is what one process scoring every batch accumulates)."""
        sums = [a for a in self.norms + self.units + self.channels if a.sq is not None]
        routed = sorted(self.routed_sum)
        parts = [a.sq for a in sums] + [self.routed_sum[i] for i in routed] \
            + [self.routed_tokens[i] for i in routed] \
            + [torch.tensor(self.cos_sum, dtype=torch.float64), torch.tensor(self.tokens, dtype=torch.float64)]
        total = iter(sum_over_ranks(torch.cat([t.flatten() for t in parts])).split([t.numel() for t in parts]))
        for a in sums:
            a.sq = next(total).view_as(a.sq)
        for i in routed:
            self.routed_sum[i] = next(total)
        for i in routed:
            self.routed_tokens[i] = next(total)
        self.cos_sum = next(total).tolist()
        self.tokens = [int(round(v)) for v in next(total).tolist()]

    def _hook(self, module, fn):
        self.handles.append(module.register_forward_hook(fn))

    def _pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(fn))

    def _norm(self, i):
        return lambda mod, args, out: self.norms[i].add(out.abs())

    def _depth(self, i):
        def hook(mod, args, out):
            x = args[0]
            cos = F.cosine_similarity(x.double(), out.double(), dim=-1)
            self.cos_sum[i] += float((1 - cos).sum())
            self.tokens[i] += cos.numel()
        return hook


@contextmanager
def _collecting(model: nn.Module):
    c = _Collector(model)
    c.attach()
    try:
        yield c
    finally:
        c.detach()


@torch.no_grad()
def activation_scores(model: nn.Module, spec: ModelSpec, batches: Iterable[torch.Tensor],
                      depth: str = "cosine", reduce: Optional[Reduce] = None) -> ImportanceScores:
    """Minitron's activation importance of ``model`` (the reference module of ``spec``) over the
    token batches ``batches`` ([b, s] LongTensors). Data parallel: each rank passes its own
    batches and ``reduce`` (a sum of a float64 vector over the ranks); every rank gets the scores
    of all the batches."""
    model.eval()
    batches = list(batches)
    with _collecting(model) as c:
        for tokens in batches:
            model(tokens)
    if reduce is not None:
        c.reduce(reduce)
    hidden = sum(n.result() for n in c.norms)
    blocks = [c.cos_sum[i] / max(1, c.tokens[i]) for i in range(len(model.layers))]
    if depth == "perplexity":
        blocks = _loss_increase(model, batches, reduce)
    layers = [LayerScores(i, kind, _floats(c.unit_scores(i)), _floats(c.channel_scores(i)), float(blocks[i]))
              for i, kind in enumerate(spec.layers)]
    tokens = sum(int(t.numel()) for t in batches)
    if reduce is not None:
        tokens = int(reduce(torch.tensor([float(tokens)], dtype=torch.float64))[0])
    return ImportanceScores(spec.name, "activation", _floats(hidden), tuple(layers), tokens)


def _loss_increase(model: nn.Module, batches: list[torch.Tensor], reduce: Optional[Reduce] = None) -> list[float]:
    """Per layer: mean next-token loss with the layer skipped minus the full model's (>= 0)."""
    def loss_sum() -> float:
        return sum(float(model(t[:, :-1], t[:, 1:])) for t in batches)

    sums = [loss_sum()]
    for layer in model.layers:
        handle = layer.register_forward_hook(lambda mod, args, o: args[0])  # the layer becomes identity
        try:
            sums.append(loss_sum())
        finally:
            handle.remove()
    totals = torch.tensor(sums + [float(len(batches))], dtype=torch.float64)
    if reduce is not None:
        totals = reduce(totals)
    means = (totals[:-1] / totals[-1]).tolist()
    return [max(0.0, m - means[0]) for m in means[1:]]


def _floats(t: Optional[torch.Tensor]) -> tuple[float, ...]:
    return () if t is None else tuple(float(v) for v in t.flatten().tolist())


# ------------------------------------------------------------------------------------------------
# The weight-magnitude baseline
# ------------------------------------------------------------------------------------------------

def row_squares(w: torch.Tensor, n: int) -> torch.Tensor:
    """Squared L2 norms of ``n`` equal consecutive row blocks of ``w`` [rows, cols]."""
    return w.double().square().reshape(n, -1).sum(dim=1)


def col_squares(w: torch.Tensor, n: int) -> torch.Tensor:
    return row_squares(w.t(), n)


@torch.no_grad()
def magnitude_scores(model: nn.Module, spec: ModelSpec) -> ImportanceScores:
    """L2 norms of the weights that read and write each structure (each kind's ``magnitude``)."""
    hidden = model.embed.weight.double().square().sum(dim=0)
    layers = []
    for i, layer in enumerate(model.layers):
        units, channels = kinds.facet(layer.kind, "prune").magnitude(layer.mixer)
        block = sum(float(p.double().square().sum()) for p in layer.mixer.parameters())
        layers.append(LayerScores(i, layer.kind, _floats(units.sqrt()),
                                  _floats(None if channels is None else channels.sqrt()), block ** 0.5))
    return ImportanceScores(spec.name, "magnitude", _floats(hidden.sqrt()), tuple(layers))
