"""The model half of `plait export megatron`: Megatron-LM's architecture flags for a model spec
(decoder or hybrid layers, attention incl. multi-head latent attention, activation, biases,
positions, Mamba, MoE and its router), with notes where Megatron runs something close."""
from __future__ import annotations

import shlex

from plait.ir import kinds, legality
from plait.ir.errors import PlaitError
from plait.ir.model import ModelSpec
from plait.ir.plan import ParallelPlan

HYBRID_SPEC = "megatron.core.models.hybrid.hybrid_layer_specs hybrid_stack_spec"
NORMS = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}
ACTIVATION_FLAGS = {"swiglu": ["--swiglu"], "relu2": ["--squared-relu"], "gelu": []}  # gelu: default


def decoder_kinds(model: ModelSpec) -> list[str]:
    """GPT models: the second block of each decoder layer (mlp or moe); PlaitError otherwise."""
    if model.decoder_layers is None:
        raise PlaitError(f"model {model.name!r}: Megatron's GPT model needs layers of attention + "
                         "MLP/MoE pairs", hint="write it as a hybrid pattern (M * - E) with a mamba block")
    return [model.layers[i + 1] for i in range(0, model.num_layers, 2)]


def model_args(model: ModelSpec, plan: ParallelPlan, notes: list) -> list[str]:
    args = [f"--hidden-size {model.hidden}"]
    if model.is_hybrid:
        args += [f"--hybrid-layer-pattern {shlex.quote(hybrid_pattern(model, plan))}", f"--spec {HYBRID_SPEC}"]
        args += _mamba_args(model, notes)
    else:
        feed_forward = decoder_kinds(model)
        args.append(f"--num-layers {len(feed_forward)}")
        if len({_routed(k) for k in feed_forward}) > 1:  # some decoder layers MoE, some dense
            args.append(f"--moe-layer-freq {shlex.quote(moe_layer_freq(feed_forward))}")
    args += _attention_args(model, notes)
    ffn = model.mlp.ffn if model.mlp else (model.moe.ffn if model.moe else 4 * model.hidden)
    args += [f"--ffn-hidden-size {ffn}", f"--normalization {NORMS[model.norm.kind]}",
             f"--norm-epsilon {model.norm.eps:g}"]
    args += _activation_args(model, notes) + _bias_args(model, notes) + _position_args(model, notes)
    args.append(f"--max-position-embeddings {max(model.max_seq or 0, plan.seq_len)}")
    if not model.tie_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    args += ["--tokenizer-type NullTokenizer", f"--vocab-size {model.vocab}",
             "--make-vocab-size-divisible-by 1", "--attention-dropout 0", "--hidden-dropout 0"]
    if legality.divides("vocab", model.vocab, "tp", plan.layout.tp):
        notes.append(f"Megatron pads the vocabulary ({model.vocab}) to a multiple of tp = {plan.layout.tp}")
    notes.append("--tokenizer-type NullTokenizer only sizes the vocabulary: name your tokenizer "
                 "(e.g. --tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH)")
    return args


def _routed(kind: str) -> bool:
    """A layer of ``kind`` holds routed experts (an MoE layer to Megatron)."""
    return kinds.facet(kind, "counts").EXPERTS


def moe_layer_freq(feed_forward: list[str]) -> str:
    """Megatron's --moe-layer-freq list expression, run-length coded: `([0]*3+[1]*58)`."""
    runs: list[list] = []
    for k in feed_forward:
        bit = int(_routed(k))
        if runs and runs[-1][0] == bit:
            runs[-1][1] += 1
        else:
            runs.append([bit, 1])
    return "(" + "+".join(f"[{b}]*{n}" if n > 1 else f"[{b}]" for b, n in runs) + ")"


def _attention_args(model: ModelSpec, notes: list) -> list[str]:
    a = model.attention
    if a is None:  # Megatron requires a head count even without attention layers
        notes.append("the model has no attention layers; --num-attention-heads 1 only satisfies Megatron")
        return ["--num-attention-heads 1"]
    if a.latent is not None:
        return [f"--num-attention-heads {a.heads}"] + _latent_args(a, notes)
    args = [f"--num-attention-heads {a.heads}", f"--kv-channels {a.head_dim}"]
    if a.kv_heads != a.heads:
        args += ["--group-query-attention", f"--num-query-groups {a.kv_heads}"]
    if a.qk_norm:
        args.append("--qk-layernorm")
    return args


def _latent_args(a, notes: list) -> list[str]:
    """Megatron-Core's multi-latent attention; its --qk-layernorm is MLA's q/kv latent norms."""
    lat = a.latent
    args = ["--multi-latent-attention", f"--kv-lora-rank {lat.kv_lora_rank}",
            f"--qk-head-dim {lat.qk_nope_head_dim}", f"--qk-pos-emb-head-dim {lat.qk_rope_head_dim}",
            f"--v-head-dim {lat.v_head_dim}", "--qk-layernorm"]
    if lat.q_lora_rank is not None:
        args.append(f"--q-lora-rank {lat.q_lora_rank}")
    s = a.rope.scaling
    if s is not None and s.mscale is not None and s.mscale_all_dim is not None:
        args += [f"--mscale {s.mscale:g}", f"--mscale-all-dim {s.mscale_all_dim:g}"]
    if lat.rope_interleave:
        notes.append("the checkpoint's rotary dims are interleaved (DeepSeek's layout); Megatron's "
                     "converters permute them, the flags do not say it")
    return args


def _activation_args(model: ModelSpec, notes: list) -> list[str]:
    acts = {b.activation for b in (model.mlp, model.moe) if b is not None}
    if not acts:
        return []
    if len(acts) > 1:
        notes.append(f"Megatron uses one activation for dense and expert MLPs; the model has {sorted(acts)}")
    return ACTIVATION_FLAGS[sorted(acts)[0]]


def _bias_args(model: ModelSpec, notes: list) -> list[str]:
    """Megatron's default (add_bias_linear) puts biases on every linear layer, QKV included."""
    a, m = model.attention, model.mlp
    biased = [x for x in ((a and a.out_bias), (m and m.bias), (a and a.qkv_bias)) if x is not None]
    if biased and all(biased):
        return []
    if (a and a.out_bias) or (m and m.bias):
        notes.append("Megatron has biases on all linear layers or on none (but QKV); the model mixes "
                     "them: exported without linear biases")
    return ["--disable-bias-linear"] + (["--add-qkv-bias"] if a and a.qkv_bias else [])


def _position_args(model: ModelSpec, notes: list) -> list[str]:
    rope = model.attention.rope if model.attention else None
    if model.learned_positions:
        return ["--position-embedding-type learned_absolute"]
    if rope is None:
        return ["--position-embedding-type none"]
    theta = int(rope.theta)
    if theta != rope.theta:
        notes.append(f"--rotary-base is an integer in Megatron: {rope.theta:g} rounded to {theta}")
    s = rope.scaling
    if s is None:
        return ["--position-embedding-type rope", f"--rotary-base {theta}"]
    if s.kind == "yarn":
        return ["--position-embedding-type yarn", f"--rotary-base {theta}",
                f"--rotary-scaling-factor {s.factor:g}",
                f"--yarn-original-max-position-embeddings {s.original_max_positions}",
                f"--yarn-beta-fast {s.beta_fast:g}", f"--yarn-beta-slow {s.beta_slow:g}"]
    args = ["--position-embedding-type rope", f"--rotary-base {theta}"]
    if s.kind == "llama3":
        if (s.original_max_positions, s.low_freq_factor, s.high_freq_factor) != (8192, 1.0, 4.0):
            notes.append("Megatron's Llama 3 RoPE scaling fixes original_max_positions 8192, "
                         "low_freq_factor 1, high_freq_factor 4")
        return args + ["--use-rope-scaling", f"--rope-scaling-factor {s.factor:g}"]
    factor = int(s.factor)  # linear: position interpolation, an integer factor in Megatron
    if factor != s.factor:
        notes.append(f"--rotary-seq-len-interpolation-factor is an integer: {s.factor:g} rounded to {factor}")
    return args + [f"--rotary-seq-len-interpolation-factor {factor}"]


def _mamba_args(model: ModelSpec, notes: list) -> list[str]:
    m = model.mamba
    if (m.conv, m.chunk) != (4, 128):
        notes.append(f"Megatron's Mamba-2 mixer uses conv 4 and chunk 128; the model has conv {m.conv}, "
                     f"chunk {m.chunk}")
    if m.dt_min > 0:
        notes.append(f"the model floors dt at dt_min = {m.dt_min:g} in the forward (transformers' "
                     f"time_step_limit); Megatron-LM has no flag for that floor")
    return [f"--mamba-num-heads {m.heads}", f"--mamba-head-dim {m.head_dim}",
            f"--mamba-num-groups {m.groups}", f"--mamba-state-dim {m.state}"]



def stage_layers(plan: ParallelPlan) -> list[tuple[int, int]]:
    """(first, last) single layers of each (virtual) stage in Megatron's order: chunk
    virtual * pp + pp_rank."""
    pp = plan.layout.pp
    return [(s.first, s.last) for s in sorted(plan.stages, key=lambda s: s.virtual * pp + s.pp_rank)]


def hybrid_pattern(model: ModelSpec, plan: ParallelPlan) -> str:
    """The hybrid layer pattern, `|` between pipeline stages (Megatron derives PP and VPP
    stages from the separators)."""
    pattern = model.pattern
    if plan.layout.pp == 1:
        return pattern
    return "|".join(pattern[first:last] for first, last in stage_layers(plan))


def moe_args(model: ModelSpec, plan: ParallelPlan, notes: list) -> list[str]:
    m, lay, opts = model.moe, plan.layout, plan.moe
    if m is None:
        return []
    args = [f"--num-experts {m.experts}", f"--moe-router-topk {m.top_k}", f"--moe-ffn-hidden-size {m.ffn}",
            f"--expert-model-parallel-size {lay.ep}", f"--expert-tensor-parallel-size {lay.etp}",
            f"--moe-router-score-function {m.router}", "--moe-grouped-gemm"]
    args += _router_args(m, notes)
    if m.shared_ffn:
        args.append(f"--moe-shared-expert-intermediate-size {m.shared_ffn}")
        if m.shared_gate:
            args.append("--moe-shared-expert-gate")
    balance = "aux_loss" if m.aux_loss > 0 else "none"
    args += [f"--moe-router-load-balancing-type {balance}", f"--moe-aux-loss-coeff {m.aux_loss:g}"]
    if m.z_loss > 0:
        args.append(f"--moe-z-loss-coeff {m.z_loss:g}")
    args.append(f"--moe-token-dispatcher-type {lay.dispatcher}")
    if opts is not None and opts.capacity_factor is not None:
        args += [f"--moe-expert-capacity-factor {opts.capacity_factor:g}",
                 f"--moe-token-drop-policy {opts.drop_policy}"]
        if opts.pad_to_capacity:
            args.append("--moe-pad-expert-input-to-capacity")
    if m.expert_bias and m.router != "sigmoid":
        notes.append("Megatron's expert bias (aux-loss-free balancing) needs a sigmoid router: exported "
                     "without it")
    elif m.expert_bias:
        rate = opts.expert_bias_rate if opts is not None else 1e-3
        args += ["--moe-router-enable-expert-bias", f"--moe-router-bias-update-rate {rate:g}"]
    return args


def _router_args(m, notes: list) -> list[str]:
    """Megatron renormalises the chosen experts' probabilities for a post-top-k softmax and for a
    sigmoid router with top_k > 1; a pre-top-k softmax keeps them as they are."""
    args = []
    if m.router == "softmax" and m.pre_softmax and not m.norm_topk:
        args.append("--moe-router-pre-softmax")  # softmax over all experts, not renormalised
    elif m.router == "sigmoid" and not m.norm_topk and m.top_k > 1:
        notes.append("Megatron renormalises sigmoid router probabilities over the top-k experts")
    if m.groups > 1:
        args += [f"--moe-router-num-groups {m.groups}", f"--moe-router-group-topk {m.topk_groups}"]
        if m.group_score_top != m.top_k // m.topk_groups:
            notes.append(f"Megatron scores a group by its best top_k // group_topk = {m.top_k // m.topk_groups} "
                         f"experts, the model by its best {m.group_score_top}")
    if m.scaling_factor != 1.0:
        args.append(f"--moe-router-topk-scaling-factor {m.scaling_factor:g}")
    return args
