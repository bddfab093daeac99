"""The expert-parallel MoE mixer: the reference MoEBlock's computation on this rank's tokens, with
only this rank's EP x ETP shard of the routed experts, and a token dispatcher in between.

    router (fp32, replicated) -> route + aux/z loss -> capacity drop on local tokens
      -> dispatcher.dispatch -> grouped expert MLPs (local experts, FFN slice) -> dispatcher.combine
      -> + shared expert (a dense MLP: TP-sharded under TP, see below) -> attach aux loss

Tokens of one reference call (a micro-batch) may be split over a *token group*: the TP ranks of a
sequence-parallel region and the CP ranks (each holding its two zigzag chunks of every sequence;
folded into EP they are ordinary token sources). The aux loss then uses the group's total token
counts (summed over TP, then over CP: the TP x CP group), and each rank's share of it sums to the
reference value -- times cp, because dense gradients are *averaged* over DP x CP (CP ranks are
loss replicas like DP ones) while TP partial gradients are summed. Capacity is per rank, on its
local tokens, as the reference's ``capacity_segments`` / ``capacity_cp`` model it.

Under TP (always with sequence parallelism) the shared expert is a dense MLP sharded over TP as
Megatron-Core's SharedExpertMLP is: the shard_tensor_parallel pass gives each rank its gate / up
rows (column-parallel) and down columns (row-parallel) and sets ``shared_tp``; the rank then
all-gathers the TP group's tokens, runs its FFN slice on all of them and reduce-scatters the partial
sums back to its own tokens. The router and the shared expert's sigmoid gate stay replicated over
TP (Megatron's too), each rank applying them to its own tokens.

Gradients (see ``grad_groups``): expert weights are summed over EDP and scaled by 1/(dp*cp) as
Megatron's DDP does; the router and gate are dense replicated parameters (summed over the token
group, then averaged over DP x CP); the TP-sharded shared expert is a dense TP shard (averaged over
DP x CP only: its reduce-scatter already summed every token's contribution).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from plait.ir import kinds
from plait.ir.job import MoEOptions
from plait.ir.model import MoE
from plait.lowering import collectives  # noqa: F401  (registers torch.ops.plait.gather_seq / scatter_seq)
from plait.lowering.modules import routing
from plait.lowering.modules.experts import GroupedExperts, expert_mlp
from plait.lowering.modules.moe import MoEBlock, add_moe_parts, router_logits, add_shared_expert, attach_aux_loss
from plait.lowering.recompute import is_recomputing

from . import comm
from .dispatch import ExpertGrid, make_dispatcher
from .permute import drop_over_capacity
from .sync import expert_slices, take

EXPERT_PARAMS = ("experts.w_gate_up", "experts.w_down")


def shard_experts(w_gate_up: torch.Tensor, w_down: torch.Tensor, grid: ExpertGrid, gated: bool):
    """Full grouped weights [E, 2F|F, H], [E, H, F] -> this rank's [E/ep, (2F|F)/etp, H],
    [E/ep, H, F/etp]: experts of its EP rank, FFN columns of its ETP rank (gate and up rows are
    sliced alike so the local gate/up halves stay paired)."""
    up = take(w_gate_up, expert_slices(grid, "w_gate_up", tuple(w_gate_up.shape), gated))
    down = take(w_down, expert_slices(grid, "w_down", tuple(w_down.shape), gated))
    return up.clone(), down.clone()


class ExpertParallelMoE(nn.Module):
    fp32_params = ("router.weight", "expert_bias")

    def __init__(self, spec: MoE, hidden: int, grid: ExpertGrid, options: Optional[MoEOptions] = None,
                 token_axes: tuple[str, ...] = (), token_parts: int = 1, averaged_parts: int = 1):
        super().__init__()
        options = options or MoEOptions()
        self.spec, self.grid, self.options = spec, grid, options
        # the mesh axes over which the reference call's tokens are split, their product, and the
        # part of it whose gradients are averaged rather than summed (cp)
        self.token_axes, self.token_parts, self.averaged_parts = token_axes, token_parts, averaged_parts
        self.dispatcher = make_dispatcher(options.dispatcher, grid)
        self.shared_tp: Optional[tuple[str, int]] = None  # (axis, size) once TP shards the shared expert
        problem = kinds.facet("moe", "rules").ffn_over_etp(spec.ffn, grid.etp)
        if problem:
            raise ValueError(problem)
        add_moe_parts(self, spec, hidden,
                      GroupedExperts(grid.local_experts, hidden, spec.ffn // grid.etp, spec.activation))

    @classmethod
    def from_reference(cls, block: MoEBlock, grid: ExpertGrid, options: Optional[MoEOptions] = None,
                       token_axes: tuple[str, ...] = (), token_parts: int = 1,
                       averaged_parts: int = 1) -> "ExpertParallelMoE":
        """This rank's shard of the reference ``block`` (same dtype, same values)."""
        hidden = block.router.weight.shape[1]
        with torch.device(block.router.weight.device):  # meta when compiling without storage
            m = cls(block.spec, hidden, grid, options, token_axes, token_parts, averaged_parts)
        m.to(block.experts.w_down.dtype).train(block.training)
        m.load_reference_state(block.state_dict())
        return m

    @torch.no_grad()
    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load from the full (unsharded) reference state dict of one MoE block."""
        up, down = shard_experts(state["experts.w_gate_up"], state["experts.w_down"], self.grid,
                                 self.spec.activation == "swiglu")
        local = {k: v for k, v in state.items() if k not in EXPERT_PARAMS}
        local.update({"experts.w_gate_up": up, "experts.w_down": down})
        for name in self.fp32_params:  # Megatron keeps the router and expert bias in fp32
            owner, _, leaf = name.rpartition(".")
            tensor = getattr(self.get_submodule(owner) if owner else self, leaf, None)
            if tensor is not None:
                tensor.data = tensor.data.float()
        self.load_state_dict(local, strict=True)

    def grad_groups(self) -> dict[str, str]:
        """Parameter name -> "expert" (sum over EDP, scale 1/(dp*cp)) or "dense"."""
        return {n: ("expert" if n in EXPERT_PARAMS else "dense") for n, _ in self.named_parameters()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:  # shape propagation at compile time (lowering/trace.py): [..., H] -> [..., H], no collectives
            return torch.empty_like(x)
        s = self.spec
        flat = x.reshape(-1, x.shape[-1])
        logits = router_logits(self.router, flat)
        weights, indices, aux_scores = routing.route(
            logits, self.expert_bias if s.expert_bias else None, top_k=s.top_k, router=s.router,
            pre_softmax=s.pre_softmax, norm_topk=s.norm_topk, groups=s.groups,
            topk_groups=s.topk_groups, scaling_factor=s.scaling_factor, group_top=s.group_score_top)
        counts = routing.tokens_per_expert(indices, s.experts)
        if s.expert_bias and self.training and not is_recomputing():  # count once per step
            self.expert_load.add_(counts.detach().float())
        pad_to = None
        if self.options.capacity_factor is not None:
            weights, indices = drop_over_capacity(weights, indices, s.experts,
                                                  self.options.capacity_factor, self.options.drop_policy)
            if self.options.pad_to_capacity:
                pad_to = routing.expert_capacity(flat.shape[0], s.top_k, s.experts,
                                                 self.options.capacity_factor)
        rows, local_counts, state = self.dispatcher.dispatch(flat, indices, weights, pad_to)
        y = expert_mlp(rows, local_counts, self.experts.w_gate_up, self.experts.w_down, s.activation)
        out = self.dispatcher.combine(y, state).to(x.dtype)
        out = add_shared_expert(self, s, flat, out, self._shared_expert if self.shared_tp else None)
        if s.aux_loss or s.z_loss:
            out = attach_aux_loss(out, self._aux_loss(logits, aux_scores, counts))
        return out.view_as(x)

    def _shared_expert(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's tokens through the TP-sharded shared expert: gather the group's tokens (the
        gradient is reduce-scattered back), this rank's FFN slice on all of them, then the partial
        sums reduce-scattered to this rank's tokens (the gradient is all-gathered)."""
        axis, size = self.shared_tp
        tokens = torch.ops.plait.gather_seq(flat, axis, size, 0)
        return torch.ops.plait.scatter_seq(self.shared(tokens), axis, size, 0)

    def _aux_loss(self, logits: torch.Tensor, aux_scores: torch.Tensor, counts: torch.Tensor):
        """This rank's share of the reference aux + z loss of its token group, scaled by the
        group's averaged part: the balancing loss needs the group's token counts and total T
        (local T * parts, hence share**2 on the local 1 / T**2); each rank sums only its own
        tokens' terms."""
        s = self.spec
        share, scale = 1.0 / self.token_parts, float(self.averaged_parts)
        loss = logits.new_zeros(())
        if s.aux_loss:
            for axis in self.token_axes:  # two tiny all-reduces: the group is TP x CP
                counts = comm.all_reduce_sum(counts, axis)
            balance = routing.load_balancing_loss(aux_scores, counts, s.top_k, s.aux_loss)
            loss = loss + balance * (share**2 * scale)
        if s.z_loss:
            loss = loss + routing.z_loss(logits, s.z_loss) * (share * scale)
        return loss

    def extra_repr(self) -> str:
        g = self.grid
        return (f"experts {g.first_expert}..{g.first_expert + g.local_experts - 1} of {g.experts} "
                f"(ep {g.ep_rank}/{g.ep}, etp {g.etp_rank}/{g.etp}), dispatcher={self.dispatcher.name}, "
                f"capacity={self.options.capacity_factor}"
                + (f", shared expert over {self.shared_tp[0]}{self.shared_tp[1]}" if self.shared_tp else ""))
