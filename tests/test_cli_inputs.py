"""Bad command-line input is a clear error before any work starts, and nothing a user owns is
deleted or overwritten: layouts, `data prepare`, `run`, `compile`, `prune`, `import hf`, `plan -o`."""
import json
from pathlib import Path

import pytest

from plait.cli import main
from plait.ir.dsl import load_prune_job
from plait.ir.errors import PlaitError
from plait.ir.outputs import MARKER

SPECS = Path(__file__).resolve().parents[1] / "specs"
TINY = str(SPECS / "jobs" / "tiny-local.plait")
PRUNE = str(SPECS / "jobs" / "tiny-dense-prune.plait")
HF = SPECS / "hf" / "mixtral-8x7b.json"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


def refused(capsys, *argv) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    return err


def precious(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "thesis.tex").write_text("years of work")
    return directory


def untouched(directory: Path) -> bool:
    return sorted(p.name for p in directory.iterdir()) == ["thesis.tex"]


# --- layouts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["plan", "estimate", "groups", "run"])
def test_a_repeated_layout_key_is_an_error(capsys, command):
    err = refused(capsys, command, TINY, "--layout", "dp=8 dp=2")
    assert "dp is given twice" in err


# --- plait data prepare ---------------------------------------------------------------------------

def test_prepare_refuses_an_empty_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    err = refused(capsys, "data", "prepare", tmp_path / "empty.txt", "-o", tmp_path / "ds")
    assert "empty.txt holds no text" in err and not (tmp_path / "ds").exists()


def test_prepare_refuses_binary_and_non_utf8_files(tmp_path, capsys):
    (tmp_path / "a.bin").write_bytes(b"\x7fELF\x02\x01\x00\x00binary")
    assert "a.bin is a binary file" in refused(capsys, "data", "prepare", tmp_path / "a.bin", "-o", tmp_path / "ds")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    err = refused(capsys, "data", "prepare", "bundled", tmp_path / "latin1.txt", "-o", tmp_path / "ds")
    # found while streaming (after the bundled corpus was written): nothing is left behind
    assert "latin1.txt:1: not UTF-8 text (byte 3 of the line)" in err and not (tmp_path / "ds").exists()


def test_prepare_refuses_an_existing_file_as_output(tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    err = refused(capsys, "data", "prepare", "bundled", "-o", tmp_path / "out")
    assert "exists and is not a directory" in err and (tmp_path / "out").read_text() == "mine"


def test_prepare_writes_only_into_new_empty_or_its_own_directories(tmp_path, capsys):
    err = refused(capsys, "data", "prepare", "bundled", "-o", precious(tmp_path / "mine"))
    assert "not empty and plait did not create it" in err and untouched(tmp_path / "mine")
    (tmp_path / "empty").mkdir()
    for out in ("ds", "empty"):  # new, empty
        assert run(capsys, "data", "prepare", "bundled", "-o", tmp_path / out)[0] == 0
    err = refused(capsys, "data", "prepare", "bundled", "-o", tmp_path / "ds")  # a dataset: kept
    assert "already holds a dataset" in err and (tmp_path / "ds" / "text_document.idx").is_file()
    assert json.loads((tmp_path / "ds" / MARKER).read_text())["kind"] == "dataset"


# --- plait run / compile --------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "-1"], "--steps must be at least 1, got -1"),
    (["--save-every", "-2"], "--save-every must be at least 0"),
    (["--save-every", "5"], "--save-every needs --save DIR"),
    (["--name", "nope"], 'no train job named "nope"'),
    (["--data", "nowhere"], "no dataset at nowhere"),
    (["--data", "x", "--synthetic"], "--data and --synthetic exclude each other"),
    (["--plan", "p.json", "--layout", "tp=2"], "--layout has no effect with --plan"),
    (["--resume", "nowhere"], "--resume nowhere does not exist"),
])
def test_run_checks_its_arguments_before_planning(capsys, argv, message):
    assert message in refused(capsys, "run", TINY, *argv)


def test_run_save_must_be_a_directory_it_can_create(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert "--save" in refused(capsys, "run", TINY, "--save", tmp_path / "file")
    assert "is a file, so the directory cannot be created" in refused(
        capsys, "run", TINY, "--save", tmp_path / "file" / "ckpt")
    assert (tmp_path / "file").read_text() == "mine"


def test_run_weights_must_hold_safetensors(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert "holds no *.safetensors files" in refused(capsys, "run", TINY, "--weights", tmp_path)
    assert "is not a .safetensors file" in refused(capsys, "run", TINY, "--weights", tmp_path / "notes.txt")


def _tiny_hf_checkpoint(path: Path, ffn: int) -> Path:
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(
        model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=ffn, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    return path


def test_run_weights_of_another_model_are_refused_before_any_rank_starts(tmp_path, capsys):
    from plait.runtime.prelaunch import check_weights
    from plait.ir.dsl import load_job

    job = load_job(TINY)
    check_weights(job, str(_tiny_hf_checkpoint(tmp_path / "right", ffn=352)))
    err = refused(capsys, "run", TINY, "--weights", _tiny_hf_checkpoint(tmp_path / "wrong", ffn=96))
    assert "is (96, 128) in the checkpoint" in err and "needs (352, 128)" in err


def test_run_dir_must_not_be_a_users_directory(tmp_path, capsys):
    err = refused(capsys, "run", TINY, "--run-dir", precious(tmp_path / "mine"))
    assert "not empty and plait did not create it" in err and untouched(tmp_path / "mine")


def test_a_plan_file_that_is_not_a_plan_is_an_error(tmp_path, capsys):
    (tmp_path / "p.json").write_text('{"a": 1}')
    assert "is not a plan JSON" in refused(capsys, "run", TINY, "--plan", tmp_path / "p.json")


def test_compile_checks_ranks_and_its_output_directory(tmp_path, capsys):
    assert "99 is not a rank of this plan (0..7)" in refused(
        capsys, "compile", TINY, "-o", tmp_path / "out", "--ranks", "0,99")
    assert "write comma-separated rank numbers" in refused(
        capsys, "compile", TINY, "-o", tmp_path / "out", "--ranks", "zero")
    assert "not empty and plait did not create it" in refused(
        capsys, "compile", TINY, "-o", precious(tmp_path / "mine"))
    assert untouched(tmp_path / "mine") and not (tmp_path / "out").exists()


# --- plait prune ----------------------------------------------------------------------------------

def test_prune_fresh_never_deletes_a_directory_plait_did_not_create(tmp_path, capsys):
    mine = precious(tmp_path / "mine")
    err = refused(capsys, "prune", PRUNE, "--out", mine, "--fresh")
    assert f"{mine} is not empty and plait did not create it" in err and "delete" in err
    assert untouched(mine)
    assert "not empty and plait did not create it" in refused(capsys, "prune", PRUNE, "--out", mine)
    assert untouched(mine)


def test_prune_fresh_starts_over_in_its_own_directory(tmp_path):
    from plait.pruning import open_run

    job = load_prune_job(PRUNE)
    run = open_run(job, str(tmp_path / "run"))
    (run.root / "importance.json").write_text("{}")
    other = load_prune_job(PRUNE).__class__(**{**vars(job), "name": "another"})
    with pytest.raises(PlaitError, match="holds a run of a different"):
        open_run(other, str(tmp_path / "run"))
    open_run(other, str(tmp_path / "run"), fresh=True)
    assert sorted(p.name for p in run.root.iterdir()) == [MARKER, "job.json"]


def test_show_and_demo_numbers_are_checked(capsys):
    assert "--seq-len must be at least 1" in refused(capsys, "show", SPECS / "models" / "tiny-dense.plait",
                                                     "--seq-len", "0")
    assert "--steps must be at least 1, got -1" in refused(capsys, "demo", "--steps", "-1")


def test_prune_numbers_are_checked(capsys):
    assert "--top must be at least 1" in refused(capsys, "prune", PRUNE, "--plan-only", "--top", "0")
    assert "--train-teacher must be at least 1" in refused(capsys, "prune", PRUNE, "--train-teacher", "-5")


def test_train_teacher_never_overwrites_weights_plait_did_not_write(tmp_path):
    from dataclasses import replace

    from plait.pruning import train_teacher

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a user's checkpoint")
    job = replace(load_prune_job(PRUNE), weights=str(weights), output=str(tmp_path / "run"))
    with pytest.raises(PlaitError, match="would overwrite .* which plait did not write"):
        train_teacher(job, 1)
    assert weights.read_bytes() == b"a user's checkpoint" and not (tmp_path / "run").exists()


# --- plait import hf / plan -o --------------------------------------------------------------------

def test_import_hf_accepts_a_model_directory(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(HF.read_text())
    code, out, _ = run(capsys, "import", "hf", tmp_path / "model")
    assert code == 0 and 'model "mixtral-8x7b-v0.1" {' in out
    assert "without a config.json" in refused(capsys, "import", "hf", tmp_path)


def test_import_hf_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(HF.read_text())
    err = refused(capsys, "import", "hf", config, "-o", config)
    assert "plait did not write it; refusing to overwrite it" in err and config.read_text() == HF.read_text()
    out = tmp_path / "m.plait"
    assert run(capsys, "import", "hf", config, "-o", out)[0] == 0
    assert run(capsys, "import", "hf", config, "-o", out)[0] == 0  # its own output: replaced


def test_import_hf_refuses_a_name_a_spec_cannot_hold(capsys):
    assert "cannot be written in a spec" in refused(capsys, "import", "hf", HF, "--name", 'say "hi"')


def test_import_hf_refuses_what_is_not_a_config(tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "holds a JSON list, not a config object" in refused(capsys, "import", "hf", tmp_path / "list.json")
    assert "is not a regular file" in refused(capsys, "import", "hf", "/dev/zero")


def test_plan_output_never_replaces_a_file_that_is_not_a_plan(tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    assert "refusing to overwrite" in refused(capsys, "plan", TINY, "-o", notes)
    assert notes.read_text() == '{"mine": true}'
    assert "is a directory" in refused(capsys, "plan", TINY, "-o", tmp_path)


def test_plan_report_directory_is_checked_before_the_search(tmp_path, capsys):
    code, out, err = run(capsys, "plan", TINY, "--report", precious(tmp_path / "mine"))
    assert code == 2 and "not written by `plait plan --report`" in err and untouched(tmp_path / "mine")
    assert "searched" not in out  # no search ran


# --- help texts and wording -----------------------------------------------------------------------

def _subparsers():
    import argparse

    from plait.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_argument_has_help_and_cited_flags_exist():
    import re

    parser, commands = _subparsers()
    assert parser.description.endswith(".") and len(parser.description) > 60
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"plait {name} {action.option_strings or action.dest} has no help"
            for cited, flags in re.findall(r"`plait (\w+)([^`]*)`", action.help or ""):
                options = {o for a in commands[cited]._actions for o in a.option_strings}
                for flag in re.findall(r"(--?[a-z][\w-]*)", flags):
                    assert flag in options, f"plait {name} help cites `plait {cited} {flag}`, which does not exist"


def test_show_counts_layers_as_plait_and_as_hugging_face_do(capsys):
    code, out, _ = run(capsys, "show", SPECS / "models" / "mixtral-8x22b.plait")
    assert "112 layers (56 decoder layers of attention + MLP/MoE)" in out
    _, out, _ = run(capsys, "show", SPECS / "models" / "mixtral-8x22b.plait", "--json")
    assert json.loads(out)["decoder_layers"] == 56


def test_plan_on_cpu_shows_rates_and_times_that_say_something(capsys):
    code, out, _ = run(capsys, "plan", TINY)
    assert code == 0
    assert " 0 TFLOP/s" not in out and "per GPU" not in out and "per device" in out
    assert "GFLOP/s" in out
    line = next(s for s in out.splitlines() if "step time (" in s)
    theirs, ours = line.split("step time (")[1].split(")")[0].split(" vs ")
    assert theirs != ours

