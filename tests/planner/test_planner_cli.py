"""`plait plan / estimate / groups / export megatron` end to end through the CLI."""
import json
from pathlib import Path

from plait.cli import main
from plait.ir.plan import ParallelPlan

SPECS = Path(__file__).resolve().parents[2] / "specs"
TINY = str(SPECS / "jobs" / "tiny-local.plait")


def job16(tmp_path):
    path = tmp_path / "mixtral16.plait"
    path.write_text(
        'use "models/mixtral-8x22b.plait", "clusters/dgx-h100.plait"\n'  # found on the library path
        'train "mixtral-16" {\n  model = "mixtral-8x22b"\n  cluster = "dgx-h100"\n  gpus = 16\n'
        '  global_batch = 32\n  seq_len = 4096\n}\n')
    return str(path)


def test_groups_json_matches_the_issue_example(tmp_path, capsys):
    assert main(["groups", job16(tmp_path), "--layout", "tp=2 cp=2 pp=2 ep=4 etp=1"]) == 0
    g = json.loads(capsys.readouterr().out)
    assert list(g) == ["dense", "expert"]
    assert list(g["dense"]) == ["tp", "cp", "dp", "dp-cp", "pp", "tp-pp"]
    assert list(g["expert"]) == ["ep", "etp", "etp-ep", "edp", "pp"]
    assert g["dense"]["dp"][:5] == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12]]
    assert g["dense"]["cp"][:3] == [[0, 2], [1, 3], [4, 6]]
    assert g["expert"]["ep"][:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["expert"]["edp"][:2] == [[0, 4], [1, 5]]
    assert g["dense"]["pp"][:2] == g["expert"]["pp"][:2] == [[0, 8], [1, 9]]


def test_bad_layout_is_a_clean_error(tmp_path, capsys):
    assert main(["groups", job16(tmp_path), "--layout", "tp=3"]) == 2
    err = capsys.readouterr().err
    assert "tp = 3 does not divide the 16 GPUs" in err and "Traceback" not in err


def test_estimate_json(capsys):
    assert main(["estimate", TINY, "--layout", "tp=2 pp=2 mbs=1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"]["tp"] == 2 and plan["layout"]["pp"] == 2
    assert plan["prediction"]["step_time"] > 0 and len(plan["prediction"]["memory"]) == 2


def test_estimate_json_carries_the_band(capsys):
    """The band beside the plan: it holds the step, names its top keys and each key's delta."""
    assert main(["estimate", TINY, "--layout", "tp=2 pp=2 mbs=1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    band, step = plan["uncertainty"], plan["prediction"]["step_time"]
    assert band["low"] < step < band["high"] and band["step_time"] == step
    assert band["top"] == [k["key"] for k in band["keys"]][:3] and len(band["top"]) == 3
    assert all(k["fast"] <= 0 <= k["slow"] and k["origin"] == "default" for k in band["keys"]
               if k["key"].startswith("gemm"))
    assert ParallelPlan.from_json(json.dumps(plan)).layout.tp == 2  # still a plan `--plan` reads


def test_plan_writes_json_and_export_prints_megatron_args(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", TINY, "--explain", "-o", str(out), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "candidate plans" in text and "wins" in text and "rejected families" in text
    assert "values nobody measured on this machine; most: " in " ".join(text.split())
    assert main(["export", "megatron", TINY, "--plan", str(out)]) == 0
    args = capsys.readouterr().out
    plan = json.loads(out.read_text())
    assert f"--tensor-model-parallel-size {plan['layout']['tp']}" in args
    assert f"--pipeline-model-parallel-size {plan['layout']['pp']}" in args
    assert "--global-batch-size 16" in args


def test_export_rejects_a_non_plan(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    assert main(["export", "megatron", TINY, "--plan", str(bad)]) == 2
    assert "not a plan JSON" in capsys.readouterr().err
