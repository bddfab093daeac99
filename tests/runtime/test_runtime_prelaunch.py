"""`plait run` refuses bad inputs before any rank starts, naming the file and the mismatch."""
import json
from pathlib import Path

import numpy as np
import pytest

from plait.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "specs" / "jobs" / "tiny-local.plait"  # vocab 256, global batch 16, seq_len 128


def dataset(path: Path, ids, tokenizer: str = "byte", vocab: int = 256) -> Path:
    """A dataset directory as `plait data prepare` writes it."""
    path.mkdir(parents=True)
    np.asarray(ids, dtype=np.uint16).tofile(path / "tokens.bin")
    (path / "meta.json").write_text(json.dumps({"tokenizer": tokenizer, "vocab": vocab,
                                                "dtype": "uint16", "num_tokens": len(ids)}))
    return path


def refused(capsys, *argv) -> str:
    assert main(["run", str(TINY), "--layout", "tp=2 pp=2", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


ENOUGH = 16 * 128 + 1  # one global batch of 16 windows of 129 tokens (windows share an end token)


def test_an_empty_dataset_is_refused(tmp_path, capsys):
    err = refused(capsys, "--data", dataset(tmp_path / "d", []))
    assert f"dataset {tmp_path / 'd'} is empty" in err


def test_a_dataset_shorter_than_one_global_batch_is_refused_with_the_arithmetic(tmp_path, capsys):
    err = refused(capsys, "--data", dataset(tmp_path / "d", [1] * (ENOUGH - 1)))
    assert "15 training windows of seq_len + 1 = 129 tokens, fewer than one global batch of 16" in err


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path, capsys):
    ids = [3] * ENOUGH
    ids[1000] = 300
    err = refused(capsys, "--data", dataset(tmp_path / "d", ids, vocab=256))
    assert "holds token id 300; model 'tiny-dense' has a vocabulary of 256 (ids 0..255)" in err


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path, capsys):
    err = refused(capsys, "--data", dataset(tmp_path / "d", [3] * ENOUGH, "gpt2", vocab=50257))
    assert "uses a vocabulary of 50257 tokens, more than the model's 256" in err


def test_the_checkpoints_tokenizer_must_be_the_datasets(tmp_path):
    from plait.ir.dsl import load_job
    from plait.ir.errors import PlaitError
    from plait.runtime.prelaunch import check_dataset

    weights = tmp_path / "hf"
    weights.mkdir()
    (weights / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": {f"t{i}": i for i in range(250)}},
         "added_tokens": [{"id": 250, "content": "<s>"}, {"id": 0, "content": "t0"}]}))
    job = load_job(str(TINY))
    from dataclasses import replace
    byte = replace(job, data=replace(job.data, path=str(dataset(tmp_path / "b", [3] * ENOUGH))))
    with pytest.raises(PlaitError, match="is byte-tokenized, but --weights .* ships its own "
                                         r"tokenizer \(251 tokens\)"):
        check_dataset(byte, str(weights))
    other = replace(job, data=replace(job.data, path=str(
        dataset(tmp_path / "o", [3] * ENOUGH, "some/tok", vocab=240))))
    with pytest.raises(PlaitError, match="tokenizer 'some/tok' has 240 tokens; the tokenizer of "
                                         "--weights .* has 251"):
        check_dataset(other, str(weights))
    same = replace(job, data=replace(job.data, path=str(
        dataset(tmp_path / "s", [3] * ENOUGH, str(weights), vocab=251))))
    check_dataset(same, str(weights))


def test_a_job_without_data_is_refused_unless_the_bundled_corpus_is_asked_for(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PLAIT_PATH", str(ROOT / "specs"))
    spec = tmp_path / "nodata.plait"
    spec.write_text(TINY.read_text().replace("  data = synthetic\n", "").replace('"../', '"'))
    assert main(["run", str(spec), "--layout", "tp=2 pp=2", "--steps", "0"]) == 2  # args first
    capsys.readouterr()
    assert main(["run", str(spec), "--layout", "tp=2 pp=2", "--print-launch", "--run-dir",
                 str(tmp_path / "rd")]) == 2
    err = capsys.readouterr().err
    assert "job 'tiny-local' names no dataset" in err and "--data bundled" in err
    assert not (tmp_path / "rd").exists()
    assert main(["run", str(spec), "--layout", "tp=2 pp=2", "--print-launch", "--run-dir",
                 str(tmp_path / "rd"), "--data", "bundled"]) == 0
    job = json.loads((tmp_path / "rd" / "job.json").read_text())
    assert job["data"]["path"] == str((tmp_path / "rd" / "bundled-corpus").resolve())
