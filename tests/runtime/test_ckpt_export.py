"""`plait export hf`: a checkpoint becomes a Hugging Face model directory that transformers loads
with no missing or unexpected keys and the same logits; HF -> --weights -> save -> export gives
back the very tensors when no step was taken. The tier-2 test does every family from checkpoints
sharded over TP and EP; the tier-1 ones a one-rank llama through the CLI."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from plait.cli import main  # noqa: E402
from plait.ir.errors import PlaitError  # noqa: E402
from plait.ir.hf import model_from_hf_file  # noqa: E402
from plait.ir.model import MLP, Attention, ModelSpec  # noqa: E402
from plait.ir.plan import Layout  # noqa: E402
from plait.runtime.ckpt_export import export_hf  # noqa: E402
from plait.runtime.harness.parity import TIMEOUT_S, Setup  # noqa: E402
from plait.runtime.spawn import start_ranks  # noqa: E402

from ckpt_util import single_rank  # noqa: E402
from export_util import FAMILIES, check_export, logit_diff, save_from_hub, save_hub_model, tensors  # noqa: E402

SHARD_BYTES = 16 << 10  # small shards: every tiny model spans several files
DATA_SPEC = ModelSpec(name="tok", vocab=16, hidden=16, layers=("attention", "mlp"),
                      attention=Attention(heads=2, kv_heads=2, head_dim=8), mlp=MLP(ffn=16))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    hub = tmp / "hub"
    save_hub_model(FAMILIES["llama"], hub)
    with single_rank(tmp):
        save_from_hub(hub, Layout(), tmp / "ckpt")
    return tmp


def test_cli_exports_a_checkpoint_that_transformers_loads(llama, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "hf", str(llama / "ckpt"), "-o", str(out), "--dtype", "fp32",
                 "--max-shard-mb", "1"]) == 0
    assert "llama model after step 0" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    export_hf(llama / "ckpt", tmp_path / "sharded", "fp32", max_shard_bytes=SHARD_BYTES)
    assert check_export(tmp_path / "sharded", llama / "hub", "llama") <= 1e-5


def test_bf16_by_default_and_refusals_named(llama, tmp_path, capsys):
    done = export_hf(llama / "ckpt", tmp_path / "bf16")
    assert done["family"] == "llama" and done["tokenizer"] is None
    assert {t.dtype for t in tensors(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(PlaitError, match="cannot be written as a qwen3 config"):
        export_hf(llama / "ckpt", tmp_path / "q", family="qwen3")  # no q/k norms in this model
    assert main(["export", "hf", str(llama / "ckpt"), "-o", str(llama / "hub")]) == 2
    assert "not empty and plait did not create it" in capsys.readouterr().err
    assert main(["export", "hf", str(llama / "ckpt")]) == 2
    assert "needs -o DIR" in capsys.readouterr().err


def test_a_pruned_student_exports_with_its_new_shapes(llama, tmp_path):
    """A `plait prune` run directory (model.plait + distilled weights) exports like a checkpoint."""
    from plait.ir.dsl.fmt import format_model
    from plait.ir.job import AxisSearch, PruneJob
    from plait.ir.outputs import claim_output_dir
    from plait.lowering.build import build_model
    from plait.lowering.prune.checkpoint import save_weights
    from plait.lowering.prune.slicing import slice_state_dict
    from plait.lowering.weights import load_hf_weights
    from plait.planner.prune.plan import plan_prune

    spec = model_from_hf_file(str(llama / "hub"))
    teacher = build_model(spec, seed=0)
    load_hf_weights(teacher, str(llama / "hub"), spec)
    widths = {"ffn": 32, "attention_heads": 2}
    plan = plan_prune(PruneJob(name="p", model=spec, axes=tuple(
        AxisSearch(a, "fixed", value=v) for a, v in widths.items()))).plan
    student_state = slice_state_dict(teacher.state_dict(), spec, plan)
    run = claim_output_dir(tmp_path / "run", "prune run")
    (run / "model.plait").write_text(format_model(plan.model))
    save_weights(student_state, run / "distilled.safetensors")

    assert main(["export", "hf", str(run), "-o", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"]) == (32, 2)
    student = build_model(plan.model, seed=3)
    student.load_state_dict(student_state)
    assert logit_diff(tmp_path / "hf", student) <= 1e-5


def _sharded_worker(rank: int, world: int, jobs: list, out: str) -> None:
    from plait.runtime.mesh import destroy, init_distributed

    torch.set_num_threads(1)
    init_distributed("gloo", TIMEOUT_S, f"file://{out}/rendezvous", rank, world)
    try:
        for family, layout in jobs:
            save_from_hub(Path(out) / f"hub-{family}", layout, Path(out) / f"ckpt-{family}")
    finally:
        destroy()


DENSE, MOE = Layout(tp=2, sp=True), Layout(tp=2, sp=True, ep=2)


@pytest.mark.tier2
def test_every_family_exports_from_a_sharded_checkpoint(tmp_path):
    jobs = [(f, MOE if "moe" in f or f in ("mixtral", "nemotron_h", "deepseek_v3") else DENSE)
            for f in FAMILIES]
    for family, _ in jobs:
        save_hub_model(FAMILIES[family], tmp_path / f"hub-{family}")
    start_ranks(_sharded_worker, (2, jobs, str(tmp_path)), 2)
    diffs = {}
    for family, _ in jobs:
        out = tmp_path / f"hf-{family}"
        export_hf(tmp_path / f"ckpt-{family}", out, "fp32",
                  family="mistral" if family == "mistral" else None, max_shard_bytes=SHARD_BYTES)
        diffs[family] = check_export(out, tmp_path / f"hub-{family}", family)
    print({f: f"{d:.1e}" for f, d in diffs.items()})  # measured (pytest -s)
    assert all(d <= 1e-5 for d in diffs.values()), diffs


def test_the_runs_hf_tokenizer_is_exported_beside_the_weights(tmp_path):
    """A dataset prepared with an HF tokenizer (a local one: no network) names it in the
    checkpoint's job fields; the export saves its files so AutoTokenizer loads the model dir."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from plait.runtime.ckpt_export import _tokenizer
    from plait.runtime.ckpt_integrity import job_fields
    from plait.runtime.data import prepare

    words = ["<unk>", "the", "cat", "sat", "on", "mat", "</s>"]  # </s>: EOS between documents
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>",
                                         eos_token="</s>").save_pretrained(tok_dir)
    (tmp_path / "text.txt").write_text("the cat sat on the mat\n")
    prepare([tmp_path / "text.txt"], tmp_path / "data", str(tok_dir))
    job = Setup(DATA_SPEC, global_batch=4, seq=8).job(1)
    job = replace(job, data=replace(job.data, synthetic=False, path=str(tmp_path / "data")))
    fields = job_fields(job, 2)
    assert fields["dataset"]["tokenizer"] == str(tok_dir)
    out = tmp_path / "hf"
    out.mkdir()
    assert _tokenizer({"job_fields": fields}, out) == str(tok_dir)
    loaded = transformers.AutoTokenizer.from_pretrained(str(out))
    assert loaded.encode("the cat", add_special_tokens=False) == [1, 2]
