"""`plait import hf`: writes a spec that loads back to the imported model; bad input exits 2."""
import json
from pathlib import Path

import pytest

from plait.cli import main
from plait.ir import counts
from plait.ir.dsl import load_model
from plait.ir.hf import model_from_hf_file

SPECS = Path(__file__).resolve().parents[2] / "specs" / "hf"


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2-57b-a14b", "nemotron-h-47b", "deepseek-v3"])
def test_written_spec_loads_back_equal(tmp_path, name):
    out = tmp_path / "model.plait"
    assert main(["import", "hf", str(SPECS / f"{name}.json"), "-o", str(out), "--name", name]) == 0
    loaded = load_model(str(out), name)
    assert loaded == model_from_hf_file(str(SPECS / f"{name}.json"), name)
    assert f"# {counts.params(loaded).total:,} parameters" in out.read_text()


def test_deepseek_v3_import_says_it_leaves_out_multi_token_prediction(capsys):
    assert main(["import", "hf", str(SPECS / "deepseek-v3.json")]) == 0
    out = capsys.readouterr().out
    assert "# 671,026,404,352 parameters" in out
    assert "# note: 1 multi-token-prediction layer(s) (num_nextn_predict_layers) not imported" in out


def test_prints_to_stdout_without_output(capsys):
    assert main(["import", "hf", str(SPECS / "mixtral-8x7b.json")]) == 0
    assert 'model "mixtral-8x7b-v0.1" {' in capsys.readouterr().out


def test_unsupported_field_exits_2_naming_it(tmp_path, capsys):
    cfg = json.loads((SPECS / "llama-3.1-8b.json").read_text()) | {"sliding_window": 4096}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["import", "hf", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "sliding_window = 4096" in err and "Traceback" not in err


def test_invalid_json_exits_2(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    assert main(["import", "hf", str(path)]) == 2
    assert "not valid JSON" in " ".join(capsys.readouterr().err.split())
