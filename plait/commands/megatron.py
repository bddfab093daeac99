"""`plait export megatron`: the Megatron-LM command that trains a job under a plan.

The arguments are complete (model, parallelism, pipeline layout, MoE, hybrid, precision, batch,
recompute, data-parallel kind, optimizer) and follow the argument definitions and `validate_args`
rules of Megatron-LM (core 0.20, main at NVIDIA/Megatron-LM d98e8a6; tests/test_cli_megatron.py
names each rule it checks). What Megatron cannot express comes back as notes, never silently.

Megatron counts decoder layers (attention + MLP/MoE) for GPT models and single layers (the hybrid
pattern's symbols) for hybrid models; plait's stages count single layers.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Optional

from plait.ir import kinds, legality
from plait.ir.errors import PlaitError
from plait.ir.job import TrainJob
from plait.ir.model import ModelSpec
from plait.ir.plan import ParallelPlan, dense_layout
from plait.ir.precision import RUNTIME_FP8_RECIPE

VERIFIED_AGAINST = "Megatron-LM core 0.20 (NVIDIA/Megatron-LM d98e8a6)"
GPT_SCRIPT = "pretrain_gpt.py"
HYBRID_SCRIPT = "pretrain_hybrid.py"
HYBRID_SPEC = "megatron.core.models.hybrid.hybrid_layer_specs hybrid_stack_spec"
NORMS = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}
ACTIVATION_FLAGS = {"swiglu": ["--swiglu"], "relu2": ["--squared-relu"], "gelu": []}  # gelu: default
DECAY = {"cosine": "cosine", "constant": "constant", "linear": "linear"}
RDZV_PORT = 29500


@dataclass(frozen=True)
class MegatronCommand:
    script: str  # the Megatron-LM entry point
    env: tuple[str, ...]  # NAME=value the ranks need
    args: tuple[str, ...]  # one flag (and its value) per item
    notes: tuple[str, ...]  # what Megatron cannot express exactly

    def argv(self) -> list[str]:
        """The arguments as separate words (what the script's argv holds)."""
        return [word for arg in self.args for word in shlex.split(arg)]

    def shell(self, nodes: int, gpus_per_node: int) -> str:
        launch = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={gpus_per_node}"]
        if nodes > 1:
            launch += ["--rdzv-backend=c10d", "--rdzv-endpoint=$MASTER_ADDR:" + str(RDZV_PORT)]
        head = " ".join(list(self.env) + launch + [self.script])
        lines = [head] + list(self.args)
        text = " \\\n  ".join(lines)
        return text + "".join(f"\n# note: {n}" for n in self.notes)


def megatron_command(plan: ParallelPlan, job: TrainJob) -> MegatronCommand:
    """The Megatron-LM command for ``plan`` (written for ``job``); PlaitError when Megatron cannot
    run it at all, notes where it runs something close."""
    check_plan_fits_job(plan, job)
    notes: list[str] = []
    model = job.model
    args = (_model_args(model, plan, notes) + _parallel_args(plan, model, notes)
            + _moe_args(model, plan, notes) + _precision_args(job, plan, notes) + _batch_args(plan)
            + _recompute_args(plan, model, job, notes) + _data_parallel_args(plan)
            + _training_args(job, notes) + _data_args(job, notes))
    lay = plan.layout
    env = ("CUDA_DEVICE_MAX_CONNECTIONS=1",) if (lay.tp > 1 or lay.cp > 1) and lay.dp_kind != "fsdp" else ()
    script = HYBRID_SCRIPT if model.is_hybrid else GPT_SCRIPT
    return MegatronCommand(script, env, tuple(args), tuple(notes))


def check_plan_fits_job(plan: ParallelPlan, job: TrainJob) -> None:
    if plan.model != job.model.name:
        raise PlaitError(f"the plan is for model {plan.model!r}; the job trains {job.model.name!r}")
    if plan.world != job.cluster.world:
        raise PlaitError(f"the plan spans {plan.world} ranks; cluster {job.cluster.name!r} has "
                         f"{job.cluster.world}")
    # Megatron-LM runs every legal layout (also those plait's own runtime cannot run yet)
    legality.table(legality.Workload.of_job(job)).require(dense_layout(plan.layout),
                                                          (legality.LEGAL,), what="Megatron-LM")
    covered = sorted((s.first, s.last) for s in plan.stages)
    edges = [a for a, _ in covered] + [covered[-1][1]] if covered else []
    if not covered or edges[0] != 0 or edges[-1] != job.model.num_layers or any(
            covered[i][1] != covered[i + 1][0] for i in range(len(covered) - 1)):
        raise PlaitError(f"the plan's stages do not cover the model's {job.model.num_layers} layers "
                         "once, in order")


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

def decoder_kinds(model: ModelSpec) -> list[str]:
    """GPT models: the second block of each decoder layer (mlp or moe); PlaitError otherwise."""
    if model.decoder_layers is None:
        raise PlaitError(f"model {model.name!r}: Megatron's GPT model needs layers of attention + "
                         "MLP/MoE pairs", hint="write it as a hybrid pattern (M * - E) with a mamba block")
    return [model.layers[i + 1] for i in range(0, model.num_layers, 2)]


def _model_args(model: ModelSpec, plan: ParallelPlan, notes: list) -> list[str]:
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
                     f"time_step_min); Megatron-LM has no flag for that floor")
    return [f"--mamba-num-heads {m.heads}", f"--mamba-head-dim {m.head_dim}",
            f"--mamba-num-groups {m.groups}", f"--mamba-state-dim {m.state}"]


# ------------------------------------------------------------------------------------------------
# Parallelism and the pipeline layout
# ------------------------------------------------------------------------------------------------

def _parallel_args(plan: ParallelPlan, model: ModelSpec, notes: list) -> list[str]:
    lay = plan.layout
    args = [f"--tensor-model-parallel-size {lay.tp}", f"--pipeline-model-parallel-size {lay.pp}",
            f"--context-parallel-size {lay.cp}"]
    if lay.cp > 1:
        args.append(f"--cp-comm-type {'a2a' if lay.cp_comm == 'alltoall' else 'p2p'}")
    if lay.sp and lay.tp > 1:
        args.append("--sequence-parallel")
    if lay.pp > 1 and not model.is_hybrid:
        layout = pipeline_layout(plan, model, notes)
        if layout is not None:
            args.append(f"--pipeline-model-parallel-layout {shlex.quote(layout)}")
    return args


def stage_layers(plan: ParallelPlan) -> list[tuple[int, int]]:
    """(first, last) single layers of each (virtual) stage in Megatron's order: chunk
    virtual * pp + pp_rank."""
    pp = plan.layout.pp
    return [(s.first, s.last) for s in sorted(plan.stages, key=lambda s: s.virtual * pp + s.pp_rank)]


def pipeline_layout(plan: ParallelPlan, model: ModelSpec, notes: list) -> Optional[str]:
    """`Et*4|t*4|t*4|t*3L`: the decoder layers of each stage (E embedding, L loss), or None when
    Megatron's default even split is the plan."""
    counts = decoder_layers_per_stage(plan, model, notes)
    if plan.layout.vpp == 1 and len(set(counts)) == 1:
        return None
    chunks = [f"t*{c}" if c > 1 else "t" for c in counts]
    if len(chunks) == 1:
        return f"E{chunks[0]}L"
    middle = []  # runs of equal stages as Megatron's `(t*2|)*14`
    for chunk in chunks[1:-1]:
        if middle and middle[-1][0] == chunk:
            middle[-1][1] += 1
        else:
            middle.append([chunk, 1])
    groups = [f"E{chunks[0]}|"] + [f"({c}|)*{n}" if n > 1 else f"{c}|" for c, n in middle]
    return ",".join(groups + [f"{chunks[-1]}L"])


def decoder_layers_per_stage(plan: ParallelPlan, model: ModelSpec, notes: list) -> list[int]:
    """Decoder layers of each stage. A stage boundary inside a decoder layer (plait splits
    non-periodic models between single layers) moves to a decoder-layer boundary, down or else
    up, so that every stage keeps at least one; a note says so."""
    firsts = [first for first, _ in stage_layers(plan)]
    end = model.num_layers // 2
    for rounding in (lambda f: f // 2, lambda f: (f + 1) // 2):
        starts = [rounding(f) for f in firsts] + [end]
        counts = [b - a for a, b in zip(starts, starts[1:])]
        if all(c >= 1 for c in counts):
            break
    else:
        raise PlaitError("a pipeline stage of the plan holds no whole decoder layer, which Megatron's "
                         f"stages need (stages start at layers {firsts})")
    if any(f % 2 for f in firsts):
        notes.append(f"plait's stages start at layers {firsts}, some inside a decoder layer; Megatron's "
                     f"start at decoder layers {starts[:-1]}")
    return counts


def hybrid_pattern(model: ModelSpec, plan: ParallelPlan) -> str:
    """The hybrid layer pattern, `|` between pipeline stages (Megatron derives PP and VPP
    stages from the separators)."""
    pattern = model.pattern
    if plan.layout.pp == 1:
        return pattern
    return "|".join(pattern[first:last] for first, last in stage_layers(plan))


def _moe_args(model: ModelSpec, plan: ParallelPlan, notes: list) -> list[str]:
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


# ------------------------------------------------------------------------------------------------
# Precision, batch, recompute, data parallelism, optimizer, data
# ------------------------------------------------------------------------------------------------

def _precision_args(job: TrainJob, plan: ParallelPlan, notes: list) -> list[str]:
    p = job.precision
    if p.kind == "fp32":
        return []
    if p.kind == "bf16":
        return ["--bf16"]
    # no recipe in the job: the one plait's runtime trains with (Megatron's default is delayed)
    recipe = p.fp8_recipe or RUNTIME_FP8_RECIPE
    args = ["--bf16", "--fp8-format hybrid", f"--fp8-recipe {recipe}"]
    if not (p.fp8_skip_first or p.fp8_skip_last):
        return args
    if recipe == "delayed":
        notes.append("Megatron keeps the first / last layers in bf16 only with a recipe other than delayed "
                     "scaling: exported with every layer in fp8 (set recipe = tensorwise to keep them)")
        return args
    per_stage = megatron_layers(job.model) // plan.layout.pp  # Megatron's bound on either count
    first, last = (min(per_stage, _in_megatron_layers(job.model, n)) for n in (p.fp8_skip_first, p.fp8_skip_last))
    return args + ["--first-last-layers-bf16", f"--num-layers-at-start-in-bf16 {first}",
                   f"--num-layers-at-end-in-bf16 {last}"]


def megatron_layers(model: ModelSpec) -> int:
    """Layers as Megatron counts them: decoder layers (GPT) or pattern symbols (hybrid)."""
    return model.num_layers if model.is_hybrid else model.num_layers // 2


def _in_megatron_layers(model: ModelSpec, plait_layers: int) -> int:
    return plait_layers if model.is_hybrid else -(-plait_layers // 2)


def _batch_args(plan: ParallelPlan) -> list[str]:
    lay = plan.layout
    return [f"--micro-batch-size {lay.mbs}", f"--global-batch-size {plan.global_batch}",
            f"--seq-length {plan.seq_len}"]


def _recompute_args(plan: ParallelPlan, model: ModelSpec, job: TrainJob, notes: list) -> list[str]:
    recomputes = {s.recompute for s in plan.stages}
    if recomputes == {"none"}:
        return []
    if "full" in recomputes:
        if recomputes != {"full"}:
            notes.append(f"per-stage recompute {[s.recompute for s in plan.stages]}: Megatron recomputes "
                         "every layer in full")
        return ["--recompute-granularity full", "--recompute-method uniform", "--recompute-num-layers 1"]
    if recomputes != {"selective"}:
        notes.append(f"per-stage recompute {[s.recompute for s in plan.stages]}: Megatron recomputes "
                     "selectively on every stage")
    # plait's selective recompute keeps GEMM outputs and re-runs attention, norms and activations
    modules = ["core_attn"]
    if job.precision.kind != "fp8" or (job.precision.fp8_recipe or RUNTIME_FP8_RECIPE) != "delayed":
        modules.append("layernorm")  # Megatron: no layernorm / moe_act recompute with delayed fp8
        if model.is_moe:
            modules.append("moe_act")  # needs --moe-grouped-gemm, which _moe_args sets
    return ["--recompute-granularity selective", f"--recompute-modules {' '.join(modules)}"]


def _data_parallel_args(plan: ParallelPlan) -> list[str]:
    kind = plan.layout.dp_kind
    if kind == "fsdp":  # Megatron-FSDP (torch FSDP2 is refused with PP or EP by Megatron)
        return ["--use-megatron-fsdp", "--data-parallel-sharding-strategy optim_grads_params",
                "--ckpt-format fsdp_dtensor"]
    if kind == "zero1":
        return ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    return ["--overlap-grad-reduce"]


def _training_args(job: TrainJob, notes: list) -> list[str]:
    o = job.optimizer
    args = [f"--train-iters {job.steps}", f"--lr {o.lr:g}", f"--min-lr {min(o.min_lr, o.lr):g}",
            f"--lr-decay-style {DECAY[o.schedule]}", f"--lr-warmup-iters {o.warmup}",
            f"--weight-decay {o.weight_decay:g}", f"--clip-grad {o.grad_clip:g}", f"--seed {job.seed}"]
    if o.kind == "sgd":
        return args + ["--optimizer sgd", f"--sgd-momentum {o.betas[0]:g}"]
    return args + ["--optimizer adam", f"--adam-beta1 {o.betas[0]:g}", f"--adam-beta2 {o.betas[1]:g}",
                   f"--adam-eps {o.eps:g}"]


def _data_args(job: TrainJob, notes: list) -> list[str]:
    if job.data.synthetic:
        return ["--mock-data"]
    notes.append("data: add --data-path with a Megatron indexed dataset (plait's token datasets are "
                 "another format)")
    return []
