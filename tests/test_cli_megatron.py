"""`plait export megatron`: a complete Megatron-LM command for dense, MoE and hybrid plans.

Every emitted flag is parsed with Megatron-LM's own definitions (type, nargs, choices; read from
NVIDIA/Megatron-LM d98e8a6 megatron/training/arguments.py into megatron_flags.json), and the
`validate_args` / TransformerConfig rules the exported combinations touch are checked, each named
after the Megatron rule it restates. (On a machine with a Megatron-LM checkout the same commands
were run through Megatron's real parse_args + validate_args + TransformerConfig; see the report.)
"""
import argparse
import json
import re
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from plait.cli import main
from plait.commands.megatron import MegatronCommand, megatron_command
from plait.ir.dsl import load_job
from plait.ir.errors import PlaitError
from plait.ir.job import Precision
from plait.ir.model import Rope, RopeScaling
from plait.ir.plan import Layout, ParallelPlan, Stage, even_stages

HERE = Path(__file__).resolve().parent
SPECS = HERE.parent / "specs" / "jobs"
FLAGS = json.loads((HERE / "megatron_flags.json").read_text())["flags"]


# --- Megatron's argument definitions --------------------------------------------------------------

def moe_freq_type(text: str) -> list[int]:
    """Megatron's moe_freq_type for a list pattern: only `,0-9[]()+*` (arguments._eval_pattern)."""
    if re.search(r"[^,\d\[\]\(\)\+\*]", text):
        raise argparse.ArgumentTypeError(f"invalid pattern {text}")
    out = []
    for term in text.strip("()").split("+"):
        bit, _, times = term.partition("*")
        out += [int(bit.strip("[]"))] * int(times or 1)
    return out


def megatron_parser() -> argparse.ArgumentParser:
    types = {"int": int, "float": float, "str": str, "moe_freq_type": moe_freq_type, None: None}
    parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    for flag, d in FLAGS.items():
        if d["action"] in ("storetrue", "storefalse"):
            parser.add_argument(flag, dest=d["dest"], action="store_" + d["action"][5:])
        else:
            parser.add_argument(flag, dest=d["dest"], type=types[d["type"]], nargs=d["nargs"],
                                choices=d["choices"], default=d["default"])
    return parser


def parse(command: MegatronCommand) -> argparse.Namespace:
    args, unknown = megatron_parser().parse_known_args(command.argv())
    assert not unknown, f"not Megatron-LM flags: {unknown}"
    return args


# --- validate_args / TransformerConfig rules ------------------------------------------------------

def layout_stages(layout: str) -> list[str]:
    """PipelineParallelLayerLayout.parse_str_to_list: commas are cosmetic, (x)*n and x*n unroll."""
    text = layout.replace(",", "")
    text = re.sub(r"\(([^)]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    text = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    return text.split("|")


def num_layers(a) -> int:
    return len(a.hybrid_layer_pattern.replace("|", "")) if a.hybrid_layer_pattern else a.num_layers


RULES = {
    "validate_args: world_size % (tp * pp * cp) == 0":
        lambda a, c: c.world % (a.tensor_model_parallel_size * a.pipeline_model_parallel_size
                                * a.context_parallel_size) == 0,
    "validate_args: --use-torch-fsdp2 is not supported with pipeline or expert parallelism":
        lambda a, c: "--use-torch-fsdp2" not in c.argv,  # plait exports Megatron-FSDP instead
    "validate_args: --overlap-param-gather only with the distributed optimizer or Megatron-FSDP, "
    "and with --overlap-grad-reduce":
        lambda a, c: not a.overlap_param_gather or (
            (a.use_distributed_optimizer or a.use_megatron_fsdp) and a.overlap_grad_reduce),
    "validate_args: Megatron-FSDP requires --ckpt-format fsdp_dtensor and CUDA_DEVICE_MAX_CONNECTIONS != 1":
        lambda a, c: not a.use_megatron_fsdp or (
            a.ckpt_format == "fsdp_dtensor" and "CUDA_DEVICE_MAX_CONNECTIONS=1" not in c.env),
    "validate_args: tp > 1 or cp > 1 without FSDP requires CUDA_DEVICE_MAX_CONNECTIONS=1 (Hopper and older)":
        lambda a, c: a.use_megatron_fsdp or (a.tensor_model_parallel_size == 1 and a.context_parallel_size == 1)
        or "CUDA_DEVICE_MAX_CONNECTIONS=1" in c.env,
    "validate_args: required num_layers (or a hybrid pattern), hidden_size, num_attention_heads, "
    "max_position_embeddings":
        lambda a, c: None not in (a.hidden_size, a.num_attention_heads, a.max_position_embeddings)
        and (a.num_layers is not None or a.hybrid_layer_pattern is not None),
    "validate_args: without --kv-channels, hidden_size % num_attention_heads == 0":
        lambda a, c: a.kv_channels is not None or a.hidden_size % a.num_attention_heads == 0,
    "validate_args: seq_length % (2 * cp) == 0 when cp > 1":
        lambda a, c: a.context_parallel_size == 1 or a.seq_length % (2 * a.context_parallel_size) == 0,
    "validate_args: max_position_embeddings >= seq_length":
        lambda a, c: a.max_position_embeddings >= a.seq_length,
    "validate_args: at most one of --num-layers-per-virtual-pipeline-stage, "
    "--num-virtual-stages-per-pipeline-rank, --pipeline-model-parallel-layout":
        lambda a, c: sum(f in c.argv for f in ("--num-layers-per-virtual-pipeline-stage",
                                                "--num-virtual-stages-per-pipeline-rank",
                                                "--pipeline-model-parallel-layout")) <= 1,
    "validate_args: without a layout (or first/last stage sizes), num_layers % pp == 0":
        lambda a, c: a.hybrid_layer_pattern or a.pipeline_model_parallel_layout
        or a.num_layers % a.pipeline_model_parallel_size == 0,
    "validate_args: layout stages % pp == 0 (PipelineParallelLayerLayout: E once first, L once last, "
    "one t per decoder layer)":
        lambda a, c: a.pipeline_model_parallel_layout is None or _layout_ok(a),
    "validate_args: --hybrid-layer-pattern takes no --pipeline-model-parallel-layout or VPP flags; "
    "its | segments % pp == 0":
        lambda a, c: a.hybrid_layer_pattern is None or (
            a.pipeline_model_parallel_layout is None
            and len(a.hybrid_layer_pattern.split("|")) % a.pipeline_model_parallel_size == 0),
    "validate_args: an interleaved schedule (VPP) needs pp > 1":
        lambda a, c: _stages(a) == a.pipeline_model_parallel_size or a.pipeline_model_parallel_size > 1,
    "validate_args: selective recompute takes no --recompute-method":
        lambda a, c: a.recompute_granularity != "selective" or a.recompute_method is None,
    "TransformerConfig: moe_act recompute needs --moe-grouped-gemm":
        lambda a, c: "moe_act" not in (a.recompute_modules or []) or a.moe_grouped_gemm,
    "TransformerConfig: delayed-scaling fp8 cannot recompute layernorm or moe_act":
        lambda a, c: not (a.fp8 and a.fp8_recipe in (None, "delayed")) or not (
            {"layernorm", "moe_act"} & set(a.recompute_modules or [])),
    "validate_args: ep > 1 needs num_experts % ep == 0":
        lambda a, c: a.expert_model_parallel_size == 1 or (
            a.num_experts and a.num_experts % a.expert_model_parallel_size == 0),
    "moe_freq_type: a --moe-layer-freq list has one entry per decoder layer":
        lambda a, c: not isinstance(a.moe_layer_freq, list) or len(a.moe_layer_freq) == a.num_layers,
    "TransformerConfig: num_attention_heads % tp == 0; num_query_groups a multiple or divisor of tp":
        lambda a, c: a.num_attention_heads % a.tensor_model_parallel_size == 0 and (
            not a.group_query_attention or a.num_query_groups % a.tensor_model_parallel_size == 0
            or a.tensor_model_parallel_size % a.num_query_groups == 0),
    "TransformerConfig: a capacity factor needs aux_loss / seq_aux_loss / global_aux_loss / none "
    "balancing; padding to capacity needs a capacity factor":
        lambda a, c: (a.moe_expert_capacity_factor is None or set(a.moe_router_load_balancing_type or [])
                      <= {"aux_loss", "seq_aux_loss", "global_aux_loss", "none"})
        and (not a.moe_pad_expert_input_to_capacity or a.moe_expert_capacity_factor is not None),
    "TransformerConfig: expert bias only with a sigmoid or sqrtsoftplus router":
        lambda a, c: not a.moe_router_enable_expert_bias or a.moe_router_score_function in ("sigmoid",
                                                                                              "sqrtsoftplus"),
    "TransformerConfig: delayed fp8 scaling keeps no first / last layers in bf16; either count at most "
    "num_layers // pp":
        lambda a, c: not a.first_last_layers_bf16 or (
            a.fp8_recipe != "delayed" and max(a.num_layers_at_start_in_bf16, a.num_layers_at_end_in_bf16)
            <= num_layers(a) // a.pipeline_model_parallel_size),
    "validate_args: min_lr <= lr":
        lambda a, c: a.min_lr <= a.lr,
    "num_microbatches_calculator: global_batch_size % (micro_batch_size * dp) == 0":
        lambda a, c: a.global_batch_size % (a.micro_batch_size * c.world // (
            a.tensor_model_parallel_size * a.pipeline_model_parallel_size * a.context_parallel_size)) == 0,
}


def _stages(a) -> int:
    if a.hybrid_layer_pattern:
        return len(a.hybrid_layer_pattern.split("|"))
    if a.pipeline_model_parallel_layout:
        return len(layout_stages(a.pipeline_model_parallel_layout))
    return a.pipeline_model_parallel_size


def _layout_ok(a) -> bool:
    stages = layout_stages(a.pipeline_model_parallel_layout)
    flat = "".join(stages)
    return (len(stages) % a.pipeline_model_parallel_size == 0 and set(flat) <= set("ELt")
            and stages[0].startswith("E") and stages[-1].endswith("L")
            and flat.count("E") == flat.count("L") == 1 and flat.count("t") == a.num_layers)


class Checked:
    def __init__(self, command: MegatronCommand, world: int):
        self.argv, self.env, self.world = command.argv(), command.env, world


def violations(command: MegatronCommand, world: int) -> list[str]:
    a, c = parse(command), Checked(command, world)
    return [rule for rule, holds in RULES.items() if not holds(a, c)]


# --- plans ------------------------------------------------------------------------------------------

def job_of(name: str, **changes):
    return replace(load_job(str(SPECS / name)), **changes)


def plan_for(job, stages=None, recompute="none", **layout) -> ParallelPlan:
    """A plan by hand: ``stages`` lists (pp_rank, virtual, first, last) or None for an even split."""
    lay = Layout(**layout)
    if stages is None:
        chunks = even_stages(job.model.num_layers, lay.pp, lay.vpp, recompute)
    else:
        chunks = tuple(Stage(r, v, f, last, recompute) for r, v, f, last in stages)
    return ParallelPlan(job=job.name, model=job.model.name, cluster=job.cluster.name, world=lay.world,
                        layout=lay, stages=chunks, global_batch=job.global_batch, seq_len=job.seq_len,
                        moe=job.moe if job.model.is_moe else None)


TINY_MOE_SPLIT = [(0, 0, 0, 3), (1, 0, 3, 4), (0, 1, 4, 6), (1, 1, 6, 8)]  # a stage of one moe layer

CASES = {
    "dense tp2 pp2 fsdp": lambda: (job_of("tiny-local.plait"), dict(tp=2, pp=2, dp=2, sp=True, dp_kind="fsdp")),
    "dense uneven pp2": lambda: (job_of("tiny-local.plait"),
                                 dict(pp=2, dp=4, stages=[(0, 0, 0, 2), (1, 0, 2, 8)])),
    "dense vpp full recompute": lambda: (job_of("tiny-local.plait"),
                                         dict(pp=2, vpp=2, dp=4, recompute="full", dp_kind="zero1")),
    "dense cp a2a selective": lambda: (job_of("tiny-local.plait"),
                                       dict(cp=2, dp=4, cp_comm="alltoall", recompute="selective")),
    "dense replicated": lambda: (job_of("tiny-local.plait"), dict(dp=8, dp_kind="replicated")),
    "moe ep4 split stages": lambda: (job_of("tiny-moe-local.plait"),
                                     dict(pp=2, vpp=2, dp=4, ep=2, edp=2, stages=TINY_MOE_SPLIT)),
    "moe capacity allgather": lambda: (job_of("tiny-moe-local.plait", moe=replace(
        job_of("tiny-moe-local.plait").moe, capacity_factor=1.25, pad_to_capacity=True, dispatcher="allgather")),
        dict(dp=8, ep=4, edp=2, dispatcher="allgather", recompute="selective")),
    "moe fp8 delayed selective": lambda: (job_of("tiny-moe-local.plait", precision=Precision("fp8", "delayed", 1, 1)),
                                          dict(dp=8, ep=8, recompute="selective")),
    "mixtral 128 gpus": lambda: (job_of("mixtral-8x22b-128gpu.plait"),
                                 dict(cp=2, dp=8, pp=8, vpp=4, ep=8, edp=2)),
    "deepseek-v3 2048 gpus": lambda: (job_of("deepseek-v3-2048gpu.plait"),
                                      dict(tp=2, cp=2, dp=16, pp=32, sp=True, ep=8, edp=8, mbs=2)),
    "hybrid pp2 uneven": lambda: (job_of("tiny-hybrid-local.plait"),
                                  dict(pp=2, dp=4, stages=[(0, 0, 0, 3), (1, 0, 3, 10)])),
    "hybrid fp8 vpp": lambda: (job_of("nemotron-h-56b-pretrain.plait"),
                               dict(tp=2, cp=4, dp=16, pp=8, vpp=4, sp=True, recompute="selective")),
}


def export(case: str) -> tuple:
    job, spec = CASES[case]()
    stages = spec.pop("stages", None)
    recompute = spec.pop("recompute", "none")
    plan = plan_for(job, stages, recompute, **spec)
    return job, plan, megatron_command(plan, job)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_export_parses_with_megatrons_flags_and_keeps_its_rules(case):
    job, plan, command = export(case)
    assert violations(command, job.cluster.world) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_export_describes_the_model(case):
    job, plan, command = export(case)
    a, m = parse(command), job.model
    assert (a.hidden_size, a.seq_length, a.global_batch_size) == (m.hidden, plan.seq_len, plan.global_batch)
    assert a.vocab_size == m.vocab and a.make_vocab_size_divisible_by == 1
    assert (a.tensor_model_parallel_size, a.context_parallel_size, a.micro_batch_size) == (
        plan.layout.tp, plan.layout.cp, plan.layout.mbs)
    lat = m.attention.latent if m.attention else None
    if lat:  # Megatron-Core's MLA: its qk_head_dim is the no-position part
        assert a.multi_latent_attention and a.qk_layernorm and a.num_attention_heads == m.attention.heads
        assert (a.q_lora_rank, a.kv_lora_rank, a.qk_head_dim, a.qk_pos_emb_head_dim, a.v_head_dim) == (
            lat.q_lora_rank, lat.kv_lora_rank, lat.qk_nope_head_dim, lat.qk_rope_head_dim, lat.v_head_dim)
    elif m.attention:
        assert (a.num_attention_heads, a.kv_channels) == (m.attention.heads, m.attention.head_dim)
        assert a.num_query_groups == m.attention.kv_heads or not a.group_query_attention
    if m.is_hybrid:
        assert a.hybrid_layer_pattern.replace("|", "") == m.pattern
        assert (a.mamba_num_heads, a.mamba_head_dim, a.mamba_state_dim, a.mamba_num_groups) == (
            m.mamba.heads, m.mamba.head_dim, m.mamba.state, m.mamba.groups)
        assert [len(s) for s in a.hybrid_layer_pattern.split("|")] == [
            s.num_layers for s in sorted(plan.stages, key=lambda s: s.virtual * plan.layout.pp + s.pp_rank)]
        assert command.script == "pretrain_hybrid.py"
    else:
        assert a.num_layers * 2 == m.num_layers and command.script == "pretrain_gpt.py"
    if m.moe:
        assert (a.num_experts, a.moe_router_topk, a.moe_ffn_hidden_size) == (m.moe.experts, m.moe.top_k, m.moe.ffn)
        assert (a.expert_model_parallel_size, a.expert_tensor_parallel_size) == (plan.layout.ep, plan.layout.etp)


def test_uneven_stages_become_a_pipeline_layout():
    job, plan, command = export("dense uneven pp2")
    assert parse(command).pipeline_model_parallel_layout == "Et|,t*3L"  # 1 and 3 decoder layers
    assert layout_stages("Et|,(t*2|)*2,tL") == ["Et", "tt", "tt", "tL"]


def test_a_stage_boundary_inside_a_decoder_layer_moves_with_a_note():
    job, plan, command = export("moe ep4 split stages")
    assert layout_stages(parse(command).pipeline_model_parallel_layout) == ["Et", "t", "t", "tL"]
    assert any("inside a decoder layer" in n for n in command.notes)
    assert parse(command).moe_layer_freq == [0, 1, 1, 1]


def test_bf16_edge_layers_need_a_recipe_megatron_allows():
    job, plan, command = export("moe fp8 delayed selective")
    assert not parse(command).first_last_layers_bf16 and any("delayed" in n for n in command.notes)
    job, plan, command = export("hybrid fp8 vpp")  # tensorwise, skip_first = skip_last = 2
    a = parse(command)
    assert a.first_last_layers_bf16 and (a.num_layers_at_start_in_bf16, a.num_layers_at_end_in_bf16) == (2, 2)


def test_fsdp_with_pipeline_parallelism_is_megatron_fsdp_not_torch_fsdp2():
    job, plan, command = export("dense tp2 pp2 fsdp")
    a = parse(command)
    assert a.use_megatron_fsdp and "--use-torch-fsdp2" not in command.argv() and command.env == ()


def test_rope_scalings_and_biases_map_to_megatron_flags():
    job = job_of("tiny-local.plait")
    yarn = replace(job.model.attention, rope=Rope(1e4, RopeScaling("yarn", 4.0, 2048, 32.0, 1.0)), qkv_bias=True)
    job = replace(job, model=replace(job.model, attention=yarn))
    command = megatron_command(plan_for(job, dp=8), job)
    a = parse(command)
    assert (a.position_embedding_type, a.rotary_scaling_factor, a.yarn_original_max_position_embeddings) == (
        "yarn", 4.0, 2048)
    assert a.add_bias_linear is False and a.add_qkv_bias


def test_a_plan_for_another_model_or_world_is_refused():
    job = job_of("tiny-local.plait")
    with pytest.raises(PlaitError, match="spans 4 ranks"):
        megatron_command(plan_for(job, dp=4), job)
    with pytest.raises(PlaitError, match=r"seq_len \(130\) must be divisible by 2\*cp = 8 .*: "
                                         r"130 % 8 = 2"):
        megatron_command(plan_for(replace(job, seq_len=130), cp=4, dp=2), replace(job, seq_len=130))


def test_cli_exports_a_plan_file_or_plans_now(tmp_path, capsys):
    job = str(SPECS / "tiny-local.plait")
    assert main(["plan", job, "-o", str(tmp_path / "plan.json")]) == 0
    capsys.readouterr()
    assert main(["export", "megatron", job, "--plan", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("torchrun --nnodes=1 --nproc-per-node=8 pretrain_gpt.py \\\n")
    words = shlex.split(out.split("\n# note")[0].replace("\\\n", " "))
    assert "--num-layers" in words and "--hidden-size" in words
    assert main(["export", "megatron", str(tmp_path / "plan.json")]) == 2
    assert "needs the job spec" in " ".join(capsys.readouterr().err.split())
