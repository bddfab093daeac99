"""The spec library (specs/): every file loads and round-trips, names match contract C7, and the
values agree with the reference tables and with the Hugging Face configs imported independently."""
import csv
import json
from decimal import Decimal
from pathlib import Path

import pytest

from plait.ir import counts, serde
from plait.ir.cluster import Cluster, Device, local_cpu
from plait.ir.dsl import load_file, load_job, load_model, parse_text
from plait.ir.dsl.fmt import format_file, format_library
from plait.ir.hf import model_from_hf_config
from plait.ir.job import TrainJob
from plait.ir.model import ModelSpec
from plait.reference import reference_file

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
SPEC_FILES = sorted(p.relative_to(SPECS).as_posix() for p in SPECS.rglob("*.plait"))

MODELS = ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "gpt-1.7b", "gpt-3.6b", "gpt-7.5b", "gpt-18.4b",
          "gpt-39.1b", "gpt-76.1b", "gpt-145.6b", "gpt-310.1b", "gpt-529.6b", "gpt-1t", "gpt3-175b",
          "mixtral-8x7b", "mixtral-8x22b", "qwen2-57b-a14b", "qwen3-30b-a3b", "nemotron-h-8b", "nemotron-h-4b",
          "nemotron-h-56b", "nemotron-h-47b", "mistral-7b-v0.1", "deepseek-v3", "tiny-dense", "tiny-moe", "tiny-hybrid"]
CLUSTERS = ["dgx-a100", "dgx-h100", "dgx-h200", "h800", "local-cpu"]
JOBS = ["mixtral-8x22b-128gpu", "mixtral-8x22b-1024gpu", "qwen2-57b-a14b-64gpu", "llama-3.1-405b-16384gpu-8k",
        "llama-3.1-405b-16384gpu-128k", "nemotron-h-56b-pretrain", "tiny-local", "tiny-moe-local",
        "tiny-hybrid-local", "mistral-7b-v0.1-32k", "deepseek-v3-2048gpu"]
IR_TYPES = {"models": ModelSpec, "devices": Device, "clusters": Cluster, "jobs": TrainJob}


def read_csv(name: str) -> list[dict]:
    with open(reference_file(name)) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_library_has_every_contract_name_one_file_each():
    for folder, names, keyword in (("models", MODELS, "model"), ("clusters", CLUSTERS, "cluster"),
                                   ("jobs", JOBS, "train")):
        for name in names:
            lib = load_file(str(SPECS / folder / f"{name}.plait"))
            assert lib.own == ((keyword, name),), (folder, name)


@pytest.mark.parametrize("rel", SPEC_FILES)
def test_spec_round_trips_through_json(rel):
    lib = load_file(str(SPECS / rel))
    for attr, cls in IR_TYPES.items():
        for name, obj in getattr(lib, attr).items():
            assert serde.from_json(cls, serde.to_json(obj)) == obj, (attr, name)


@pytest.mark.parametrize("rel", SPEC_FILES)
def test_spec_round_trips_through_fmt(rel):
    lib = load_file(str(SPECS / rel))
    whole = parse_text(format_library(lib))  # self-contained: every used declaration inlined
    own = parse_text(format_file(lib), base_dir=str((SPECS / rel).parent))  # keeps its `use` line
    for again in (whole, own):
        for attr in IR_TYPES:
            assert getattr(again, attr) == getattr(lib, attr), attr
    assert format_file(own) == format_file(lib)  # canonical text is a fixed point


def test_local_cpu_spec_equals_the_embedded_default():
    assert load_file(str(SPECS / "clusters" / "local-cpu.plait")).clusters["local-cpu"] == local_cpu()


@pytest.mark.parametrize("cluster, device_row", [("dgx-a100", "a100-sxm4-80gb"), ("dgx-h100", "h100-sxm5-80gb"),
                                                 ("dgx-h200", "h200-sxm-141gb"), ("h800", "h800-sxm5-80gb")])
def test_clusters_match_hardware_csv(cluster, device_row):
    row = next(r for r in read_csv("hardware.csv") if r["device"] == device_row)

    def si(column: str, scale: int) -> float:  # exact decimal scaling, as the DSL does (2.039 TB/s)
        return float(Decimal(row[column]) * scale)

    c = load_file(str(SPECS / "clusters" / f"{cluster}.plait")).clusters[cluster]
    d = c.device
    assert d.name == device_row and d.bf16_flops == si("bf16_tflops", 10 ** 12)
    assert d.fp8_flops == (si("fp8_tflops", 10 ** 12) if row["fp8_tflops"] else None)
    assert d.memory == si("memory_gib", 2 ** 30) and d.hbm == si("hbm_tb_per_s", 10 ** 12)
    assert c.intra.bandwidth == si("nvlink_gb_per_s", 10 ** 9)
    assert c.inter.bandwidth == si("nic_gb_per_s_per_gpu", 10 ** 9)
    assert c.gpus_per_node == int(row["gpus_per_node"]) and c.backend == "nccl"


def sc21_name(row: dict) -> str:
    billions = float(row["params_billion"])
    return "gpt-1t" if billions >= 1000 else f"gpt-{row['params_billion']}b"


@pytest.mark.parametrize("row", read_csv("megatron_sc21_table1.csv"), ids=sc21_name)
def test_gpt_family_matches_sc21_table1(row):
    m = load_model(str(SPECS / "models" / f"{sc21_name(row)}.plait"))
    assert (m.attention.heads, m.hidden, m.num_layers) == (int(row["heads"]), int(row["hidden"]),
                                                           2 * int(row["layers"]))
    assert (m.vocab, m.max_seq, m.mlp.ffn, m.mlp.activation) == (51200, 2048, 4 * m.hidden, "gelu")
    assert round(counts.params(m).total / 1e9, 1) == float(row["params_billion"])


@pytest.mark.parametrize("row", read_csv("published_params.csv"), ids=lambda r: r["model"])
def test_library_models_have_the_published_parameter_counts(row):
    model = load_model(str(SPECS / "models" / f"{row['model']}.plait"))
    assert counts.params(model).total == int(row["total_params"])


@pytest.mark.parametrize("config", sorted((SPECS / "hf").glob("*.json")), ids=lambda p: p.stem)
def test_library_model_equals_its_imported_hugging_face_config(config):
    """Written by hand from the public configs vs. imported by plait.ir.hf: each catches the other."""
    imported = model_from_hf_config(json.loads(config.read_text()), name=config.stem)
    assert load_model(str(SPECS / "models" / f"{config.stem}.plait")) == imported


@pytest.mark.parametrize("name, model, gpus, batch, seq, precision, capacity", [
    ("mixtral-8x22b-128gpu", "mixtral-8x22b", 128, 256, 4096, "bf16", 1.0),
    ("mixtral-8x22b-1024gpu", "mixtral-8x22b", 1024, 2048, 4096, "bf16", 1.0),
    ("qwen2-57b-a14b-64gpu", "qwen2-57b-a14b", 64, 256, 4096, "bf16", 1.0),
    ("llama-3.1-405b-16384gpu-8k", "llama-3.1-405b", 16384, 2048, 8192, "bf16", None),
    ("llama-3.1-405b-16384gpu-128k", "llama-3.1-405b", 16384, 128, 131072, "bf16", None),
    ("nemotron-h-56b-pretrain", "nemotron-h-56b", 1024, 768, 8192, "fp8", None),
    ("mistral-7b-v0.1-32k", "mistral-7b-v0.1", 32, 128, 32768, "bf16", None),
])
def test_reference_jobs(name, model, gpus, batch, seq, precision, capacity):
    job = load_job(str(SPECS / "jobs" / f"{name}.plait"))
    assert (job.model.name, job.cluster.world, job.global_batch, job.seq_len) == (model, gpus, batch, seq)
    assert job.cluster.device.name == "h100-sxm5-80gb" and job.cluster.gpus_per_node == 8
    assert job.precision.kind == precision and job.moe.capacity_factor == capacity
    assert job.layout.pins == ()  # the planner chooses


def test_deepseek_v3_job_is_its_reported_cluster_and_batch():
    job = load_job(str(SPECS / "jobs" / "deepseek-v3-2048gpu.plait"))
    assert (job.model.name, job.cluster.world, job.global_batch, job.seq_len) == ("deepseek-v3", 2048, 15360, 4096)
    assert job.cluster.device.name == "h800-sxm5-80gb" and job.layout.pins == ()


@pytest.mark.parametrize("name, model", [("tiny-local", "tiny-dense"), ("tiny-moe-local", "tiny-moe"),
                                         ("tiny-hybrid-local", "tiny-hybrid")])
def test_tiny_jobs_run_on_the_local_cpu_cluster(name, model):
    job = load_job(str(SPECS / "jobs" / f"{name}.plait"))
    assert job.model.name == model and job.cluster == local_cpu() and job.precision.kind == "fp32"
    assert job.data.synthetic and job.global_batch % job.cluster.world == 0


def test_tiny_models_have_the_contract_shapes():
    dense = load_model(str(SPECS / "models" / "tiny-dense.plait"))
    a = dense.attention
    assert (dense.vocab, dense.hidden, a.heads, a.kv_heads, dense.mlp.ffn) == (256, 128, 4, 2, 352)
    assert dense.layers == ("attention", "mlp") * 4
    moe = load_model(str(SPECS / "models" / "tiny-moe.plait"))
    assert (moe.moe.experts, moe.moe.top_k) == (8, 2) and moe.moe.shared_ffn > 0
    assert moe.count("attention") == 4 and moe.count("moe") == 3
    hybrid = load_model(str(SPECS / "models" / "tiny-hybrid.plait"))
    assert {"mamba", "attention", "mlp"} == set(hybrid.layers)
    for m in (dense, moe, hybrid):
        assert counts.params(m).total < 4_000_000
