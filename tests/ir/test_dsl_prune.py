"""Prune declarations: resolution into PruneJob, canonical formatting round trips, and every
structural error with its line, column and hint."""
import pytest

from plait.ir.dsl import load_prune_job, parse_text
from plait.ir.dsl.fmt import format_file, format_library
from plait.ir.errors import SpecError
from plait.ir.job import AxisSearch, Calibration, Distill, PruneTarget

MODELS = '''model "hyb" {
  vocab = 256
  hidden = 128
  attention { heads = 4, kv_heads = 2, head_dim = 32, rope = none }
  mlp { ffn = 256, activation = relu2 }
  mamba { heads = 8, head_dim = 32, groups = 2, state = 16 }
  pattern = "M-M*-"
}
model "moe" {
  vocab = 256
  hidden = 128
  attention { heads = 4, kv_heads = 2, rope = rope(theta = 1e4) }
  moe { experts = 8, top_k = 2, ffn = 64, groups = 2 }
  layers = 2 * [attention, moe]
}
device "gpu" { bf16 = 989.5 TFLOP/s, memory = 80 GiB, hbm = 3.35 TB/s }
cluster "c" { nodes = 1, gpus_per_node = 8, device = "gpu", intra = 450 GB/s, inter = 50 GB/s }
train "t" { model = "hyb", cluster = "c", global_batch = 8, seq_len = 1024 }
'''
PRUNE_LINE = MODELS.count("\n") + 1  # the `prune` keyword's line in prune(...)


def prune(body: str, model: str = "hyb") -> str:
    return MODELS + f'prune "p" {{\n  model = "{model}"\n' + body + "\n}\n"


def test_full_prune_job_resolves():
    lib = parse_text(prune('''  weights = "w.safetensors"
  train = "t"
  target { params = 2e5, active_params = 190000, weight_memory = 1 MiB, precision = fp8, throughput = 1e6 }
  axes { hidden = auto, ffn = range(min = 64, max = 192, step = 64), mamba_heads = 6, mamba_head_dim = keep,
         depth = [mamba, mlp] }
  layout { tp = 2 }
  calibration { samples = 16, seq_len = 32, batch = 4, method = magnitude }
  distill { steps = 5, temperature = 2, lm_loss = 0.25, optimizer = adamw(lr = 1e-4), checkpoint_every = 2 }
  output = "out"'''), base_dir="/base")
    job = lib.prune_jobs["p"]
    assert job.model is lib.models["hyb"] and job.train is lib.jobs["t"]
    assert job.weights == "/base/w.safetensors" and job.output == "/base/out"
    assert job.target == PruneTarget(params=200000, active_params=190000, weight_memory=2.0 ** 20, precision="fp8",
                                     throughput=1e6)
    assert job.axes == (AxisSearch("hidden", "search"), AxisSearch("ffn", "search", low=64, high=192, step=64),
                        AxisSearch("mamba_heads", "fixed", value=6))
    assert job.depth == ("mamba", "mlp")
    assert job.layout.as_dict() == {"tp": 2}
    assert job.calibration == Calibration(samples=16, seq_len=32, batch=4, method="magnitude")
    assert job.distill.temperature == 2 and job.distill.lm_loss == 0.25 and job.distill.optimizer.lr == 1e-4
    assert lib.summary().endswith("1 prune job")


def test_defaults_and_depth_auto():
    job = parse_text(prune("  target { params = 1e5 }\n  axes { depth = auto }")).prune_jobs["p"]
    assert job.depth == ("mamba", "mlp", "attention")  # model order
    assert job.axes == () and job.weights is None and job.train is None
    assert job.calibration == Calibration() and job.distill == Distill()
    assert job.axis("ffn") == AxisSearch("ffn")


@pytest.mark.parametrize("body", [
    '  target { params = 4.5e9 }\n  axes { hidden = auto, ffn = range(min = 64), mamba_heads = 6, depth = [mlp] }',
    '  train = "t"\n  target { throughput = 123456.5, weight_memory = 3 GiB }\n  layout { tp = 2, pp = 1 }\n'
    '  calibration { data = "/d", method = random, depth = perplexity }\n  distill { steps = 3, optimizer = adamw, data = "/e" }',
    '  axes { hidden = 96 }',
])
def test_format_round_trips(body):
    lib = parse_text(prune(body), base_dir="/base")
    again = parse_text(format_library(lib))
    assert again.prune_jobs == lib.prune_jobs
    assert parse_text(format_file(lib), base_dir="/base").prune_jobs == lib.prune_jobs


def test_library_prune_jobs_load_and_round_trip():
    for path in ("specs/jobs/nemotron-h-8b-prune-4.5b.plait", "specs/jobs/llama-3.1-8b-prune-4.5b.plait",
                 "specs/jobs/tiny-dense-prune.plait"):
        job = load_prune_job(path)
        assert not job.target.empty
        lib = parse_text(format_library(parse_text(open(path).read(), file=path, base_dir="specs/jobs")))
        assert lib.prune_jobs[job.name] == job


ERRORS = [
    # (id, body, model, message, line offset from `prune`, col, hint)
    ("unknown_axis", "  axes { hiden = auto }", "hyb", "unknown key 'hiden' in axes block", 2, 10, "hidden"),
    ("missing_kind", "  axes { experts = 4 }", "hyb", 'model "hyb" has no moe layers to prune experts of', 2, 10,
     "remove experts"),
    ("widen", "  axes { ffn = 512 }", "hyb", "ffn = 512 exceeds the model's ffn (256): pruning cannot widen", 2, 16,
     None),
    ("gqa", "  axes { attention_heads = 3 }", "hyb",
     "attention heads (3) must be a multiple of kv_heads (2): 3 % 2 = 1", 2, 28, "every KV group"),
    ("mamba_groups", "  axes { mamba_heads = 5 }", "hyb",
     "mamba heads (5) must be a multiple of the mamba groups (2): 5 % 2 = 1", 2, 24, "groups are never pruned"),
    ("top_k", "  axes { experts = 1 }", "moe", "experts (1) must be at least top_k (2)", 2, 20, "top_k"),
    ("routing_groups", "  axes { experts = 6 }", "moe", "experts (6) must be at least top_k (2)", None, None, None),
    ("range_empty", "  target { params = 1e5 }\n  axes { ffn = range(min = 200, max = 100) }", "hyb",
     "ffn range is empty: min (200) > max (100)", 3, 16, None),
    ("range_widen", "  target { params = 1e5 }\n  axes { ffn = range(max = 300) }", "hyb",
     "ffn max (300) exceeds the model's ffn (256): pruning cannot widen", 3, 28, None),
    ("depth_kind", "  axes { depth = [mlp, moe] }", "hyb", 'model "hyb" has no moe layers', 2, 24, "mamba"),
    ("depth_word", "  axes { depth = [mlpp] }", "hyb", "depth lists block kinds", 2, 19, "mlp"),
    ("no_target", "  axes { hidden = auto }", "hyb", 'prune "p" searches widths or depth but sets no target',
     0, 1, "add target"),
    ("throughput_needs_train", "  target { throughput = 1e5 }", "hyb",
     "a throughput target needs the training setup it refers to", 2, 12, "train ="),
    ("lm_loss", "  distill { lm_loss = 2 }", "hyb", "lm_loss is the weight of the LM loss in [0, 1], got 2", 2, 23,
     None),
    ("method", "  calibration { method = activations }", "hyb", "method must be one of activation, magnitude, random",
     2, 26, "activation"),
    ("model_ref", "  weights = 3", "hyb", "weights must be a string", 2, 13, None),
    ("axis_value", "  axes { hidden = half }", "hyb", "hidden must be auto, keep, a width or range", 2, 19, None),
]


@pytest.mark.parametrize("case", [c for c in ERRORS if c[0] != "routing_groups"], ids=lambda c: c[0])
def test_errors_point_at_the_problem(case):
    _, body, model, message, offset, col, hint = case
    with pytest.raises(SpecError) as info:
        parse_text(prune(body, model))
    err = info.value
    assert message in err.message
    assert err.line == PRUNE_LINE + offset and err.col == col
    if hint:
        assert hint in (err.hint or "")


def test_routing_groups_error():
    text = prune("  axes { experts = 5 }", "moe").replace("top_k = 2", "top_k = 1")
    with pytest.raises(SpecError, match=r"experts \(5\) must be a multiple of the routing groups \(2\): 5 % 2 = 1"):
        parse_text(text)


def test_unknown_train_job_is_named():
    with pytest.raises(SpecError, match='no train job named "x"'):
        parse_text(prune('  train = "x"'))
