"""Cluster IR: devices, links and the topology graph. All quantities in SI base units
(FLOP/s, bytes, bytes/s, seconds)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # networkx costs ~0.15 s to import; only topology() needs it
    import networkx as nx


@dataclass(frozen=True)
class Device:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    memory: float  # bytes
    hbm: float  # bytes/s
    fp8_flops: Optional[float] = None
    fp32_flops: Optional[float] = None
    # Cost-model efficiency parameters, calibrated once per device kind (planner/cost reads them).
    calibration: tuple[tuple[str, float], ...] = ()

    def peak_flops(self, precision: str) -> float:
        if precision == "fp8" and self.fp8_flops:
            return self.fp8_flops
        if precision == "fp32" and self.fp32_flops:
            return self.fp32_flops
        return self.bf16_flops

    def calib(self, key: str, default: float) -> float:
        return dict(self.calibration).get(key, default)


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s per device per direction
    latency: float = 5e-6  # seconds


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    gpus_per_node: int
    device: Device
    intra: Link
    inter: Link
    backend: str = "nccl"  # "gloo" for the local CPU cluster

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def link(self, a: int, b: int) -> Link:
        return self.intra if self.node_of(a) == self.node_of(b) else self.inter

    def group_link(self, ranks: tuple[int, ...] | list[int]) -> Link:
        """The slowest link a collective over ``ranks`` must cross."""
        nodes = {self.node_of(r) for r in ranks}
        return self.intra if len(nodes) <= 1 else self.inter

    def topology(self) -> nx.Graph:
        """Two-level topology: every device joins its node switch (NVLink), every node switch joins
        the network (InfiniBand). Edge attribute ``bandwidth`` in bytes/s per device."""
        import networkx as nx

        g = nx.Graph()
        g.add_node("network", kind="network")
        for n in range(self.nodes):
            switch = f"node{n}"
            g.add_node(switch, kind="switch")
            g.add_edge(switch, "network", bandwidth=self.inter.bandwidth * self.gpus_per_node,
                       latency=self.inter.latency)
            for local in range(self.gpus_per_node):
                rank = n * self.gpus_per_node + local
                g.add_node(rank, kind="device")
                g.add_edge(rank, switch, bandwidth=self.intra.bandwidth, latency=self.intra.latency)
        return g


# kv_expanded: plait's attention on CPU is PyTorch SDPA, which gets K/V repeated to every query head;
# grouped_gemm 0: torch._grouped_mm does not run on CPU in this torch, the experts loop over matmuls;
# dp_sync_overlap 0: plait's runtime syncs replicated / ZeRO-1 data parallelism after the backward;
# optimizer_bytes 40: plait's runtime clips and steps torch's fused AdamW on the CPU
# (ir/counts/optimizer.py adamw_path("cpu"), which imports ir/job.py and so cannot be called here;
# tests/runtime/test_optim_path.py keeps the two equal)
LOCAL_CPU_DEVICE = Device(name="cpu", bf16_flops=1e11, memory=4 * 2**30, hbm=2e10,
                          calibration=(("dp_sync_overlap", 0.0), ("grouped_gemm", 0.0),
                                       ("kv_expanded", 1.0), ("optimizer_bytes", 40.0)))


def local_cpu(ranks: int = 8) -> Cluster:
    """The embedded default: one node of ``ranks`` gloo processes on this machine."""
    return Cluster(name="local-cpu", nodes=1, gpus_per_node=ranks, device=LOCAL_CPU_DEVICE,
                   intra=Link(bandwidth=5e9, latency=2e-5), inter=Link(bandwidth=5e9, latency=2e-5),
                   backend="gloo")
