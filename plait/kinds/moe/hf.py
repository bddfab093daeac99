"""The MoE block's hf facet: checkpoint names of the router, its expert bias, the routed experts
(transformers' fused gate_up_proj / down_proj, or per-expert tensors stacked: Qwen-MoE's
mlp.experts.{e}, Mixtral's block_sparse_moe w1/w3/w2, Nemotron-H's mixer.experts.{e}) and the
shared expert (+ gate), and Nemotron-H's MoE config fields. The protocol is at the top of
plait/kinds/attention/hf.py. Imports only ir."""
from __future__ import annotations

from plait.ir.errors import PlaitError
from plait.ir.hf_recipes import Cat, Ref, Stack
from plait.ir.model import ModelSpec

DECODER_SLOT = 1
DECODER_NORM = "post_attention_layernorm."


def llama_names(spec: ModelSpec, p: str, local: str) -> list:
    experts = range(spec.moe.experts)
    if local == "router.weight":
        return [Ref(p + "mlp.gate.weight"), Ref(p + "block_sparse_moe.gate.weight")]
    if local == "expert_bias":
        return [Ref(p + "mlp.gate.e_score_correction_bias")]
    if local == "experts.w_gate_up":
        per_expert = [(p + "mlp.experts.{}.gate_proj.weight", p + "mlp.experts.{}.up_proj.weight"),
                      (p + "block_sparse_moe.experts.{}.w1.weight", p + "block_sparse_moe.experts.{}.w3.weight")]
        if not spec.moe.gated:
            per_expert = [(p + "mlp.experts.{}.up_proj.weight",)]
        return [Ref(p + "mlp.experts.gate_up_proj"), Ref(p + "mlp.experts.up_proj")] + [
            Stack(tuple(Cat(0, tuple(Ref(f.format(e)) for f in fmt)) for e in experts)) for fmt in per_expert]
    if local == "experts.w_down":
        return [Ref(p + "mlp.experts.down_proj")] + [
            Stack(tuple(Ref(f.format(e)) for e in experts))
            for f in (p + "mlp.experts.{}.down_proj.weight", p + "block_sparse_moe.experts.{}.w2.weight")]
    if local.startswith("shared."):
        return [Ref(p + "mlp.shared_expert." + local.split(".", 1)[1]),
                Ref(p + "mlp.shared_experts." + local.split(".", 1)[1])]  # DeepSeek-V3
    if local.startswith("shared_gate."):
        return [Ref(p + "mlp.shared_expert_gate." + local.split(".", 1)[1])]
    raise PlaitError(f"no checkpoint name for MoE parameter {local!r}")


def hybrid_names(spec: ModelSpec, p: str, local: str) -> list:
    m = p + "mixer."
    experts = range(spec.moe.experts)
    table = {
        "router.weight": [Ref(m + "gate.weight")],
        "expert_bias": [Ref(m + "gate.e_score_correction_bias")],
        "experts.w_gate_up": [Ref(m + "experts.up_proj"),
                              Stack(tuple(Ref(f"{m}experts.{e}.up_proj.weight") for e in experts))],
        "experts.w_down": [Ref(m + "experts.down_proj"),
                           Stack(tuple(Ref(f"{m}experts.{e}.down_proj.weight") for e in experts))],
    }
    if local.startswith("shared."):
        return [Ref(m + "shared_experts." + local.split(".", 1)[1])]
    if local not in table:
        raise PlaitError(f"no checkpoint name for MoE parameter {local!r}")
    return table[local]


def nemotron_h_fields(spec: ModelSpec) -> dict:
    e = spec.moe
    return dict(n_routed_experts=e.experts, num_experts_per_tok=e.top_k,
                moe_intermediate_size=e.ffn, moe_shared_expert_intermediate_size=e.shared_ffn,
                n_shared_experts=1, norm_topk_prob=e.norm_topk, n_group=e.groups,
                topk_group=e.topk_groups, routed_scaling_factor=e.scaling_factor,
                router_aux_loss_coef=e.aux_loss)
