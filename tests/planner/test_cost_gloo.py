"""Cost terms of the local CPU cluster's stack (gloo): what its collectives really run."""
from dataclasses import replace
from pathlib import Path

import pytest

from plait.ir.cluster import local_cpu
from plait.ir.dsl import load_job
from plait.ir.plan import Layout
from plait.planner.cost import comm
from plait.planner.cost.context import Context, GroupShape

JOBS = Path(__file__).resolve().parents[2] / "specs" / "jobs"


def test_gloo_reduce_scatter_costs_an_all_reduce():
    """Gloo all-reduces the whole buffer and keeps a slice; NCCL's ring moves what an all-gather
    moves."""
    job = load_job(str(JOBS / "tiny-local.plait"))
    g = GroupShape(size=2, nodes=1)
    gloo = Context(job, Layout(tp=2))
    assert gloo.cluster.backend == "gloo"
    assert comm.reduce_scatter(gloo, g, 1e6) == pytest.approx(comm.all_reduce(gloo, g, 1e6))
    assert comm.reduce_scatter(gloo, g, 1e6) == pytest.approx(2 * comm.all_gather(gloo, g, 1e6))
    nccl = Context(replace(job, cluster=replace(job.cluster, backend="nccl")), Layout(tp=2))
    assert comm.reduce_scatter(nccl, g, 1e6) == pytest.approx(comm.all_gather(nccl, g, 1e6))


def test_the_embedded_local_cluster_is_gloo():
    assert local_cpu(2).backend == "gloo"
