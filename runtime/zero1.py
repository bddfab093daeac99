"""ZeRO-1 (Megatron's distributed optimizer): gradients reduce-scattered into flat per-rank shards,
AdamW on this rank's fp32 shard of every parameter group, updated shards all-gathered back into the
parameters. In every precision the gradients accumulate in one fp32 buffer per group
(Megatron-Core's contiguous gradient buffer; fp64 for the fp64 parity checks) and the
reduce-scatter writes the rank's shard into it: that shard is the master's gradient, no tensor of
its own. The updated shards are gathered in the parameters' own dtype, as Megatron-Core's distributed optimizer gathers its bf16 parameter buffer:
the bytes the cost model prices (counts.dp_traffic_bytes), half those of the fp32 masters. A group
holds parameters of one dtype (the few a bf16 model keeps in fp32 form groups of their own), so
nothing is gathered coarser than it is stored (see runtime/optim.py for the common parts)."""
from __future__ import annotations

import torch
from torch import nn

from plait.lowering import collectives as cc

from .main_grads import MainGrads
from .optim import (GRAD_AXIS, DataParallel, accumulator_dtype, adamw, param_groups, set_lr,
                    squared_norm)


class _FlatShard:
    """One parameter group flattened, padded to a multiple of the replica count ``dp`` of mesh
    axis ``axis``, and this rank's 1/dp of it; gradients are summed over the axis and divided by
    ``divisor`` (dp * cp)."""

    def __init__(self, params: list[nn.Parameter], dp: int, dp_rank: int, axis: str = GRAD_AXIS,
                 divisor: int | None = None):
        self.params, self.dp, self.dp_rank = params, dp, dp_rank
        self.axis, self.divisor = axis, dp if divisor is None else divisor
        self.numel = sum(p.numel() for p in params)
        self.size = -(-self.numel // dp)  # ceil
        self.device = params[0].device if params else torch.device("cpu")
        self.dtype = accumulator_dtype(params)
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise ValueError("a ZeRO-1 group holds parameters of one dtype, got "
                             f"{sorted(map(str, dtypes))}")
        self.param_dtype = dtypes.pop() if dtypes else self.dtype
        flat = self.flatten([p.detach() for p in params])
        self.master = nn.Parameter(flat[dp_rank * self.size:(dp_rank + 1) * self.size].clone())
        # one buffer (fp32, or fp64 for fp64 parameters) holds every parameter's gradient (views
        # below): the reduce-scatter runs on it in place, no flat copy of the gradients per step
        self.grad_buffer = self.flatten([])

    def grad_views(self, names: list[str]) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, p in zip(names, self.params):
            out[name] = self.grad_buffer[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
        return out

    def flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``tensors`` (one per parameter, in order) laid end to end in a zero-padded buffer of
        ``dp`` equal shards: the layout the master shards and the gradient buffer share."""
        flat = torch.zeros(self.size * self.dp, dtype=self.dtype, device=self.device)
        if tensors:
            flat[:self.numel] = torch.cat([t.flatten().to(self.dtype) for t in tensors])
        return flat

    def reduce_grad(self) -> None:
        """Reduce-scatter the gradient buffer into its own shard: the master's gradient."""
        mine = cc.reduce_scatter(self.grad_buffer, 0, self.axis) if self.dp > 1 else self.grad_buffer
        shard = self.grad_buffer[self.dp_rank * self.size:(self.dp_rank + 1) * self.size]
        shard.copy_(mine / self.divisor)
        self.master.grad = shard

    def publish(self) -> None:
        """All-gather the updated shards in the parameters' dtype (each rank rounds its own fp32
        shard: the values the parameters would hold after a copy from the fp32 masters) and
        write them into the model's parameters."""
        shard = self.master.detach().to(self.param_dtype)
        full = cc.all_gather(shard, 0, self.axis) if self.dp > 1 else shard
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(full[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def full_grad(self) -> torch.Tensor:
        g = self.master.grad.detach()
        return cc.all_gather(g, 0, self.axis) if self.dp > 1 else g


def by_dtype(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """``params`` split by dtype, each part in the given order, parts in order of first appearance."""
    parts: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        parts.setdefault(p.dtype, []).append(p)
    return list(parts.values())


class ZeroOne(DataParallel):
    """Distributed optimizer (ZeRO stage 1): AdamW state for 1/dp of every parameter group."""

    def __init__(self, program, mesh, spec, policy=None):
        super().__init__(program, mesh, spec, policy)
        self.flats, decay, views = [], [], {}
        for axis, weight_decay, group in self._groups(spec.weight_decay):
            params = [self.named[n] for n in group]
            flat = _FlatShard(params, mesh.size(axis), mesh.coord(axis), axis, self.dp)
            self.flats.append(flat)
            decay.append(weight_decay)
            views.update(flat.grad_views(group))
        # every precision accumulates into the flat buffers (Megatron-Core's contiguous gradient
        # buffer): each micro-batch's gradient is added in as autograd finishes it
        self.main = MainGrads(self.named, views, 1.0 / program.plan.num_microbatches)
        self.masks = [self._norm_owned_mask(f) for f in self.flats]
        self.optimizer = adamw([{"params": [f.master], "weight_decay": wd}
                                for f, wd in zip(self.flats, decay)], spec)

    def _groups(self, weight_decay: float) -> list[tuple[str, float, list[str]]]:
        """(axis, weight decay, parameter names) of each flat shard: the optimizer's parameter
        groups, split by the axis their gradients are summed over, then by dtype."""
        names = {id(p): n for n, p in self.named.items()}
        out = []
        for g in param_groups(self.named.items(), weight_decay):
            for axis, group in self.by_axis(names[id(p)] for p in g["params"]):
                for params in by_dtype([self.named[n] for n in group]):
                    out.append((axis, g["weight_decay"], [names[id(p)] for p in params]))
        return out

    def reduce_over_dp(self) -> None:
        for flat in self.flats:
            flat.reduce_grad()

    def owned_sq_sum(self) -> torch.Tensor:
        """Each DP rank owns its shard; within it, TP-replicated elements count on TP rank 0."""
        total = torch.zeros((), dtype=self.acc_dtype, device=self.mesh.device)
        for flat, mask in zip(self.flats, self.masks):
            g = flat.master.grad
            total += squared_norm(g, g.dtype) if mask is None else (g.pow(2) * mask).sum()
        return total

    def _norm_owned_mask(self, flat: _FlatShard) -> torch.Tensor | None:
        """1 where this rank counts the shard's element, 0 where another TP rank does; None when
        it counts all of them (no multiply: a pass over the shard saved, ir/counts CLIP_BYTES)."""
        names = {id(p): n for n, p in self.named.items()}
        if all(self._norm_owned(names[id(p)]) for p in flat.params):
            return None
        owned = flat.flatten([torch.full_like(p, float(self._norm_owned(names[id(p)])))
                               for p in flat.params])
        return owned[flat.dp_rank * flat.size:(flat.dp_rank + 1) * flat.size]

    def step(self, coef: torch.Tensor) -> None:
        for flat in self.flats:
            flat.master.grad.mul_(coef)
        self.optimizer.step()
        for flat in self.flats:
            flat.publish()

    def zero_grad(self) -> None:
        super().zero_grad()
        for flat in self.flats:
            flat.master.grad = None
            flat.grad_buffer.zero_()  # the reduced shard was written into it too

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        out = super().state_tensors()
        # every gradient is a view of its group's buffer: count the buffers
        out["grads"] = [f.grad_buffer for f in self.flats]
        out["master"] = [f.master for f in self.flats]
        out["master_grads"] = [f.master.grad for f in self.flats]
        return out

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def reduced_grads(self) -> dict[str, torch.Tensor]:
        out = {}
        names = {id(p): n for n, p in self.named.items()}
        for flat in self.flats:
            full, offset = flat.full_grad(), 0
            for p in flat.params:
                out[names[id(p)]] = full[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        return out
