"""IR objects built directly (no DSL) for the planner tests: public model configs and DGX clusters."""
import pytest

from plait.ir.cluster import Cluster, Device, Link
from plait.ir.job import LayoutPins, MoEOptions, TrainJob
from plait.ir.model import MLP, Attention, Mamba2, ModelSpec, MoE, Norm, Rope

GiB = 2**30
H100 = Device(name="h100-sxm", bf16_flops=989.5e12, memory=80 * GiB, hbm=3.35e12, fp8_flops=1979e12)
A100 = Device(name="a100-sxm4-80gb", bf16_flops=312e12, memory=80 * GiB, hbm=2.039e12)


def dgx(device, nodes, nvlink, nic):
    return Cluster(name=f"dgx-{device.name}", nodes=nodes, gpus_per_node=8, device=device,
                   intra=Link(bandwidth=nvlink, latency=3e-6), inter=Link(bandwidth=nic, latency=8e-6))


def mixtral_8x22b():
    return ModelSpec(
        name="mixtral-8x22b", vocab=32000, hidden=6144, layers=("attention", "moe") * 56,
        attention=Attention(heads=48, kv_heads=8, head_dim=128, rope=Rope(theta=1e6)),
        moe=MoE(experts=8, top_k=2, ffn=16384))


def qwen2_57b():
    return ModelSpec(
        name="qwen2-57b-a14b", vocab=151936, hidden=3584, layers=("attention", "moe") * 28,
        attention=Attention(heads=28, kv_heads=4, head_dim=128, qkv_bias=True, rope=Rope(1e6)),
        moe=MoE(experts=64, top_k=8, ffn=2560, shared_ffn=20480, shared_gate=True))


def gpt(hidden, heads, layers, name="gpt"):
    return ModelSpec(
        name=name, vocab=51200, hidden=hidden, layers=("attention", "mlp") * layers,
        norm=Norm(kind="layernorm"), max_seq=2048, learned_positions=True,
        attention=Attention(heads=heads, kv_heads=heads, head_dim=hidden // heads, qkv_bias=True,
                            out_bias=True),
        mlp=MLP(ffn=4 * hidden, activation="gelu", bias=True))


def llama_405b():
    return ModelSpec(
        name="llama-3.1-405b", vocab=128256, hidden=16384, layers=("attention", "mlp") * 126,
        attention=Attention(heads=128, kv_heads=8, head_dim=128, rope=Rope(5e5)),
        mlp=MLP(ffn=53248))


def nemotron_h_8b():
    pattern = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
    kinds = {"M": "mamba", "*": "attention", "-": "mlp"}
    return ModelSpec(
        name="nemotron-h-8b", vocab=131072, hidden=4096, layers=tuple(kinds[c] for c in pattern),
        attention=Attention(heads=32, kv_heads=8, head_dim=128),
        mamba=Mamba2(heads=128, head_dim=64, groups=8, state=128),
        mlp=MLP(ffn=21504, activation="relu2"))


def job(model, cluster, global_batch=256, seq_len=4096, pins=(), capacity=1.0, name="test"):
    return TrainJob(name=name, model=model, cluster=cluster, global_batch=global_batch,
                    seq_len=seq_len, moe=MoEOptions(capacity_factor=capacity),
                    layout=LayoutPins(pins=tuple(pins)))


@pytest.fixture
def h100_cluster():
    return lambda nodes: dgx(H100, nodes, 450e9, 50e9)


@pytest.fixture
def mixtral_job(h100_cluster):
    return lambda gpus=128, **kw: job(mixtral_8x22b(), h100_cluster(gpus // 8), **kw)


@pytest.fixture
def qwen_job(h100_cluster):
    return lambda gpus=64, **kw: job(qwen2_57b(), h100_cluster(gpus // 8), **kw)


@pytest.fixture
def gpt_job():
    return lambda hidden, heads, layers, gpus, gb, **kw: job(
        gpt(hidden, heads, layers), dgx(A100, gpus // 8, 300e9, 25e9), global_batch=gb,
        seq_len=2048, **kw)


@pytest.fixture
def nemotron_job(h100_cluster):
    return lambda gpus=64, **kw: job(nemotron_h_8b(), h100_cluster(gpus // 8), **kw)


@pytest.fixture
def llama_job(h100_cluster):
    return lambda gpus=16384, **kw: job(llama_405b(), h100_cluster(gpus // 8), global_batch=2048,
                                        seq_len=8192, **kw)
