"""`plait calibrate CLUSTER -o calib.json`: measure the cost model's efficiencies on the cluster's
own machines (runtime/calibrate_cost.py), for `plan` / `estimate` / `run --calibration`."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from rich.table import Table

from plait.cli import arguments, command, console
from plait.ir.cluster import Cluster, local_cpu
from plait.ir.errors import PlaitError

from . import inputs
from .spec import specs_dir


def load_cluster(text: str) -> Cluster:
    """A cluster spec file, or a cluster name of the spec library (specs/clusters/NAME.plait)."""
    from plait.ir.dsl import load_file

    path = Path(text)
    if not path.is_file():
        if text == "local-cpu":
            return local_cpu()
        path = specs_dir() / "clusters" / f"{text}.plait"
        if not path.is_file():
            raise PlaitError(f"no cluster {text!r}: neither a file nor {path}")
    clusters = load_file(path).clusters
    if not clusters:
        raise PlaitError(f"{path} declares no cluster")
    return clusters.get(text) or next(iter(clusters.values()))


def _worker(rank: int, world: int, gpn: int, backend: str, precision: str, full: bool,
            statistic: str, work: str) -> None:
    from plait.runtime.mesh import destroy, init_distributed, set_threads

    set_threads()
    init_distributed(backend, 300, f"file://{work}/rendezvous", rank, world)
    try:
        _measure_to(Path(work) / "measured.json", rank, world, gpn, backend, precision, full,
                    statistic)
    finally:
        destroy()


def _measure_to(out: Path, rank: int, world: int, gpn: int, backend: str, precision: str,
                full: bool, statistic: str) -> None:
    import torch

    from plait.runtime.calibrate_cost import measure
    from plait.runtime.calibrate_timing import use_statistic

    use_statistic(statistic)

    device = torch.device("cuda", rank % max(1, torch.cuda.device_count())) if backend == "nccl" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision, torch.bfloat16)
    measured = dict(measure(rank, world, gpn, dtype, device, full), statistic=statistic)
    if rank == 0:
        out.write_text(json.dumps(measured))


def run_local(cluster: Cluster, ranks: int, precision: str, full: bool,
              statistic: str = "median") -> dict:
    """Spawn ``ranks`` processes on this machine; rank 0's measurements."""
    from plait.runtime.spawn import start_ranks

    with tempfile.TemporaryDirectory() as work:
        start_ranks(_worker, (ranks, min(ranks, cluster.gpus_per_node), cluster.backend,
                              precision, full, statistic, work), ranks)
        return json.loads((Path(work) / "measured.json").read_text())


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("cluster", help="a cluster name (specs/clusters/NAME.plait) or spec file")
    p.add_argument("-o", "--output", required=True, help="the calibration JSON to write")
    p.add_argument("--ranks", type=int, help="local ranks to spawn (default: the cluster's "
                   "gpus_per_node; local clusters only)")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="dtype of the compute benchmarks (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--full", action="store_true", help="larger shapes and messages (slower)")
    p.add_argument("--statistic", choices=("median", "min"), default="median",
                   help="which of a probe's repeats stands for it: the median (default: the "
                   "typical run, as a run's median step) or the fastest (what the machine can do "
                   "undisturbed)")


@command("calibrate", help="measure the cost model's efficiencies on a cluster's machines")
@arguments(_args)
def calibrate_cmd(args) -> int:
    from plait.planner import calibration
    from plait.runtime.calibrate_cost import derive

    cluster = load_cluster(args.cluster)
    precision = args.precision or ("fp32" if cluster.backend == "gloo" else "bf16")
    inputs.replaceable_file(args.output, "-o", lambda text: calibration.FORMAT in text)
    if "WORLD_SIZE" in os.environ:  # under torchrun on the real nodes: every rank measures
        return _under_torchrun(cluster, args, precision)
    if cluster.nodes > 1:
        raise PlaitError(f"cluster {cluster.name!r} has {cluster.nodes} nodes: run the "
                         "calibration on them with torchrun",
                         hint=f"torchrun --nnodes {cluster.nodes} --nproc-per-node "
                              f"{cluster.gpus_per_node} --rdzv-endpoint HOST:PORT -m plait "
                              f"calibrate {args.cluster} -o {args.output}")
    ranks = args.ranks or cluster.gpus_per_node
    inputs.at_least(ranks, 1, "--ranks")
    measured = run_local(cluster, ranks, precision, args.full, args.statistic)
    _write(args.output, cluster, measured, precision, derive)
    return 0


def _under_torchrun(cluster: Cluster, args, precision: str) -> int:
    from plait.runtime.calibrate_cost import derive
    from plait.runtime.mesh import destroy, init_distributed, set_threads

    set_threads()
    init_distributed(cluster.backend, 300)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        with tempfile.TemporaryDirectory() as work:
            out = Path(work) / "measured.json"
            _measure_to(out, rank, world, cluster.gpus_per_node, cluster.backend, precision,
                        args.full, args.statistic)
            if rank == 0:
                _write(args.output, cluster, json.loads(out.read_text()), precision, derive)
    finally:
        destroy()
    return 0


def _write(path: str, cluster: Cluster, measured: dict, precision: str, derive) -> None:
    from plait.planner import calibration

    values, sources = derive(measured, cluster, precision)
    calibration.write(path, cluster.name, cluster.device.name, values, sources, measured)
    t = Table(title=f"calibration of {cluster.name} ({cluster.device.name}, {precision}, each "
                    f"probe's {measured.get('statistic', 'min')} repeat)")
    for col in ("key", "value", "spec / default", "measured by"):
        t.add_column(col)
    from plait.planner.cost.context import Calibration

    spec = Calibration.of(cluster.device)
    for key, value in sorted(values.items()):
        t.add_row(key, f"{value:.4g}", f"{getattr(spec, key):.4g}", sources.get(key, ""))
    console.print(t)
    console.print(f"wrote {path}")
