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
    (Layout(tp=2, pp=2, dp=1), r"2\*1\*1\*2 = 4 but the cluster has 8 GPUs \(cluster "
                              r"'local-cpu': 1\*8\)"),
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
    assert "2*1*1*2 = 4 but the cluster has 8 GPUs" in err and "Traceback" not in err


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


def test_run_picks_the_best_runnable_plan_and_names_the_better_one_it_cannot_run(tmp_path,
                                                                                capsys):
    """With FSDP pinned, the best legal plan folds experts over CP (Megatron-FSDP shards them over
    EDP); plait's runtime cannot, so `plait run` takes the best plan it can run and says why."""
    from plait.planner.layouts import parse_layout
    from plait.planner.search import search

    moe = ROOT / "specs" / "jobs" / "tiny-moe-local.plait"
    pins = "cp=2 ep=2 dp_shard=fsdp"
    legal = search(load_job(str(moe)), parse_layout(pins), top=1).best
    assert legal.layout.edp != legal.layout.dp * legal.layout.cp  # the winner plait cannot run
    assert main(["run", str(moe), "--layout", pins, "--print-launch", "--run-dir",
                 str(tmp_path / "rd")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    ran = json.loads((tmp_path / "rd" / "plan.json").read_text())["layout"]
    assert ran["dp_kind"] == "fsdp" and ran["edp"] == ran["dp"] * ran["cp"]
    assert "the best plan plait can run; better plans it cannot run yet:" in out
    assert f"{legal.layout.short()} (fsdp) would step in" in out
    assert (f"plait cannot run it yet (moe-fsdp-experts): fsdp shards expert weights only when "
            f"edp = dp*cp: edp = {legal.layout.edp}, dp*cp = {legal.layout.dp}*2") in out
    runnable = search(load_job(str(moe)), {**parse_layout(pins), "cp": 2}, top=1,
                      runnable_only=True).best
    assert runnable.layout.short() == Layout(**ran).short()


def test_run_refuses_an_unrunnable_plan_file_before_any_rank_starts(tmp_path, capsys,
                                                                   monkeypatch):
    import plait.runtime.launch as launch

    moe_job = load_job(str(ROOT / "specs" / "jobs" / "tiny-moe-local.plait"))
    path = tmp_path / "plan.json"
    path.write_text(hand_plan(moe_job, Layout(cp=2, dp=4, ep=2, edp=4, dp_kind="fsdp")).to_json())
    monkeypatch.setattr(launch, "launch_local", lambda *a, **k: pytest.fail("ranks started"))
    code = main(["run", str(ROOT / "specs" / "jobs" / "tiny-moe-local.plait"), "--plan",
                 str(path), "--run-dir", str(tmp_path / "rd")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "rd").exists()
    assert "plait cannot run this yet (moe-fsdp-experts)" in err
    assert "edp = 4, dp*cp = 4*2 = 8" in err


def _spec_job(name: str, **changes):
    job = load_job(str(ROOT / "specs" / "jobs" / f"{name}.plait"))
    model = {k: v for k, v in changes.items() if k not in ("seq_len",)}
    return replace(job, model=replace(job.model, **model), seq_len=changes.get("seq_len", job.seq_len))


def _moe(**changes):
    return replace(load_job(str(ROOT / "specs" / "jobs" / "tiny-moe-local.plait")).model.moe,
                   **changes)


def _mamba(**changes):
    return replace(load_job(str(ROOT / "specs" / "jobs" / "tiny-hybrid-local.plait")).model.mamba,
                   **changes)


def _mlp(**changes):
    return replace(load_job(str(ROOT / "specs" / "jobs" / "tiny-local.plait")).model.mlp, **changes)


# One refused layout per row of the table (rule name -> job, layout, the arithmetic it shows)
REFUSALS = {
    "names": ("tiny-local", {}, Layout(dp=8, dp_kind="zero7"), r"dp_kind = 'zero7' is not one of"),
    "world": ("tiny-local", {}, Layout(tp=2, pp=2), r"2\*1\*1\*2 = 4 but the cluster has 8"),
    "expert-world": ("tiny-moe-local", {}, Layout(dp=8, ep=2, edp=2),
                     r"etp\*ep\*edp\*pp = 1\*2\*2\*1 = 4 but tp\*cp\*dp\*pp = 8"),
    "no-experts": ("tiny-local", {}, Layout(dp=8, ep=2, edp=4), r"has no MoE layers: ep must be 1"),
    "context": ("tiny-local", {"seq_len": 100}, Layout(cp=8),
                r"seq_len \(100\) must be divisible by 2\*cp = 16 .*: 100 % 16 = 4"),
    "sequence-parallel": ("tiny-local", {"seq_len": 127}, Layout(tp=2, dp=4, sp=True),
                          r"seq_len/cp = 127/1 = 127 tokens over tp = 2: 127 % 2 = 1"),
    "stages": ("tiny-local", {}, Layout(pp=8), r"4 decoder layers cannot fill pp\*vpp = 8\*1 = 8"),
    "batch": ("tiny-local", {}, Layout(dp=8, mbs=3),
              r"global batch \(16\) must be divisible by dp\*mbs = 8\*3 = 24: 16 % 24 = 16"),
    "vocab-tp": ("tiny-local", {"vocab": 255}, Layout(tp=2, dp=4, sp=True),
                 r"\(vocab-tp\): vocab \(255\) must be divisible by tp \(2\): 255 % 2 = 1"),
    "learned-positions-tp": ("tiny-local", {"learned_positions": True}, Layout(tp=2, dp=4, sp=True),
                             r"learned position embeddings only with tp = 1 \(tp = 2\)"),
    "learned-positions-cp": ("tiny-local", {"learned_positions": True}, Layout(cp=2, dp=4),
                             r"learned position embeddings only with cp = 1 \(cp = 2\)"),
    "attention-heads-tp": ("tiny-local", {}, Layout(tp=8, sp=True),
                           r"attention heads \(4\) must be divisible by tp \(8\): 4 % 8 = 4"),
    "attention-kv-heads-tp": ("tiny-local", {}, Layout(tp=4, dp=2, sp=True),
                              r"kv_heads \(2\) must be divisible by tp \(4\): 2 % 4 = 2"),
    "attention-heads-alltoall-cp": ("tiny-local", {}, Layout(cp=8, cp_comm="alltoall"),
                                    r"heads per tp rank \(4\) must be divisible by cp \(all-to-all\)"
                                    r" \(8\): 4 % 8 = 4"),
    "mlp-ffn-tp": ("tiny-local", {"mlp": _mlp(ffn=353)}, Layout(tp=2, dp=4, sp=True),
                   r"mlp ffn \(353\) must be divisible by tp \(2\): 353 % 2 = 1"),
    "mamba-heads-tp": ("tiny-hybrid-local", {"mamba": _mamba(heads=6)}, Layout(tp=4, dp=2, sp=True),
                       r"mamba heads \(6\) must be divisible by tp \(4\): 6 % 4 = 2"),
    "mamba-groups-tp": ("tiny-hybrid-local", {}, Layout(tp=4, dp=2, sp=True),
                        r"mamba groups \(2\) must be divisible by tp \(4\): 2 % 4 = 2"),
    "mamba-conv-halo-cp": ("tiny-hybrid-local", {"seq_len": 32}, Layout(cp=8),
                           r"\(mamba-conv-halo-cp\): a CP chunk of seq_len/\(2\*cp\) = 32/16 = 2 "
                           r"tokens is shorter than the Mamba conv halo of conv - 1 = 3"),
    "moe-experts-ep": ("tiny-moe-local", {"moe": _moe(experts=6)}, Layout(dp=8, ep=4, edp=2),
                       r"experts \(6\) must be divisible by ep \(4\): 6 % 4 = 2"),
    "moe-ffn-etp": ("tiny-moe-local", {"moe": _moe(ffn=100)}, Layout(dp=8, etp=8, edp=1),
                    r"expert ffn \(100\) must be divisible by etp \(8\): 100 % 8 = 4"),
    "moe-shared-ffn-tp": ("tiny-moe-local", {"moe": _moe(shared_ffn=251)},
                          Layout(tp=2, dp=4, etp=2, edp=4, sp=True),
                          r"shared expert ffn \(251\) must be divisible by tp \(2\): 251 % 2 = 1"),
    "moe-sequence-parallel": ("tiny-moe-local", {}, Layout(tp=2, dp=4, etp=2, edp=4),
                              r"MoE layers with tp = 2 need sequence parallelism"),
    "moe-fsdp-experts": ("tiny-moe-local", {}, Layout(cp=2, dp=4, ep=2, edp=4, dp_kind="fsdp"),
                         r"\(moe-fsdp-experts\): fsdp shards expert weights only when edp = dp\*cp:"
                         r" edp = 4, dp\*cp = 4\*2 = 8"),
}


def test_every_row_of_the_table_has_a_refusal_case():
    from plait.ir import kinds, legality

    rows = {r.name for r in legality.CORE} | {r.name for k in kinds.names()
                                              for r in kinds.facet(k, "rules").RULES}
    assert rows == set(REFUSALS)


@pytest.mark.parametrize("rule", sorted(REFUSALS))
def test_launch_refuses_each_illegal_or_unrunnable_layout_with_its_arithmetic(rule):
    name, changes, layout, message = REFUSALS[rule]
    job = _spec_job(name, **changes)
    with pytest.raises(LayoutError, match=message):
        check_plan(job, hand_plan(job, layout))


def test_run_options_hold_every_path_absolute(job, tmp_path, monkeypatch):
    from plait.runtime.launch import Checkpointing, run_options

    monkeypatch.chdir(tmp_path)
    options = run_options(job, steps=7, weights="hf/model.safetensors", max_restarts=2,
                          ckpt=Checkpointing(save="ck", every=3, resume="old/step-000004"))
    assert options == {"steps": 7, "timeout_s": job.timeout, "max_restarts": 2,
                       "weights": str(tmp_path / "hf" / "model.safetensors"),
                       "save": str(tmp_path / "ck"), "save_every": 3,
                       "resume": str(tmp_path / "old" / "step-000004"), "async_save": False}
