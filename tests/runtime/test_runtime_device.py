"""The device decision (runtime/device.py), tested on CPU with CUDA availability monkeypatched."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from plait.ir.cluster import local_cpu
from plait.ir.dsl import load_job
from plait.ir.errors import PlaitError
from plait.ir.plan import Layout
from plait.runtime import device
from plait.runtime.data import BatchLoader, SyntheticTokens
from plait.runtime.launch import hand_plan, launch_local
from plait.runtime.mesh import Mesh


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` GPUs; records set_device calls."""
    current = []

    def have(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
        return current
    return have


def test_nccl_with_cuda_runs_on_the_local_rank_gpu(gpus, monkeypatch):
    current = gpus(8)
    monkeypatch.setenv("LOCAL_RANK", "3")
    placement = device.activate(device.choose("nccl"))
    assert (placement.backend, placement.device) == ("nccl", torch.device("cuda", 3))
    assert current == [torch.device("cuda", 3)]


def test_nccl_without_cuda_falls_back_to_gloo_on_cpu(gpus, monkeypatch):
    current = gpus(0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    placement = device.activate(device.choose("nccl"))
    assert (placement.backend, placement.device) == ("gloo", torch.device("cpu"))
    assert "no CUDA device" in placement.reason and current == []


def test_gloo_cluster_stays_on_cpu_even_with_gpus(gpus):
    gpus(8)
    assert device.choose("gloo", rank_on_node=0) == device.Placement(
        "gloo", torch.device("cpu"), "cluster backend gloo: gloo on the CPU")


def test_more_local_ranks_than_gpus_is_a_clear_error(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(PlaitError, match="local rank 2 needs a CUDA device, but 2 are visible"):
        device.choose("nccl")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(PlaitError, match="LOCAL_RANK='x' is not an integer"):
        device.choose("nccl")


def test_the_mesh_carries_the_decision_and_batches_follow_it():
    mesh = Mesh(rank=0, world=1, layout=Layout(), timeout_s=1.0)
    assert mesh.device == torch.device("cpu")  # the default (gloo tests, parity)
    loader = BatchLoader(SyntheticTokens(64), 8, 4, device=mesh.device)
    batch = loader.local_batch(0)
    assert batch.tokens.device == mesh.device and batch.tokens.shape == (4, 8)


def test_local_launch_of_an_nccl_cluster_needs_a_gpu_per_rank(gpus, tmp_path):
    job = load_job(str(Path(__file__).resolve().parents[2] / "specs" / "jobs" / "tiny-local.plait"))
    job = replace(job, cluster=replace(local_cpu(4), backend="nccl", name="gpu-box"))
    plan = hand_plan(job, Layout(dp=4))
    gpus(0)
    with pytest.raises(PlaitError, match="'gpu-box' trains with NCCL on GPUs, but no CUDA device"):
        launch_local(job, plan, tmp_path)
    gpus(2)
    with pytest.raises(PlaitError, match="local rank 3 needs a CUDA device, but 2 are visible"):
        launch_local(job, plan, tmp_path)
