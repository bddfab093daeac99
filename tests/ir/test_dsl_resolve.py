"""Resolution: AST -> IR with units, defaults, references and `use` imports."""
import os

import pytest

from plait.ir.cluster import Link, local_cpu
from plait.ir.dsl import load_file, load_job, load_model, parse_text
from plait.ir.errors import SpecError
from plait.ir.job import Data, MoEOptions, Optimizer, Precision
from plait.ir.model import MLP, Attention, Mamba2, MoE, Norm, Rope, RopeScaling

TINY = """
model "m" {
  vocab = 256
  hidden = 128
  attention { heads = 4, kv_heads = 2, rope = rope(theta = 1e4) }
  mlp { ffn = 352 }
  layers = 2 * [attention, mlp]
}
"""
HARDWARE = """
device "gpu" { bf16 = 989.5 TFLOP/s, fp8 = 1979 TFLOP/s, memory = 80 GiB, hbm = 3.35 TB/s }
cluster "c" { nodes = 4, gpus_per_node = 8, device = "gpu", intra = 450 GB/s, inter = 400 Gb/s }
"""


def test_model_defaults_and_derived_head_dim():
    m = parse_text(TINY).models["m"]
    assert m.layers == ("attention", "mlp") * 2
    assert m.attention == Attention(heads=4, kv_heads=2, head_dim=32, rope=Rope(theta=10000.0))
    assert m.mlp == MLP(ffn=352, activation="swiglu", bias=False)
    assert m.norm == Norm("rmsnorm", 1e-5) and m.max_seq is None and not m.tie_embeddings
    assert isinstance(m.attention.rope.theta, float)


def test_every_model_field_reaches_the_ir():
    m = parse_text("""
    model "full" {
      vocab = 1000, hidden = 64, norm = layernorm(eps = 1e-6), tie_embeddings = true
      max_seq = 4K, learned_positions = true
      attention { heads = 8, kv_heads = 8, head_dim = 16, qkv_bias = true, out_bias = true, qk_norm = true
                  rope = rope(theta = 1e6, scaling = llama3(factor = 8, original_max_positions = 8192,
                                                          low_freq_factor = 1, high_freq_factor = 4)) }
      moe { experts = 16, top_k = 4, ffn = 32, activation = gelu, shared_ffn = 64, shared_gate = true,
            router = sigmoid, pre_softmax = true, norm_topk = false, expert_bias = true, groups = 4,
            topk_groups = 2, scaling_factor = 2.5, aux_loss = 1e-3, z_loss = 1e-4 }
      mamba { heads = 16, head_dim = 8, groups = 2, state = 16, conv = 3, chunk = 64, conv_bias = false,
              proj_bias = true, dt_min = 1e-3, expand = 2 }
      layers = [mamba] + 2 * [attention, moe]
    }""").models["full"]
    assert m.norm == Norm("layernorm", 1e-6) and m.tie_embeddings and m.learned_positions
    assert m.max_seq == 4096
    assert m.attention == Attention(8, 8, 16, True, True, True, Rope(1e6, RopeScaling(
        "llama3", 8.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0)))
    assert m.moe == MoE(16, 4, 32, "gelu", 64, True, "sigmoid", True, False, True, 4, 2, 2.5, 1e-3, 1e-4)
    assert m.mamba == Mamba2(16, 8, 2, 16, 3, 64, False, True, dt_min=1e-3)
    assert m.layers == ("mamba", "attention", "moe", "attention", "moe")


@pytest.mark.parametrize("scaling, expected", [
    ("linear(factor = 2)", RopeScaling("linear", 2.0)),
    ("yarn(factor = 4, original_max_positions = 4096, beta_fast = 16)",
     RopeScaling("yarn", 4.0, 4096, beta_fast=16.0)),
])
def test_rope_scalings(scaling, expected):
    text = TINY.replace("rope(theta = 1e4)", f"rope(theta = 1e4, scaling = {scaling})")
    assert parse_text(text).models["m"].attention.rope.scaling == expected


def test_megatron_hybrid_pattern():
    m = parse_text("""model "h" { vocab = 256, hidden = 64
      attention { heads = 4, rope = none }
      mamba { heads = 4, head_dim = 32, groups = 2, state = 16 }
      mlp { ffn = 128, activation = relu2 }
      moe { experts = 4, top_k = 1, ffn = 32 }
      pattern = "M-M*-E" }""").models["h"]
    assert m.layers == ("mamba", "mlp", "mamba", "attention", "mlp", "moe")
    assert m.attention.rope is None and m.pattern == "M-M*-E"


def test_units_are_normalised_to_si():
    lib = parse_text(HARDWARE + 'cluster "l" { nodes = 1, gpus_per_node = 2, device = "gpu", intra = 2 MB/s,'
                                ' inter = 1 B/s, intra_latency = 3 us, inter_latency = 2 ms }')
    d = lib.devices["gpu"]
    assert (d.bf16_flops, d.fp8_flops, d.memory, d.hbm) == (989.5e12, 1979e12, 80 * 2 ** 30, 3.35e12)
    assert d.fp32_flops is None and d.calibration == ()
    c = lib.clusters["c"]
    assert c.intra == Link(450e9) and c.inter == Link(50e9) and c.world == 32 and c.device is d
    assert lib.clusters["l"].intra == Link(2e6, 3e-6) and lib.clusters["l"].inter == Link(1.0, 2e-3)


def test_device_calibration_keeps_source_order():
    d = parse_text('device "d" { bf16 = 1 PFLOP/s, memory = 1 TB, hbm = 1 TB/s,'
                   ' calibration { matmul = 0.7, alltoall = 0.5 } }').devices["d"]
    assert d.calibration == (("matmul", 0.7), ("alltoall", 0.5)) and d.bf16_flops == 1e15
    assert d.memory == 1e12 and d.calib("matmul", 1.0) == 0.7


JOB = TINY + HARDWARE + """
train "t" {
  model = "m", cluster = "c", gpus = 128
  global_batch = 256, seq_len = 4K
  precision = fp8(recipe = tensorwise, skip_first = 2, skip_last = 1)
  optimizer = adamw(lr = 1e-4, betas = [0.9, 0.98], warmup = 10, schedule = linear)
  layout { tp = 2, pp = auto, sp = true, recompute = selective, order = "tp-cp-ep-dp-pp", mbs = 1 }
  steps = 7, data = "tokens/train", seed = 3
}
"""


def test_train_job_fields(tmp_path):
    job = parse_text(JOB, base_dir=str(tmp_path)).jobs["t"]
    assert job.cluster.world == 128 and job.cluster.nodes == 16 and job.cluster.name == "c"
    assert (job.global_batch, job.seq_len, job.steps, job.seed) == (256, 4096, 7, 3)
    assert job.precision == Precision("fp8", "tensorwise", 2, 1)
    assert job.optimizer == Optimizer(lr=1e-4, betas=(0.9, 0.98), warmup=10, schedule="linear")
    # pins in LAYOUT_KEYS order whatever the source order; `auto` pins nothing
    assert job.layout.pins == (("tp", 2), ("mbs", 1), ("sp", True), ("recompute", "selective"),
                               ("order", "tp-cp-ep-dp-pp"))
    assert job.data == Data(path=str(tmp_path / "tokens" / "train"))
    assert job.model == parse_text(JOB).models["m"]


def test_job_defaults_to_the_embedded_local_cpu_cluster():
    job = parse_text(TINY + 'train "t" { model = "m", global_batch = 8, seq_len = 64 }').jobs["t"]
    assert job.cluster == local_cpu() and job.precision == Precision() and job.data == Data()
    small = parse_text(TINY + 'train "t" { model = "m", cluster = "local-cpu", gpus = 4, global_batch = 8,'
                              ' seq_len = 64, data = synthetic }').jobs["t"]
    assert (small.cluster.nodes, small.cluster.gpus_per_node) == (1, 4) and small.data.synthetic


def test_job_timeout_and_validation_options():
    base = TINY + 'train "t" { model = "m", global_batch = 8, seq_len = 64, '
    job = parse_text(base + 'timeout = 90 s, data = dataset(path = "/d", val_every = 20, '
                            'val_fraction = 0.1, val_batches = 4) }').jobs["t"]
    assert job.timeout == 90.0
    assert job.data == Data(path="/d", val_every=20, val_fraction=0.1, val_batches=4)
    default = parse_text(base + 'data = dataset(path = "/d", val_every = 5) }').jobs["t"]
    assert (default.timeout, default.data.val_fraction, default.data.val_batches) == (300.0, 0.05, 10)
    from plait.ir.dsl.fmt import format_library
    again = parse_text(format_library(parse_text(base + 'timeout = 90 s, data = dataset(path = '
                                                 '"/d", val_every = 20, val_batches = 4) }')))
    assert again.jobs["t"].timeout == 90.0 and again.jobs["t"].data.val_batches == 4
    for bad, message in [('timeout = 500 ms }', "timeout must be at least 1 s"),
                         ('data = dataset(path = "/d", val_every = 5, val_fraction = 1) }',
                          "val_fraction must be between 0 and 1"),
                         ('data = dataset(path = "/d", val_fraction = 0.1) }',
                          "val_fraction needs val_every")]:
        with pytest.raises(SpecError, match=message):
            parse_text(base + bad)


@pytest.mark.parametrize("block, expected", [
    ("moe { capacity_factor = 1.25, drop_policy = position, pad_to_capacity = true }",
     MoEOptions("alltoall", 1.25, "position", True)),
    ("moe { dispatcher = allgather, dropless = true }", MoEOptions("allgather", None)),
    ("moe { capacity_factor = none }", MoEOptions()),
    ("moe { expert_bias_rate = 0.01 }", MoEOptions(expert_bias_rate=0.01)),
])
def test_moe_options(block, expected):
    text = TINY.replace("mlp { ffn = 352 }", "moe { experts = 4, top_k = 2, ffn = 64 }").replace("mlp]", "moe]")
    job = parse_text(text + f'train "t" {{ model = "m", global_batch = 8, seq_len = 64, {block} }}').jobs["t"]
    assert job.moe == expected


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_use_imports_relative_paths_and_loads_diamonds_once(tmp_path):
    write(tmp_path / "hw" / "gpu.plait", HARDWARE.split("cluster")[0])
    write(tmp_path / "hw" / "c.plait", 'use "gpu.plait"\n' + "cluster" + HARDWARE.split("cluster")[1])
    write(tmp_path / "models" / "m.plait", TINY)
    job = write(tmp_path / "jobs" / "j.plait", 'use "../models/m.plait", "../hw/c.plait", "../hw/gpu.plait"\n'
                'train "t" { model = "m", cluster = "c", global_batch = 8, seq_len = 64 }')
    lib = load_file(job)
    assert set(lib.models) == {"m"} and set(lib.devices) == {"gpu"} and set(lib.clusters) == {"c"}
    assert lib.own == (("train", "t"),) and lib.uses == ("../models/m.plait", "../hw/c.plait", "../hw/gpu.plait")
    assert load_job(job).name == "t"
    assert load_model(job) == lib.models["m"]  # a job file gives its model
    assert load_model(write(tmp_path / "models" / "m.plait", TINY)).name == "m"


def test_load_job_and_model_pick_by_name(tmp_path):
    two = write(tmp_path / "two.plait", TINY + TINY.replace('"m"', '"n"'))
    assert load_model(two, "n").name == "n"
    with pytest.raises(SpecError, match="2 model declarations"):
        load_model(two)
    with pytest.raises(SpecError, match='no model named "x"'):
        load_model(two, "x")
    with pytest.raises(SpecError, match="no train declaration"):
        load_job(two)


def test_root_file_not_found_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_file(os.path.join(tmp_path, "missing.plait"))


def test_optimizer_skip_bad_steps_reads_and_formats_back():
    from plait.ir.dsl.fmt import format_file

    text = TINY + 'train "t" { model = "m", global_batch = 8, seq_len = 64, optimizer = adamw(skip_bad_steps = 2) }'
    lib = parse_text(text)
    assert lib.jobs["t"].optimizer.skip_bad_steps == 2
    assert parse_text(format_file(lib)).jobs["t"].optimizer.skip_bad_steps == 2
    assert parse_text(TINY + 'train "t" { model = "m", global_batch = 8, seq_len = 64 }').jobs["t"] \
        .optimizer.skip_bad_steps == 0
