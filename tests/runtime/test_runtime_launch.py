"""Plans are checked against their job before any process starts; launch command lines and the
run directory they read."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from plait.cli import main
from plait.ir.dsl import load_job
from plait.ir.errors import LayoutError
from plait.ir.plan import Layout, Stage
from plait.runtime.cluster_launch import node_command, slurm_script
from plait.runtime.launch import check_plan, hand_plan, local_command

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "specs" / "jobs" / "tiny-local.plait"


@pytest.fixture(scope="module")
def job():
    return load_job(str(TINY))


def test_hand_plan_tp2_pp2_dp2_passes(job):
    plan = check_plan(job, hand_plan(job, Layout(tp=2, pp=2, dp=2)))
    assert plan.world == 8 and plan.layout.edp == 2 and len(plan.stages) == 2


@pytest.mark.parametrize("layout,message", [
    (Layout(tp=2, pp=2, dp=1), r"2\*1\*1\*2 = 4 ranks, but the world of cluster 'local-cpu' "
                              r"\(1\*8\) is 8"),
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


def test_node_command_is_a_multinode_torchrun_with_c10d_rendezvous(job):
    cluster = replace(job.cluster, nodes=4, gpus_per_node=8, backend="nccl", name="dgx")
    text = node_command(replace(job, cluster=cluster), "/shared/run", "run-7", max_restarts=2)
    for part in ("torchrun", "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                 '--rdzv-endpoint="${MASTER_ADDR:?', "${MASTER_PORT:-29500}", "--rdzv-id=run-7",
                 "--max-restarts=2", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "-m plait.runtime.worker /shared/run"):
        assert part in text


def test_slurm_script_runs_one_torchrun_per_node_and_is_valid_bash(job, tmp_path):
    import subprocess

    cluster = replace(job.cluster, nodes=2, gpus_per_node=8, backend="nccl", name="dgx")
    text = slurm_script(replace(job, cluster=cluster), tmp_path / "rd", max_restarts=1)
    for part in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=TERM@", "srun --kill-on-bad-exit=1 torchrun",
                 '--nnodes="$SLURM_NNODES"', "--rdzv-backend=c10d", '--rdzv-id="$SLURM_JOB_ID"',
                 "--max-restarts=1", f"-m plait.runtime.worker {tmp_path / 'rd'}"):
        assert part in text
    (tmp_path / "s.sh").write_text(text)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sh")]).returncode == 0


def test_local_command_runs_torch_distributed_run(tmp_path):
    cmd = local_command(tmp_path, 8)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=8" in cmd and cmd[-1] == str(tmp_path) and "--max-restarts=0" in cmd


def test_cli_bad_plan_file_exits_2_without_traceback(job, tmp_path, capsys):
    bad = hand_plan(job, Layout(tp=2, pp=2, dp=2))
    bad = replace(bad, layout=replace(bad.layout, dp=1), world=4)
    path = tmp_path / "plan.json"
    path.write_text(bad.to_json())
    assert main(["run", str(TINY), "--plan", str(path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "ranks" in err and "Traceback" not in err


def _two_node_job_file(tmp_path: Path, data: str) -> Path:
    spec = tmp_path / "two-node.plait"
    spec.write_text(f'''use "models/tiny-dense.plait", "devices/cpu.plait"
cluster "pair" {{ nodes = 2, gpus_per_node = 2, device = "cpu", intra = 5 GB/s, inter = 5 GB/s, backend = gloo }}
train "two-node" {{
  model = "tiny-dense"
  cluster = "pair"
  global_batch = 4
  seq_len = 32
  precision = fp32
  data = {data}
  steps = 6
  timeout = 45 s
}}
''')
    return spec


@pytest.fixture
def bundled_dataset(tmp_path_factory):
    from plait.runtime.data import bundled_corpus, prepare

    out = tmp_path_factory.mktemp("data") / "corpus"
    prepare([bundled_corpus()], out)
    return out


def test_run_on_a_multinode_cluster_writes_the_run_directory_and_prints_the_command(
        tmp_path, capsys, bundled_dataset, monkeypatch):
    """The run directory holds everything every node needs: no option is dropped."""
    monkeypatch.setenv("PLAIT_PATH", str(ROOT / "specs"))
    spec = _two_node_job_file(tmp_path, "synthetic")
    rd, save = tmp_path / "rd", tmp_path / "ckpt"
    assert main(["run", str(spec), "--layout", "pp=2", "--data", str(bundled_dataset), "--steps",
                 "5", "--save", str(save), "--save-every", "2", "--max-restarts", "3",
                 "--run-dir", str(rd)]) == 0
    out = capsys.readouterr().out
    assert "--nnodes=2" in out and f"-m plait.runtime.worker {rd.resolve()}" in out
    options = json.loads((rd / "options.json").read_text())
    assert options["steps"] == 5 and options["save"] == str(save.resolve())
    assert options["save_every"] == 2 and options["max_restarts"] == 3
    assert options["timeout_s"] == 45.0  # the job's timeout reaches the ranks
    job = json.loads((rd / "job.json").read_text())
    assert job["data"]["path"] == str(bundled_dataset) and not job["data"]["synthetic"]
    assert json.loads((rd / "plan.json").read_text())["layout"]["pp"] == 2


def test_print_launch_slurm_writes_an_sbatch_script_in_the_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run directory: runs/<job>-<timestamp>/
    assert main(["run", str(TINY), "--layout", "tp=2 pp=2", "--print-launch", "slurm"]) == 0
    (rd,) = (tmp_path / "runs").iterdir()
    assert rd.name.startswith("tiny-local-")
    script = (rd / "launch.sbatch").read_text()
    assert "#SBATCH --nodes=1" in script and "--nproc-per-node=8" in script
    assert {"job.json", "plan.json", "options.json"} <= {p.name for p in rd.iterdir()}
    assert f"sbatch runs/{rd.name}/launch.sbatch" in capsys.readouterr().out


def test_cli_print_launch(job, tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(hand_plan(job, Layout(tp=2, pp=2, dp=2)).to_json())
    assert main(["run", str(TINY), "--plan", str(path), "--print-launch", "--run-dir",
                 str(tmp_path / "rd")]) == 0
    assert "--nproc-per-node=8" in capsys.readouterr().out
    assert (tmp_path / "rd" / "plan.json").is_file()


def test_planning_a_run_takes_a_layout_the_runtime_executes():
    """The planner may prefer FSDP over experts folded with CP (Megatron-FSDP shards them over
    EDP); `plait run` plans what plait's runtime can execute, so check_plan accepts it."""
    from plait.commands.run import resolve_plan

    moe_job = load_job(str(ROOT / "specs" / "jobs" / "tiny-moe-local.plait"))
    plan = resolve_plan(moe_job, None, "cp=2 ep=2")
    lay = plan.layout
    assert (lay.cp, lay.ep) == (2, 2)
    assert lay.dp_kind != "fsdp" or lay.edp == lay.dp * lay.cp


def test_run_options_hold_every_path_absolute(job, tmp_path, monkeypatch):
    from plait.runtime.launch import Checkpointing, run_options

    monkeypatch.chdir(tmp_path)
    options = run_options(job, steps=7, weights="hf/model.safetensors", max_restarts=2,
                          ckpt=Checkpointing(save="ck", every=3, resume="old/step-000004"))
    assert options == {"steps": 7, "timeout_s": job.timeout, "max_restarts": 2,
                       "weights": str(tmp_path / "hf" / "model.safetensors"),
                       "save": str(tmp_path / "ck"), "save_every": 3,
                       "resume": str(tmp_path / "old" / "step-000004"), "async_save": False}
