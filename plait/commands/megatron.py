"""`plait export megatron`: the Megatron-LM command-line arguments that realise a ParallelPlan.

Megatron counts transformer layers (attention + MLP/MoE) for Transformer models and single layers
(the hybrid pattern's symbols) for hybrid Mamba models; plait's stages count single layers.
"""
from __future__ import annotations

from plait.ir.plan import ParallelPlan


def _megatron_layers(plan: ParallelPlan, layers: int) -> int:
    hybrid = "M" in plan.layer_pattern
    return layers if hybrid or not plan.layer_pattern else layers // 2


def _pipeline_args(plan: ParallelPlan) -> tuple[list[str], list[str]]:
    lay = plan.layout
    chunks = [_megatron_layers(plan, s.num_layers)
              for s in sorted(plan.stages, key=lambda s: s.virtual * lay.pp + s.pp_rank)]
    args, notes = [], []
    if lay.vpp > 1:
        if len(set(chunks)) == 1:
            args.append(f"--num-layers-per-virtual-pipeline-stage {chunks[0]}")
        else:
            args.append(f"--num-virtual-stages-per-pipeline-rank {lay.vpp}")
            notes.append(f"uneven virtual stages {chunks}: Megatron splits them evenly")
    elif lay.pp > 1 and len(set(chunks)) > 1:
        middle = chunks[1:-1]
        if len(set(middle)) <= 1:
            args += [f"--decoder-first-pipeline-num-layers {chunks[0]}",
                     f"--decoder-last-pipeline-num-layers {chunks[-1]}"]
        else:
            notes.append(f"stage sizes {chunks} need a custom pipeline layout")
    return args, notes


def _recompute_args(plan: ParallelPlan) -> tuple[list[str], list[str]]:
    kinds = {s.recompute for s in plan.stages}
    is_moe = "E" in plan.layer_pattern
    if kinds == {"none"}:
        return [], []
    if "full" in kinds:
        most = max(_megatron_layers(plan, s.num_layers) for s in plan.stages if s.recompute == "full")
        notes = [] if kinds == {"full"} else [
            f"per-stage recompute {[s.recompute for s in plan.stages]}: block recompute of "
            f"{most} layers per stage approximates it"]
        return ["--recompute-granularity full", "--recompute-method block",
                f"--recompute-num-layers {most}"], notes
    modules = "layernorm moe_act" if is_moe else "layernorm"
    return ["--recompute-granularity selective", f"--recompute-modules {modules}"], []


def _data_parallel_args(plan: ParallelPlan) -> list[str]:
    kind = plan.layout.dp_kind
    if kind == "fsdp":
        return ["--use-torch-fsdp2"]
    if kind == "zero1":
        return ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    return ["--overlap-grad-reduce"]


def _moe_args(plan: ParallelPlan) -> list[str]:
    lay, moe = plan.layout, plan.moe
    if moe is None:
        return []
    args = [f"--expert-model-parallel-size {lay.ep}", f"--expert-tensor-parallel-size {lay.etp}",
            f"--moe-token-dispatcher-type {lay.dispatcher}"]
    if moe.capacity_factor is not None:
        args += [f"--moe-expert-capacity-factor {moe.capacity_factor:g}",
                 f"--moe-token-drop-policy {moe.drop_policy}"]
        if moe.pad_to_capacity:
            args.append("--moe-pad-expert-input-to-capacity")
    return args


def _precision_args(plan: ParallelPlan) -> list[str]:
    if plan.precision == "fp8":
        return ["--bf16", "--fp8-format hybrid"]
    return [] if plan.precision == "fp32" else ["--bf16"]


def megatron_args(plan: ParallelPlan) -> list[str]:
    """Argument lines (flag and value); notes on what Megatron cannot express come as # lines."""
    lay = plan.layout
    args = [f"--tensor-model-parallel-size {lay.tp}", f"--pipeline-model-parallel-size {lay.pp}",
            f"--context-parallel-size {lay.cp}"]
    if lay.cp > 1:
        args.append(f"--cp-comm-type {'a2a' if getattr(lay, 'cp_comm', 'ring') == 'alltoall' else 'p2p'}")
    pipe, pipe_notes = _pipeline_args(plan)
    recompute, rec_notes = _recompute_args(plan)
    args += pipe + _moe_args(plan)
    args += [f"--micro-batch-size {lay.mbs}", f"--global-batch-size {plan.global_batch}",
             f"--seq-length {plan.seq_len}"]
    if lay.sp:
        args.append("--sequence-parallel")
    args += recompute + _data_parallel_args(plan) + _precision_args(plan)
    return args + [f"# note: {n}" for n in pipe_notes + rec_notes]
