"""`data { ... }` blocks: named sources, phases, their errors (with line:col), fmt and check."""
import numpy as np
import pytest

from plait.cli import main
from plait.ir.datarecipe import blend_rows, schedule, source_windows
from plait.ir.dsl import load_file, parse_text
from plait.ir.dsl.fmt import format_file
from plait.ir.errors import SpecError
from plait.ir.indexed import IndexedWriter

JOB = '''use "models/tiny-dense.plait"

train "blend" {
  model = "tiny-dense"
  global_batch = 8
  seq_len = 64
  steps = 100
  data {
    seed = 7
    sources {
      web = dataset(path = "web", epochs = EPOCHS)
      math = "math"
      code = "code"
    }
    phase1 { web = 0.7, math = 0.2, code = 0.1 }
    phase2 { at = 0.6, web = 0.4, math = 0.4, code = 0.2 }
  }
}
'''


def _dataset(prefix, tokens):
    w = IndexedWriter(prefix, np.uint16)
    w.add_document(np.arange(tokens) % 200)
    w.close()


@pytest.fixture
def specdir(tmp_path):
    for name, tokens in (("web", 64 * 300 + 1), ("math", 64 * 500 + 1), ("code", 64 * 50 + 1)):
        _dataset(tmp_path / name, tokens)
    return tmp_path


def _load(specdir, text):
    path = specdir / "job.plait"
    path.write_text(text)
    return load_file(str(path))


def test_sources_and_phases_resolve_to_absolute_paths_and_sample_starts(specdir):
    job = _load(specdir, JOB.replace("EPOCHS", "3")).jobs["blend"]
    assert [s.name for s in job.data.sources] == ["web", "math", "code"]
    assert job.data.sources[0].path == str(specdir / "web") and job.data.sources[0].epochs == 3
    assert [p.name for p in job.data.phases] == ["phase1", "phase2"] and job.data.phases[1].at == 0.6
    assert [p.start for p in schedule(job).phases] == [0, 480]  # 60% of 100 steps x 8 samples


def test_a_phase_may_start_at_a_token_count(specdir):
    job = _load(specdir, JOB.replace("EPOCHS", "3").replace("at = 0.6", "at = 16K")).jobs["blend"]
    assert job.data.phases[1].at_tokens == 16384
    assert [p.start for p in schedule(job).phases] == [0, 256]  # 16384 tokens / seq 64
    lib = _load(specdir, JOB.replace("EPOCHS", "3").replace("at = 0.6", "at = 16K"))
    again = parse_text(format_file(lib), file=str(specdir / "j.plait"), base_dir=str(specdir))
    assert again.jobs["blend"] == job


def test_resolved_blend_counts_tokens_and_epochs(specdir):
    job = _load(specdir, JOB.replace("EPOCHS", "3")).jobs["blend"]
    rows = {(r.phase, r.source): r for r in blend_rows(job, source_windows(job))}
    assert rows["phase1", "web"].samples == 336 and rows["phase2", "web"].samples == 128
    assert rows["phase1", "web"].tokens == 336 * 64
    assert rows["phase2", "code"].samples == 64 and rows["phase2", "code"].epochs == pytest.approx(64 / 50)
    assert sum(r.samples for r in rows.values()) == 800


def test_epoch_cap_exceeded_is_a_spec_error_at_the_source(specdir):
    with pytest.raises(SpecError) as err:
        _load(specdir, JOB.replace("EPOCHS", "1.5"))
    e = err.value
    assert (e.line, e.col) == (11, 7)
    assert "464 samples = 1.55 epochs of its 300 windows" in e.message and "cap of 1.5" in e.message


@pytest.mark.parametrize("edit, where, message", [
    (("code = 0.1 }", "code = 0.2 }"), (15, 5), "sum to 0.7 + 0.2 + 0.2 = 1.1, not 1"),
    (("web = 0.4, math", "web = 0.4, maths"), (16, 35), "'maths', which is not a declared source"),
    (("at = 0.6, ", ""), (16, 5), "phase phase2 needs at ="),
    (("at = 0.6", "at = 2000000"), (16, 5), "starts at sample 31,250"),
    (('math = "math"', 'math = dataset(path = "math", weight = 0.5)'), (15, 5), "both on sources"),
])
def test_blend_errors_point_at_the_spec(specdir, edit, where, message):
    with pytest.raises(SpecError) as err:
        _load(specdir, JOB.replace("EPOCHS", "3").replace(*edit))
    assert (err.value.line, err.value.col) == where and message in err.value.message


def test_weights_on_sources_make_one_blend_and_fmt_round_trips(specdir):
    one = JOB.replace("EPOCHS", "3").split("    phase1")[0] + "  }\n}\n"
    one = one.replace('math = "math"', 'math = dataset(path = "math", weight = 0.25)')
    one = one.replace("epochs = 3)", "epochs = 3, weight = 0.7)").replace('code = "code"',
                                                                          'code = dataset(path = "code", weight = 0.05)')
    lib = _load(specdir, one)
    job = lib.jobs["blend"]
    assert job.data.phases[0].weights == (("web", 0.7), ("math", 0.25), ("code", 0.05))
    again = parse_text(format_file(lib), file=str(specdir / "job.plait"), base_dir=str(specdir))
    assert again.jobs["blend"] == job
    phased = _load(specdir, JOB.replace("EPOCHS", "3"))
    text = format_file(phased)
    assert "phase2 { at = 0.6, web = 0.4, math = 0.4, code = 0.2 }" in text and '"web"' in text
    assert parse_text(text, file=str(specdir / "j.plait"), base_dir=str(specdir)).jobs["blend"] == \
        phased.jobs["blend"]


def test_data_path_and_synthetic_still_work(specdir):
    job = _load(specdir, JOB.split("  data {")[0] + '  data = "web"\n}\n').jobs["blend"]
    assert job.data.path == str(specdir / "web") and not job.data.sources
    assert _load(specdir, JOB.split("  data {")[0] + "  data = synthetic\n}\n").jobs["blend"].data.synthetic


def test_check_prints_the_resolved_blend(specdir, capsys):
    (specdir / "job.plait").write_text(JOB.replace("EPOCHS", "3"))
    assert main(["check", str(specdir / "job.plait")]) == 0
    out = capsys.readouterr().out
    assert "data blend over 100 steps x 8 x 64 tokens" in out
    assert "phase2" in out and "1.280" in out  # code: 64 samples of its 50 windows in phase 2


def test_packing_options_resolve_and_fmt_round_trips(specdir):
    """document_mask and objective in a data block and in dataset(...), written back by fmt."""
    packed = JOB.replace("EPOCHS", "3").replace("    seed = 7\n",
                                                "    seed = 7\n    document_mask = true\n    objective = sft\n")
    lib = _load(specdir, packed)
    data = lib.jobs["blend"].data
    assert data.document_mask and data.objective == "sft"
    text = format_file(lib)
    assert "document_mask = true" in text and "objective = sft" in text
    assert parse_text(text, file=str(specdir / "j.plait"), base_dir=str(specdir)).jobs["blend"] == \
        lib.jobs["blend"]
    single = JOB.split("  data {")[0] + '  data = dataset(path = "web", document_mask = true)\n}\n'
    lib = _load(specdir, single)
    assert lib.jobs["blend"].data.document_mask and lib.jobs["blend"].data.objective == "pretrain"
    assert parse_text(format_file(lib), file=str(specdir / "j.plait"),
                      base_dir=str(specdir)).jobs["blend"] == lib.jobs["blend"]


@pytest.mark.parametrize("edit, where, message", [
    (("    seed = 7\n", "    seed = 7\n    objective = chat\n"), (10, 17), "objective"),
    (("    seed = 7\n", "    seed = 7\n    document_mask = yes\n"), (10, 21), "document_mask"),
    (('"models/tiny-dense.plait"', '"models/tiny-hybrid.plait"'), None, "Mamba state is not reset"),
])
def test_packing_option_errors_point_at_the_spec(specdir, edit, where, message):
    text = JOB.replace("EPOCHS", "3").replace(*edit)
    if "hybrid" in edit[1]:
        text = text.replace('"tiny-dense"', '"tiny-hybrid"').replace(
            "    seed = 7\n", "    seed = 7\n    document_mask = true\n")
        where = (10, 21)
    with pytest.raises(SpecError) as err:
        _load(specdir, text)
    assert (err.value.line, err.value.col) == where and message in err.value.message


def test_a_blend_holds_out_a_validation_split_per_source(specdir):
    """val_every / val_fraction in a data block: every source keeps its tail for validation
    (training windows shrink, epochs grow), fmt writes them back; a source whose split is
    smaller than one global batch is an error at the source."""
    text = JOB.replace("EPOCHS", "3").replace("    seed = 7\n", "    seed = 7\n    val_every = 10, val_fraction = 0.2\n")
    lib = _load(specdir, text)
    job = lib.jobs["blend"]
    assert (job.data.val_every, job.data.val_fraction) == (10, 0.2)
    assert source_windows(job) == {"web": 240, "math": 400, "code": 40}  # 300, 500, 50 less 20%
    assert parse_text(format_file(lib), file=str(specdir / "j.plait"),
                      base_dir=str(specdir)).jobs["blend"] == job
    with pytest.raises(SpecError) as err:
        _load(specdir, text.replace("val_fraction = 0.2", "val_fraction = 0.1"))
    assert (err.value.line, err.value.col) == (14, 7) and "holds out 5 of its 50" in err.value.message
