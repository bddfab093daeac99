"""`plait prune JOB --plan-only` and its errors through plait.cli.main, as a user runs it."""
import json
from pathlib import Path

from plait.cli import main
from plait.ir import counts
from plait.ir.plan import PrunePlan

JOBS = Path(__file__).resolve().parents[1] / "specs" / "jobs"
NEMOTRON = str(JOBS / "nemotron-h-8b-prune-4.5b.plait")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_only_prints_ranked_candidates(capsys):
    code, out, _ = run(capsys, "prune", NEMOTRON, "--plan-only", "--top", "3")
    assert code == 0
    assert "prune nemotron-h-8b-4.5b: nemotron-h-8b, 8.101 B params -> 3 ranked candidates" in out
    rows = [line for line in out.splitlines() if line[:2].strip() in ("1", "2", "3")]
    assert len(rows) == 3 and all("mamba" in r and "hidden" in r for r in rows)
    assert out.count("planned as tp1 cp2 dp4 pp1") == 3
    assert "importance: uniform" in out and "1 ILP solves" in out


def test_plan_only_json_is_a_prune_plan(capsys):
    code, out, _ = run(capsys, "prune", NEMOTRON, "--plan-only", "--json")
    plan = PrunePlan.from_json(out)
    assert code == 0 and plan.source == "nemotron-h-8b" and len(plan.candidates) == 5
    assert plan.chosen.params == counts.params(plan.model).total <= 4.5e9
    assert [k.layer for k in plan.layers] == list(range(52))


def test_unreachable_target_is_a_clean_error(capsys, tmp_path):
    text = (JOBS / "llama-3.1-8b-prune-4.5b.plait").read_text().replace("params = 4.5e9", "params = 1e8")
    path = tmp_path / "job.plait"
    path.write_text(text.replace('"../', f'"{JOBS}/../').replace(f'use "{JOBS}/../', 'use "')
                    .replace(f'"{JOBS}/../clusters', '"clusters'))  # `use` finds the library on its path
    code, out, err = run(capsys, "prune", str(path), "--plan-only")
    assert code == 2 and "Traceback" not in err
    assert "unreachable target: params 100,000,000 is below the smallest legal model's" in err


def test_full_run_without_weights_says_so(capsys, tmp_path):
    code, _, err = run(capsys, "prune", NEMOTRON, "--out", str(tmp_path / "run"))
    assert code == 2 and "weight file not found" in err and "nemotron-h-8b-base-8k" in err
