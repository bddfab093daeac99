"""Importance of a model's structures from forward passes on calibration data (Minitron, Muralidharan
et al. 2024), collected with forward hooks on the reference model:

    embedding channels   every norm's output (the layers' pre-norms and the final norm), per norm
                         aggregated then summed over norms
    ffn neurons          the input of down_proj
    attention heads      the input of o_proj, L2 over each head's channels
    mamba heads          the x segment of in_proj's output, L2 over each head's channels
    mamba head channels  the same x segment, L2 over the heads (one ranking shared by all heads)
    moe experts          mean L2 norm of an expert's output per token routed to it
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
        self.expert_sum: dict[int, torch.Tensor] = {}
        self.expert_tokens: dict[int, torch.Tensor] = {}
        self.cos_sum = [0.0] * len(model.layers)
        self.tokens = [0] * len(model.layers)
        self.handles = []

    def attach(self) -> None:
        m = self.model
        for i, layer in enumerate(m.layers):
            self._hook(layer.norm, self._norm(i))
            self._hook(layer, self._depth(i))
            mixer = layer.mixer
            if layer.kind == "mlp":
                self._pre(mixer.down_proj, self._ffn(i))
            elif layer.kind == "attention":
                self._pre(mixer.o_proj, self._heads(i, mixer.head_dim))
            elif layer.kind == "mamba":
                self._hook(mixer.in_proj, self._mamba(i, mixer))
            elif layer.kind == "moe":
                self._hook(mixer.experts, self._experts(i))
        self._hook(m.final_norm, self._norm(len(m.layers)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()

    def reduce(self, sum_over_ranks: "Reduce") -> None:
        """Sum every accumulator over the ranks that scored other batches (all are sums, so the
        result is what one process scoring every batch accumulates)."""
        sums = [a for a in self.norms + self.units + self.channels if a.sq is not None]
        experts = sorted(self.expert_sum)
        parts = [a.sq for a in sums] + [self.expert_sum[i] for i in experts] \
            + [self.expert_tokens[i] for i in experts] \
            + [torch.tensor(self.cos_sum, dtype=torch.float64), torch.tensor(self.tokens, dtype=torch.float64)]
        total = iter(sum_over_ranks(torch.cat([t.flatten() for t in parts])).split([t.numel() for t in parts]))
        for a in sums:
            a.sq = next(total).view_as(a.sq)
        for i in experts:
            self.expert_sum[i] = next(total)
        for i in experts:
            self.expert_tokens[i] = next(total)
        self.cos_sum = next(total).tolist()
        self.tokens = [int(round(v)) for v in next(total).tolist()]

    def _hook(self, module, fn):
        self.handles.append(module.register_forward_hook(fn))

    def _pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(fn))

    def _norm(self, i):
        return lambda mod, args, out: self.norms[i].add(out.abs())

    def _ffn(self, i):
        return lambda mod, args: self.units[i].add(args[0].abs())

    def _heads(self, i, head_dim):
        def hook(mod, args):
            x = args[0]
            self.units[i].add(x.unflatten(-1, (-1, head_dim)).norm(dim=-1))
        return hook

    def _mamba(self, i, mixer):
        def hook(mod, args, out):
            d_inner = mixer.out_proj.weight.shape[1]
            x = out[..., d_inner:2 * d_inner].unflatten(-1, (-1, mixer.head_dim))  # [b, s, heads, p]
            self.units[i].add(x.norm(dim=-1))
            self.channels[i].add(x.norm(dim=-2))
        return hook

    def _experts(self, i):
        def hook(mod, args, out):
            counts = args[1]
            owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
            norms = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, owner.cpu(), out.norm(dim=-1).double().cpu())
            self.expert_sum[i] = self.expert_sum.get(i, 0) + norms
            self.expert_tokens[i] = self.expert_tokens.get(i, 0) + counts.double().cpu()
        return hook

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
    layers = []
    for i, kind in enumerate(spec.layers):
        if kind == "moe":
            units = c.expert_sum[i] / c.expert_tokens[i].clamp(min=1)
        else:
            units = c.units[i].result()
        channels = c.channels[i].result() if kind == "mamba" else None
        layers.append(LayerScores(i, kind, _floats(units), _floats(channels), float(blocks[i])))
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

def _rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """Squared L2 norms of ``n`` equal consecutive row blocks of ``w`` [rows, cols]."""
    return w.double().square().reshape(n, -1).sum(dim=1)


def _cols(w: torch.Tensor, n: int) -> torch.Tensor:
    return _rows(w.t(), n)


@torch.no_grad()
def magnitude_scores(model: nn.Module, spec: ModelSpec) -> ImportanceScores:
    """L2 norms of the weights that read and write each structure."""
    hidden = model.embed.weight.double().square().sum(dim=0)
    layers = []
    for i, layer in enumerate(model.layers):
        mixer, channels = layer.mixer, None
        if layer.kind == "mlp":
            units = _rows(mixer.up_proj.weight, mixer.up_proj.weight.shape[0]) + _cols(mixer.down_proj.weight, mixer.down_proj.weight.shape[1])
            if mixer.gated:
                units = units + _rows(mixer.gate_proj.weight, mixer.gate_proj.weight.shape[0])
        elif layer.kind == "attention":
            heads = mixer.q_proj.weight.shape[0] // mixer.head_dim
            units = _rows(mixer.q_proj.weight, heads) + _cols(mixer.o_proj.weight, heads)
        elif layer.kind == "mamba":
            units, channels = _mamba_magnitude(mixer)
        else:
            e = mixer.experts
            units = e.w_gate_up.double().square().sum(dim=(1, 2)) + e.w_down.double().square().sum(dim=(1, 2))
        block = sum(float(p.double().square().sum()) for p in mixer.parameters())
        layers.append(LayerScores(i, layer.kind, _floats(units.sqrt()),
                                  _floats(None if channels is None else channels.sqrt()), block ** 0.5))
    return ImportanceScores(spec.name, "magnitude", _floats(hidden.sqrt()), tuple(layers))


def _mamba_magnitude(mixer) -> tuple[torch.Tensor, torch.Tensor]:
    d_inner, p = mixer.out_proj.weight.shape[1], mixer.head_dim
    heads = d_inner // p
    w = mixer.in_proj.weight.double()
    zx = w[:d_inner].square().sum(dim=1) + w[d_inner:2 * d_inner].square().sum(dim=1)
    zx = zx + mixer.out_proj.weight.double().square().sum(dim=0)  # [d_inner] per (head, channel)
    per = zx.reshape(heads, p)
    return per.sum(dim=1), per.sum(dim=0)
