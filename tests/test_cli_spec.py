"""`plait show / fmt / check / demo` through plait.cli.main, as a user runs them."""
import json
from pathlib import Path

import pytest

from plait.cli import main
from plait.ir import counts
from plait.ir.dsl import load_file, load_model, parse_text

SPECS = Path(__file__).resolve().parents[1] / "specs"
LLAMA = str(SPECS / "models" / "llama-3.1-8b.plait")
MIXTRAL_JOB = str(SPECS / "jobs" / "mixtral-8x22b-128gpu.plait")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_show_json_of_a_model(capsys):
    code, out, _ = run(capsys, "show", LLAMA, "--json")
    report = json.loads(out)
    model = load_model(LLAMA)
    assert code == 0
    assert report["params_total"] == 8030261248 == counts.params(model).total
    assert report["params_active"] == report["params_total"]
    assert report["seq_len"] == 4096
    assert report["flops_per_token"] == counts.flops_per_token(model, 4096)
    assert report["bytes"]["weights"] == 2 * 8030261248  # bf16 weights


def test_show_json_of_a_job_uses_its_model_seq_len_and_precision(capsys):
    code, out, _ = run(capsys, "show", MIXTRAL_JOB, "--json")
    report = json.loads(out)
    job = load_file(MIXTRAL_JOB).jobs["mixtral-8x22b-128gpu"]
    assert code == 0 and report["model"] == "mixtral-8x22b" and report["seq_len"] == 4096
    assert report["params_total"] == 140620634112 and report["params_active"] < report["params_total"]
    assert report["flops_per_token"] == counts.flops_per_token(job.model, 4096)
    assert report["job"] == {"name": job.name, "cluster": "dgx-h100", "gpus": 128, "global_batch": 256,
                             "tokens_per_step": 256 * 4096}
    assert set(report["params_per_kind"]) == {"attention", "moe"}


def test_show_table(capsys):
    code, out, _ = run(capsys, "show", MIXTRAL_JOB, "--seq-len", "2048")
    assert code == 0
    for text in ("mixtral-8x22b", "140,620,634,112", "active per token", "moe x 56", "seq 2048", "optimizer (bf16"):
        assert text in out, text


def test_fmt_prints_a_canonical_file_that_parses_to_the_same_ir(capsys):
    code, out, _ = run(capsys, "fmt", MIXTRAL_JOB)
    code_lines = [line for line in out.splitlines() if not line.startswith("#")]  # comments are kept
    assert code == 0 and code_lines[0] == 'use "../models/mixtral-8x22b.plait", "../clusters/dgx-h100.plait"'
    again = parse_text(out, base_dir=str(SPECS / "jobs"))
    assert again.jobs == load_file(MIXTRAL_JOB).jobs
    code, whole, _ = run(capsys, "fmt", "--all", MIXTRAL_JOB)
    assert code == 0 and "use " not in whole and 'device "h100-sxm5-80gb"' in whole
    assert parse_text(whole).jobs == again.jobs


def test_check_reports_what_it_loaded(capsys):
    code, out, _ = run(capsys, "check", MIXTRAL_JOB, LLAMA)
    assert code == 0
    assert out.splitlines() == [f"ok: 1 model, 1 device, 1 cluster, 1 job ({MIXTRAL_JOB})",
                                f"ok: 1 model, 0 devices, 0 clusters, 0 jobs ({LLAMA})"]


def test_spec_errors_print_location_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.plait"
    bad.write_text('model "m" {\n  vocab = 256\n  hiden = 128\n}\n')
    for command in ("check", "show", "fmt"):
        code, out, err = run(capsys, command, str(bad))
        assert code == 2 and out == ""
        assert f"{bad}:3:3: error: unknown key 'hiden'" in err
        assert "hint: did you mean 'hidden'?" in err and "Traceback" not in err


def test_missing_file_exits_2(tmp_path, capsys):
    code, _, err = run(capsys, "check", str(tmp_path / "nope.plait"))
    assert code == 2 and "no such file" in err


def test_show_needs_a_name_when_a_file_declares_several(tmp_path, capsys):
    two = tmp_path / "two.plait"
    two.write_text((SPECS / "models" / "tiny-dense.plait").read_text() +
                   (SPECS / "models" / "tiny-hybrid.plait").read_text())
    code, _, err = run(capsys, "show", str(two))
    assert code == 2 and "--name" in err
    code, out, _ = run(capsys, "show", str(two), "--name", "tiny-hybrid", "--json")
    assert code == 0 and json.loads(out)["model"] == "tiny-hybrid"


@pytest.mark.tier2
def test_demo_shows_plans_and_trains_the_tiny_local_job(capsys):
    code, out, _ = run(capsys, "demo", "--steps", "3")
    assert code == 0 and "tiny-local" in out and "tiny-dense" in out and "803,968" in out
