"""Micro-benchmarks behind `plait calibrate CLUSTER`: the cost model's efficiencies measured on the
machines themselves, through the same kernels and torch.distributed collectives the runtime uses.

Every rank of the cluster runs this (spawned locally, or under torchrun on real nodes):

  compute   a linear's forward and backward GEMMs over a grid of shapes, caches evicted first
            (runtime/calibrate_ops.py; fit: efficiency = e / (1 + knee (1/m + 1/n + 1/k))),
            the experts' grouped GEMM (torch._grouped_mm, or the loop where it does not run),
            causal attention (the runtime's kernel) forward and backward at three sequence
            lengths (fit: efficiency = attn_eff / (1 + attn_knee / s),
            runtime/calibrate_attention.py), the SSD scan the runtime binds at four shapes
            (runtime/calibrate_scan.py), a large copy (memory bandwidth) and plait's memory-bound modules (the rate its
            norms and activations reach), the host cost of one small block (launch / dispatch
            overhead);
  sharing   the same GEMM on one rank, then on all ranks of a host at once: how many ranks the
            host runs at full rate (CPU processes sharing cores; GPUs own their device);
  network   all-gather, all-reduce and all-to-all per group size, inside a node and (with more
            than one node) one rank per node, fitted to alpha-beta: latency, bandwidth, and the
            all-to-all's bandwidth relative to the ring collectives'; FSDP2's host work per unit
            and how much of its collectives it hides (runtime/calibrate_fsdp.py);
  overlap   GEMMs with an all-gather / reduce-scatter / all-to-all running beside them, against
            each alone: how much of the collective compute hides (runtime/calibrate_overlap.py).

Rank 0 turns the medians into cost-model values (planner/cost/context.py Calibration keys) with
the measurement behind each; planner/calibration.py writes and reads the file.
"""
from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

from plait.ir import counts
from plait.lowering.modules.experts import grouped_linear, grouped_mm_works

from .calibrate_attention import attention_points, fit_attention, fit_reciprocal
from .calibrate_cp import cp_values, measure_cp
from .calibrate_fsdp import fsdp_values, measure_fsdp
from .calibrate_host import block_host_seconds, block_host_us, host_values
from .calibrate_insitu import insitu_latency, measure_insitu
from .calibrate_ops import elementwise_rate, linear_rates, measure_sharing, sharing_value
from .calibrate_overlap import derive_overlap, measure_overlap
from .calibrate_scan import fit_scan, measure_scan
from .calibrate_timing import timed


# ------------------------------------------------------------------------------------------------
# Compute on one rank
# ------------------------------------------------------------------------------------------------

def fit_knee(points: list[tuple[int, int, int, float]], peak: float) -> tuple[float, float]:
    """(gemm_eff, gemm_knee) from (m, n, k, FLOP/s): least squares of 1/eff against
    1/m + 1/n + 1/k, whose intercept is 1/gemm_eff and slope gemm_knee/gemm_eff
    (fit_reciprocal)."""
    fitted = fit_reciprocal([1 / m + 1 / n + 1 / k for m, n, k, _ in points],
                            [rate / peak for *_, rate in points])
    if fitted is None:  # noise or no knee: the big shapes' efficiency, no knee
        big = sorted(points, key=lambda p: p[0] * p[1] * p[2])[len(points) // 2:]
        return statistics.median(rate for *_, rate in big) / peak, 0.0
    return fitted


def grouped_rates(experts: int, rows: list[int], n: int, k: int, dtype, device) -> list:
    """(rows per expert, FLOP/s) of the experts' GEMM as the runtime runs it."""
    out = []
    w = torch.randn(experts, n, k, dtype=dtype, device=device)
    for r in rows:
        x = torch.randn(experts * r, k, dtype=dtype, device=device)
        counts = torch.full((experts,), r, dtype=torch.int64, device=device)
        t = timed(lambda: grouped_linear(x, counts, w), device)
        out.append((r, 2.0 * experts * r * n * k / t))
    return out


def copy_bandwidth(nbytes: int, device) -> float:
    """Bytes/s read + written by a large copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device)


# ------------------------------------------------------------------------------------------------
# Collectives
# ------------------------------------------------------------------------------------------------

def collective_seconds(op: str, group, n: int, nbytes: int, device, repeat: int = 5) -> float:
    """Median seconds of one collective whose full (gathered / reduced / scattered) tensor holds
    ``nbytes`` (fp32), on ``group`` of ``n`` ranks; every rank of the group must call it."""
    elems = max(n, nbytes // 4 // n * n)
    full = torch.randn(elems, device=device)
    shard = torch.randn(elems // n, device=device)
    fns = {"all_gather": lambda: dist.all_gather_into_tensor(full, shard, group=group),
           "all_reduce": lambda: dist.all_reduce(full, group=group),
           "all_to_all": lambda: dist.all_to_all_single(shard.clone(), shard, group=group)}
    if op == "all_to_all":  # every rank scatters ``nbytes``
        send = torch.randn(elems, device=device)
        recv = torch.empty_like(send)
        fns["all_to_all"] = lambda: dist.all_to_all_single(recv, send, group=group)
    dist.barrier(group=group)
    return timed(fns[op], device, repeat=repeat, warmup=1)


def fit_alpha_beta(xs: list[float], ts: list[float]) -> tuple[float, float]:
    """(intercept, slope) of t = a + b x by least squares, both kept >= 0."""
    mx, mt = statistics.fmean(xs), statistics.fmean(ts)
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(1e-15, sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / var) if var else 1e-15
    return max(0.0, mt - slope * mx), slope


# ------------------------------------------------------------------------------------------------
# The run: every rank calls measure(); rank 0 derives the values
# ------------------------------------------------------------------------------------------------

# GEMM shapes: each linear's time several times the overhead calibrate_ops subtracts
QUICK = {"gemm": [(64, 256, 128), (128, 256, 128), (256, 256, 512), (512, 512, 512),
                  (1024, 512, 512), (32, 512, 512)],
         "grouped": (8, [8, 32, 128], 256, 256), "attention": ((128, 256, 512), 4, 32, 1024),
         # the scan (seq, heads, head width, state, chunk): tiny-hybrid's and Nemotron-H's widths
         "scan": [(512, 4, 32, 16, 64), (512, 4, 32, 16, 32), (512, 4, 64, 128, 128),
                  (512, 4, 32, 32, 64)], "copy": 64 << 20, "elementwise": (1024, 256),
         "sizes": [64 << 10, 1 << 20, 4 << 20], "overlap_gemm": (512, 512, 512)}
FULL = {"gemm": [(m, n, k) for m in (32, 128, 512, 2048) for n, k in ((512, 512), (2048, 1024))],
        "grouped": (8, [8, 32, 128, 512], 512, 512), "attention": ((512, 1024, 2048), 8, 64, 2048),
        "scan": [(2048, 8, 64, 64, 128), (2048, 8, 32, 16, 32), (2048, 8, 64, 128, 128),
                 (2048, 8, 32, 32, 64)], "copy": 256 << 20, "elementwise": (4096, 1024),
        "sizes": [64 << 10, 1 << 20, 8 << 20, 32 << 20], "overlap_gemm": (1024, 1024, 1024)}


def measure_compute(dtype, device) -> dict:
    """One rank alone on its host (the others wait at a barrier)."""
    cfg = CONFIG
    experts, rows, n, k = cfg["grouped"]
    return {"grouped_kernel": grouped_mm_works(device.type, dtype),
            "gemm": linear_rates(cfg["gemm"], dtype, device),
            "grouped": grouped_rates(experts, rows, n, k, dtype, device),
            "attention": attention_points(*cfg["attention"], dtype, device),
            "scan": measure_scan(cfg["scan"], dtype, device),
            "copy": copy_bandwidth(cfg["copy"], device),
            "elementwise": elementwise_rate(*cfg["elementwise"], dtype, device),
            "block_host_s": block_host_seconds(device, dtype),
            "host_us": block_host_us(device, dtype)}


def intra_groups(on_host: int) -> list[list[list[int]]]:
    """Per group size (2, 4, ..., on_host): the node's ranks cut into consecutive groups of that
    size, measured all at once. In training every rank of a node is in a group of each kind and
    they talk at the same time (the two TP pairs of tp2 x dp2): on CPU ranks sharing cores, a
    group's collective waits while the other groups' ranks hold the cores; on a GPU node the
    groups share the NVSwitch. Rank 0's group is the one reported."""
    return [[list(range(start, start + n)) for start in range(0, on_host - n + 1, n)]
            for n in _sizes(on_host)]


def measure_network(rank: int, world: int, gpn: int, device, dtype=torch.float32) -> dict:
    """{level: {op: [(n, bytes, seconds)]}} for groups of 2, 4, ... ranks on node 0 (intra, all
    the node's groups of a size at once: intra_groups) and one rank per node (inter). Every rank
    creates every group (torch.distributed's rule)."""
    levels = {"intra": intra_groups(min(world, gpn))}
    nodes = world // gpn
    if nodes > 1:
        levels["inter"] = [[[i * gpn for i in range(n)]] for n in _sizes(nodes)]
    out: dict = {}
    for level, sizes in levels.items():
        for groups in sizes:
            mine = None
            for ranks in groups:
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine = (group, len(ranks))
            if mine is None:
                continue
            for op in ("all_gather", "all_reduce", "all_to_all"):
                for nbytes in CONFIG["sizes"]:
                    t = collective_seconds(op, mine[0], mine[1], nbytes, device)
                    out.setdefault(level, {}).setdefault(op, []).append((mine[1], nbytes, t))
        if level == "intra":  # the latency training pays: every group of the size at once
            for groups in sizes:
                got = measure_insitu(rank, groups, dtype, device)
                if got is not None:
                    out.setdefault("intra_insitu", []).append((len(groups[0]), got))
                fsdp = measure_fsdp(rank, groups, dtype, device)
                if fsdp is not None:
                    out.setdefault("intra_fsdp", []).append((len(groups[0]), fsdp))
            cp = measure_cp(rank, min(world, gpn), dtype, device)  # every rank calls it
            if cp is not None:
                out["intra_cp"] = cp
    return out


def _sizes(n: int) -> list[int]:
    out, s = [], 2
    while s <= n:
        out.append(s)
        s *= 2
    if n > 1 and n not in out:
        out.append(n)
    return out


CONFIG = QUICK


def measure(rank: int, world: int, gpn: int, dtype, device, full: bool = False) -> dict:
    """Everything, on every rank; rank 0's dict holds the compute and sharing measurements."""
    global CONFIG
    CONFIG = FULL if full else QUICK
    out: dict = {}
    if rank == 0:
        out["compute"] = measure_compute(dtype, device)
    dist.barrier()
    out["sharing"] = measure_sharing(rank, min(world, gpn), dtype, device)
    out["sharing_ranks"] = min(world, gpn)
    dist.barrier()
    net = measure_network(rank, world, gpn, device, dtype)
    nets = [None] * world
    dist.all_gather_object(nets, net)
    out["network"] = nets[0]
    for other in nets[1:]:  # the inter-node groups hold rank 0 as well; keep rank 0's view
        for level, ops in (other or {}).items():
            out["network"].setdefault(level, ops)
    dist.barrier()
    out["overlap"] = measure_overlap(rank, world, gpn, CONFIG["sizes"][-1], CONFIG["overlap_gemm"],
                                     dtype, device)
    out["overlap_ranks"] = min(world, gpn)
    return out


# ------------------------------------------------------------------------------------------------
# Measurements -> cost-model values
# ------------------------------------------------------------------------------------------------

def _link(points: list, op: str) -> tuple[float, float] | None:
    """(bandwidth bytes/s, latency s) of one level from (n, bytes, seconds) of a ring all-gather
    (t = (n-1) alpha + (n-1)/n S / B) or an all-to-all (t = (n-1)(S/n / B + alpha) + alpha)."""
    by_n: dict = {}
    for n, nbytes, t in points:
        by_n.setdefault(n, []).append(((n - 1) / n * nbytes, t))
    bws, alphas = [], []
    for n, pts in by_n.items():
        a, b = fit_alpha_beta([x for x, _ in pts], [t for _, t in pts])
        bws.append(1.0 / b)
        alphas.append(a / (n - 1) if op == "all_gather" else a / n)
    if not bws:
        return None
    return statistics.median(bws), statistics.median(alphas)


def memory_efficiency(c: dict, dev) -> tuple[float, str]:
    """(hbm_eff, how measured). The CPU runs plait's norms and activations as eager ATen ops
    (runtime/kernels.py binds no fused kernel there): their measured rate is what memory-bound
    work reaches. An accelerator's runtime fuses them into bandwidth-bound kernels: a large copy."""
    if dev.name == "cpu" and c.get("elementwise"):
        return c["elementwise"] / dev.hbm, (
            f"plait's norm, activation and residual add, forward + backward: "
            f"{c['elementwise'] / 1e9:.2f} GB/s of {dev.hbm / 1e9:.0f} spec (a copy: "
            f"{c['copy'] / 1e9:.1f})")
    return c["copy"] / dev.hbm, f"copy: {c['copy'] / 1e9:.1f} GB/s of {dev.hbm / 1e9:.0f} spec"


def derive(measured: dict, cluster, precision: str) -> tuple[dict, dict]:
    """(Calibration values, how each was measured) from rank 0's measurements."""
    dev, c = cluster.device, measured["compute"]
    peak, peak_bf16 = dev.peak_flops(precision), dev.peak_flops("bf16")
    values, sources = {}, {}
    eff, knee = fit_knee(c["gemm"], peak)
    values.update(gemm_eff=eff, gemm_knee=knee)
    sources["gemm_eff"] = sources["gemm_knee"] = (
        f"{len(c['gemm'])} linears forward + backward, caches evicted, {precision}: best "
        f"{max(r for *_, r in c['gemm']) / 1e9:.1f}"
        f" GFLOP/s of {peak / 1e9:.0f} peak; 1/eff fitted linear in 1/m + 1/n + 1/k")
    grouped_ok = c.get("grouped_kernel", True)
    values["grouped_gemm"] = 1.0 if grouped_ok else 0.0
    sources["grouped_gemm"] = "torch._grouped_mm " + ("runs here" if grouped_ok else
                                                      "does not run here: a loop per expert")
    values["attn_eff"], values["attn_knee"], values["attn_bwd_ratio"] = fit_attention(
        c["attention"], peak_bf16)
    sources["attn_eff"] = sources["attn_knee"] = sources["attn_bwd_ratio"] = (
        "causal attention (the runtime's kernel) forward and backward at lengths "
        + ", ".join(f"{s} ({f / 1e9:.1f} / {b / 1e9:.1f} GFLOP/s)" for s, f, b in c["attention"])
        + "; 1/eff fitted linear in 1/length, backward's ratio at the same knee")
    scan = c["scan"]
    eff, per_chunk, per_token = fit_scan(scan["points"], peak_bf16)
    values.update(scan_eff=eff, scan_chunk_ns=per_chunk, scan_token_ns=per_token,
                  scan_bwd_ratio=scan["bwd_ratio"])
    shapes = ", ".join(f"p {p} n {n} l {l}: {s * 1e3:.1f} ms" for _, _, p, n, l, s in scan["points"])
    sources["scan_eff"] = sources["scan_chunk_ns"] = sources["scan_token_ns"] = (
        f"SSD scan ({scan.get('kernel', 'plait SSD chunked scan')}, the runtime's) forward at "
        f"{len(scan['points'])} shapes "
        f"({shapes}), fitted to FLOPs at scan_eff + per chunk position + per token "
        f"(runtime/calibrate_scan.py)")
    sources["scan_bwd_ratio"] = ("the SSD scan's backward as the runtime runs it (the fallback "
                                 "recomputes its forward), against its forward")
    values["hbm_eff"], sources["hbm_eff"] = memory_efficiency(c, dev)
    values["kernel_us"] = c["block_host_s"] * 1e6
    sources["kernel_us"] = "forward of one width-8 decoder block on one token"
    host, how = host_values(c.get("host_us", {}), measured.get("statistic", "min"))
    values.update(host)
    sources.update(how)
    values["host_sync"] = 1.0 if dev.name == "cpu" else 0.0
    sources["host_sync"] = ("the CPU runs its kernels itself" if dev.name == "cpu" else
                            "kernels run asynchronously on the accelerator")
    values["dp_sync_overlap"] = 0.0
    sources["dp_sync_overlap"] = ("plait's runtime reduces replicated / ZeRO-1 gradients and "
                                  "gathers ZeRO-1 parameters after the backward "
                                  "(runtime/optim.py, runtime/zero1.py)")
    path = counts.adamw_path(counts.torch_device_type(cluster.backend))
    values["optimizer_bytes"] = float(path.step_bytes)
    sources["optimizer_bytes"] = (f"plait's runtime clips by the global norm and steps torch's "
                                  f"{path.kernel} AdamW: {path.reason} (ir/counts/optimizer.py)")
    if dev.name == "cpu" and measured.get("sharing"):
        values["shared_cores"], sources["shared_cores"] = sharing_value(
            measured["sharing"], measured["sharing_ranks"])
    overlap, how = derive_overlap(measured.get("overlap", {}), measured.get("overlap_ranks", 0))
    values.update(overlap)
    sources.update(how)
    network = measured.get("network", {})
    for level, spec in (("intra", cluster.intra), ("inter", cluster.inter)):
        ops = network.get(level)
        if not ops:
            continue
        ring, a2a = _link(ops["all_gather"], "all_gather"), _link(ops["all_to_all"], "all_to_all")
        values[f"{level}_eff"] = ring[0] / spec.bandwidth
        values[f"{level}_latency_us"] = max(0.1, ring[1] * 1e6)
        sources[f"{level}_eff"] = sources[f"{level}_latency_us"] = (
            f"all-gather alpha-beta over {sorted({n for n, *_ in ops['all_gather']})} ranks: "
            f"{ring[0] / 1e9:.2f} GB/s, {ring[1] * 1e6:.1f} us")
        if a2a:  # each level's all-to-all against that level's ring collective
            key = "a2a_eff" if level == "intra" else "a2a_inter_eff"
            values[key] = min(2.0, a2a[0] / ring[0])
            sources[key] = (f"{level}-node all-to-all {a2a[0] / 1e9:.2f} GB/s over the "
                            f"all-gather's {ring[0] / 1e9:.2f} GB/s")
        if level == "intra" and network.get("intra_insitu"):
            got = insitu_latency(network["intra_insitu"], ring[0])
            how = f"{got.how}; bare back to back: {ring[1] * 1e6:.1f} us"
            values["intra_latency_us"], sources["intra_latency_us"] = max(0.1, got.alpha * 1e6), how
            for op, alpha in got.per_op:  # each op's own (planner/cost/comm.py)
                values[f"intra_latency_us_{op}"] = max(0.1, alpha * 1e6)
                sources[f"intra_latency_us_{op}"] = how
        for key, to_values in (("intra_fsdp", fsdp_values), ("intra_cp", cp_values)):
            if level == "intra" and network.get(key):
                got, how = to_values(network[key])
                values.update(got)
                sources.update(how)
    return values, sources
