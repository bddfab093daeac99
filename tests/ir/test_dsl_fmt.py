"""The canonical formatter: exact literals, readable layer lists, and parse(format(x)) == x."""
import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.ir.cluster import Cluster, Device, Link, local_cpu
from plait.ir.dsl import load_file, parse_text
from plait.ir.dsl.fmt import format_file, format_library, format_model
from plait.ir.dsl.literals import layers_text, number, quantity
from plait.ir.dsl.resolve import Library
from plait.ir.job import Data, LayoutPins, MoEOptions, Optimizer, Precision, TrainJob
from plait.ir.model import (MLP, Attention, Mamba2, ModelSpec, MoE, Norm, Rope, RopeScaling)


@pytest.mark.parametrize("value, text", [
    (1e-5, "1e-5"), (3e-4, "3e-4"), (0.95, "0.95"), (500000.0, "500000"), (1e6, "1e6"), (2.5, "2.5"),
    (7, "7"), (131072, "131072"),
])
def test_numbers(value, text):
    assert number(value) == text


def test_token_counts_use_k():
    assert number(131072, tokens=True) == "128K" and number(4096, tokens=True) == "4096"


@pytest.mark.parametrize("value, kind, text", [
    (80 * 2 ** 30, "bytes", "80 GiB"), (80e9, "bytes", "80 GB"), (3.35e12, "bandwidth", "3.35 TB/s"),
    (450e9, "bandwidth", "450 GB/s"), (989.5e12, "compute", "989.5 TFLOP/s"), (1979e12, "compute", "1979 TFLOP/s"),
    (1e11, "compute", "100 GFLOP/s"), (5e-6, "time", "5 us"), (2e-3, "time", "2 ms"),
])
def test_quantities_pick_a_short_unit(value, kind, text):
    assert quantity(value, kind) == text


def device_with(**fields) -> str:
    base = dict(bf16="1 TFLOP/s", memory="1 GiB", hbm="1 GB/s")
    base.update(fields)
    return 'device "d" { ' + ", ".join(f"{k} = {v}" for k, v in base.items()) + " }"


KIND_OF_FIELD = {"bytes": ("memory", "memory"), "bandwidth": ("hbm", "hbm"), "compute": ("bf16", "bf16_flops")}


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(KIND_OF_FIELD)),
       st.floats(min_value=1e-3, max_value=1e20, allow_nan=False, allow_infinity=False))
def test_every_quantity_parses_back_to_the_same_float(kind, value):
    key, attr = KIND_OF_FIELD[kind]
    device = parse_text(device_with(**{key: quantity(value, kind)})).devices["d"]
    assert getattr(device, attr) == value


KINDS = ("attention", "mlp", "moe", "mamba")
ALL_BLOCKS = """attention { heads = 2, rope = none }
  mlp { ffn = 8 }
  moe { experts = 2, top_k = 1, ffn = 8 }
  mamba { heads = 2, head_dim = 8, state = 4 }"""


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(KINDS), min_size=1, max_size=40).filter(lambda ls: set(ls) == set(KINDS)))
def test_layer_lists_round_trip(layers):
    text = f'model "m" {{ vocab = 8, hidden = 16\n  {ALL_BLOCKS}\n  layers = {layers_text(tuple(layers))} }}'
    assert parse_text(text).models["m"].layers == tuple(layers)


def test_layer_lists_are_compressed_into_repeats():
    assert layers_text(("attention", "mlp") * 32) == "32 * [attention, mlp]"
    assert layers_text(("attention", "mlp") * 3 + ("attention", "moe") * 58) == \
        "3 * [attention, mlp] + 58 * [attention, moe]"
    assert layers_text(("mamba", "attention", "mlp")) == "[mamba, attention, mlp]"


def test_canonical_text_of_a_small_model():
    spec = ModelSpec(name="tiny", vocab=256, hidden=128, layers=("attention", "mlp") * 4, max_seq=8192,
                     attention=Attention(4, 2, 32, rope=Rope(10000.0)), mlp=MLP(352))
    assert format_model(spec) == '''model "tiny" {
  vocab = 256
  hidden = 128
  norm = rmsnorm(eps = 1e-5)
  max_seq = 8K
  attention { heads = 4, kv_heads = 2, head_dim = 32, rope = rope(theta = 10000) }
  mlp { ffn = 352, activation = swiglu }
  layers = 4 * [attention, mlp]
}'''


FULL = ModelSpec(
    name="every-field", vocab=1000, hidden=64, layers=("mamba", "attention", "moe", "mlp", "attention", "moe"),
    norm=Norm("layernorm", 1e-6), tie_embeddings=True, max_seq=2048, learned_positions=True,
    attention=Attention(8, 4, 16, True, True, True, Rope(1e6, RopeScaling("yarn", 4.0, 4096, 16.0, 2.0))),
    mlp=MLP(96, "gelu", True),
    moe=MoE(16, 4, 32, "relu2", 48, True, "sigmoid", True, False, True, 4, 2, 2.5, 1e-3, 1e-4),
    mamba=Mamba2(16, 6, 2, 16, 3, 64, False, True),
)


@pytest.mark.parametrize("spec", [
    FULL,
    dataclasses.replace(FULL, attention=dataclasses.replace(FULL.attention, rope=None)),
    dataclasses.replace(FULL, attention=dataclasses.replace(FULL.attention, rope=Rope(
        5e5, RopeScaling("llama3", 8.0, 8192, low_freq_factor=1.5, high_freq_factor=3.0)))),
    dataclasses.replace(FULL, attention=dataclasses.replace(FULL.attention, rope=Rope(
        1e4, RopeScaling("linear", 2.0)))),
    dataclasses.replace(FULL, attention=dataclasses.replace(FULL.attention, window=4096)),
    dataclasses.replace(FULL, attention=dataclasses.replace(FULL.attention, window=131072, full_layers=(1,))),
], ids=["yarn", "no-rope", "llama3", "linear", "window", "window-full-layer"])
def test_hand_built_models_round_trip(spec):
    assert parse_text(format_model(spec)).models[spec.name] == spec


def test_hand_built_library_with_resized_cluster_and_every_job_option():
    gpu = Device("gpu", 1e15, 96 * 2 ** 30, 4e12, fp8_flops=2e15, fp32_flops=6e13, calibration=(("mm", 0.8),))
    cluster = Cluster("c", 4, 8, gpu, Link(9e11, 1e-6), Link(1e11, 7e-6))
    model = dataclasses.replace(FULL, learned_positions=False, max_seq=None)
    jobs = {
        "a": TrainJob("a", model, dataclasses.replace(cluster, nodes=16), 512, 4096,
                      Precision("fp8", "mxfp8", 1, 3), Optimizer("sgd", lr=0.1, betas=(0.8, 0.9), schedule="constant"),
                      MoEOptions("allgather", 1.5, "position", True, expert_bias_rate=2.5e-3),
                      LayoutPins((("tp", 2), ("ep", 4), ("sp", True), ("dispatcher", "allgather"))),
                      steps=9, data=Data(path="/data/x", tokenizer="gpt2", seed=5), seed=11),
        "b": TrainJob("b", model, dataclasses.replace(cluster, nodes=1, gpus_per_node=2), 8, 128,
                      data=Data(synthetic=True, seed=9)),
        "c": TrainJob("c", model, local_cpu(), 8, 128, data=Data(path="/data/y")),
    }
    lib = Library(models={model.name: model}, devices={"gpu": gpu}, clusters={"c": cluster}, jobs=jobs)
    again = parse_text(format_library(lib))
    assert again.jobs == jobs and again.clusters == {"c": cluster} and again.models == lib.models


# --- comments --------------------------------------------------------------------------------------

LIBRARY = sorted((Path(__file__).resolve().parents[2] / "specs").rglob("*.plait"))


def _comments(text: str) -> list[str]:
    from plait.ir.dsl.parse import parse
    return [c for _, c in parse(text).comments]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fmt_keeps_every_comment_and_relative_path_of_the_library(path):
    lib = load_file(str(path))
    once = format_file(lib)
    assert sorted(_comments(once)) == sorted(_comments(path.read_text()))
    again = parse_text(once, file=str(path), base_dir=str(path.parent))
    assert (again.models, again.jobs, again.prune_jobs) == (lib.models, lib.jobs, lib.prune_jobs)
    assert format_file(again) == once  # idempotent
    checkout = str(path.parents[2])
    assert checkout not in once or checkout in path.read_text()  # relative paths stay relative


COMMENTED = '''# leads the model
model "m" {  # opens the model
  vocab = 256  # trails vocab
  # leads hidden
  hidden = 128
  tie_embeddings = false  # a default: fmt drops the key, not the comment
  attention { heads = 4, rope = none }  # trails attention
  mlp {
    # leads ffn
    ffn = 352
    # closes mlp
  }
  layers = 2 * [attention, mlp]
}  # after the model
# the end
'''


def test_comments_stay_next_to_what_they_describe():
    out = format_file(parse_text(COMMENTED, file="m.plait"))
    assert out.startswith("# leads the model\nmodel \"m\" {  # opens the model\n  vocab = 256  # trails vocab\n"
                          "  # leads hidden\n  hidden = 128\n")
    assert "rope = none }  # trails attention\n" in out
    assert "  mlp {\n    # leads ffn\n    ffn = 352, \n" not in out
    assert "  mlp {\n    # leads ffn\n    ffn = 352\n    activation = swiglu\n    # closes mlp\n  }\n" in out
    assert out.endswith("  # a default: fmt drops the key, not the comment\n}  # after the model\n\n# the end\n")
    assert format_file(parse_text(out, file="m.plait")) == out
