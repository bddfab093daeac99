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

from plait.ir import legality
from plait.ir.errors import PlaitError
from plait.ir.job import TrainJob
from plait.ir.model import ModelSpec
from plait.ir.plan import ParallelPlan, dense_layout
from plait.ir.precision import RUNTIME_FP8_RECIPE

from .megatron_model import model_args, moe_args, stage_layers

VERIFIED_AGAINST = "Megatron-LM core 0.20 (NVIDIA/Megatron-LM d98e8a6)"
GPT_SCRIPT = "pretrain_gpt.py"
HYBRID_SCRIPT = "pretrain_hybrid.py"
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
    args = (model_args(model, plan, notes) + _parallel_args(plan, model, notes)
            + moe_args(model, plan, notes) + _precision_args(job, plan, notes) + _batch_args(plan)
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
