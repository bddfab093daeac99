"""Plans are checked against their job before any process starts; launch command lines."""
from dataclasses import replace
from pathlib import Path

import pytest

from plait.cli import main
from plait.ir.dsl import load_job
from plait.ir.errors import LayoutError
from plait.ir.plan import Layout, Stage
from plait.runtime.launch import check_plan, hand_plan, local_command, multinode_command

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "specs" / "jobs" / "tiny-local.plait"


@pytest.fixture(scope="module")
def job():
    return load_job(str(TINY))


def test_hand_plan_tp2_pp2_dp2_passes(job):
    plan = check_plan(job, hand_plan(job, Layout(tp=2, pp=2, dp=2)))
    assert plan.world == 8 and plan.layout.edp == 2 and len(plan.stages) == 2


@pytest.mark.parametrize("layout,message", [
    (Layout(tp=2, pp=2, dp=1), r"2\*1\*1\*2 = 4 ranks, cluster 'local-cpu' has 1\*8 = 8"),
    (Layout(tp=8, dp=1), r"attention heads \(4\) must be divisible by tp \(8\): 4 % 8 = 4"),
    (Layout(tp=2, pp=2, dp=2, mbs=3), r"dp\*mbs = 2\*3 = 6: 16 % 6 = 4"),
])
def test_bad_layouts_are_rejected_with_arithmetic(job, layout, message):
    with pytest.raises(LayoutError, match=message):
        check_plan(job, hand_plan(job, layout))


def test_moe_with_context_parallel_folded_into_experts_passes_and_fsdp_is_refused():
    moe_job = load_job(str(ROOT / "specs" / "jobs" / "tiny-moe-local.plait"))
    plan = check_plan(moe_job, hand_plan(moe_job, Layout(cp=2, dp=4, ep=2, edp=4)))
    assert (plan.layout.cp, plan.layout.ep, plan.layout.edp) == (2, 2, 4)
    with pytest.raises(LayoutError, match=r"edp = 4, dp\*cp = 4\*2 = 8"):
        check_plan(moe_job, hand_plan(moe_job, Layout(cp=2, dp=4, ep=2, edp=4, dp_kind="fsdp")))


def test_stage_count_must_match_pp(job):
    plan = replace(hand_plan(job, Layout(tp=2, pp=2, dp=2)), stages=(Stage(0, 0, 0, 8),))
    with pytest.raises(LayoutError, match=r"1 stages, but pp\*vpp = 2\*1 = 2"):
        check_plan(job, plan)


def test_print_launch_is_a_multinode_torchrun_with_rendezvous_and_nccl(job):
    cluster = replace(job.cluster, nodes=4, gpus_per_node=8, backend="nccl", name="dgx")
    big = replace(job, cluster=cluster)
    text = multinode_command(big, hand_plan(big, Layout(tp=8, pp=2, dp=2)))
    for part in ("torchrun", "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=${MASTER_ADDR}:29500", "NCCL_", "plait.runtime.train"):
        assert part in text


def test_local_command_runs_torch_distributed_run(tmp_path):
    cmd = local_command(tmp_path, 8)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=8" in cmd and cmd[-1] == str(tmp_path)


def test_cli_bad_plan_file_exits_2_without_traceback(job, tmp_path, capsys):
    bad = hand_plan(job, Layout(tp=2, pp=2, dp=2))
    bad = replace(bad, layout=replace(bad.layout, dp=1), world=4)
    path = tmp_path / "plan.json"
    path.write_text(bad.to_json())
    assert main(["run", str(TINY), "--plan", str(path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "ranks" in err and "Traceback" not in err


def test_cli_print_launch(job, tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(hand_plan(job, Layout(tp=2, pp=2, dp=2)).to_json())
    assert main(["run", str(TINY), "--plan", str(path), "--print-launch"]) == 0
    assert "--nproc-per-node=8" in capsys.readouterr().out


def test_planning_a_run_takes_a_layout_the_runtime_executes():
    """The planner may prefer FSDP over experts folded with CP (Megatron-FSDP shards them over
    EDP); `plait run` plans what plait's runtime can execute, so check_plan accepts it."""
    from plait.commands.run import resolve_plan

    moe_job = load_job(str(ROOT / "specs" / "jobs" / "tiny-moe-local.plait"))
    plan = resolve_plan(moe_job, None, "cp=2 ep=2")
    lay = plan.layout
    assert (lay.cp, lay.ep) == (2, 2)
    assert lay.dp_kind != "fsdp" or lay.edp == lay.dp * lay.cp
