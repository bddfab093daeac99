"""Communication: alpha-beta collectives on a group's real topology, and the volumes the
blocks' tensor parallelism, the pipeline and each data-parallel flavour move per micro-batch or
per step (a block kind's own collectives: plait/kinds/<kind>/cost.py).

Ring collectives (NCCL's all-gather, reduce-scatter, all-reduce) move every byte over every hop of
the ring, so their throughput is the slowest hop's: NVLink when the group sits inside one node, the
rank's own NIC when it spans nodes. For an all-gather / reduce-scatter of S bytes (the full tensor)
over n ranks:

    t = (n-1)/n * S / B_slowest + (n-1) * latency

An all-reduce is a reduce-scatter plus an all-gather. An all-to-all where every rank scatters S
bytes sends (r-1)/n of it over NVLink (r = the group's ranks on this node) and (n-r)/n over its
NIC, both at once.
"""
from __future__ import annotations

from plait.ir import counts
from plait.ir.precision import PrecisionPolicy

from .context import Context, GroupShape, cluster_links, op_latency


def _ring(ctx: Context, g: GroupShape, nbytes: float, eff: float, op: str) -> float:
    """One ring pass ((n-1)/n of the bytes, n-1 latency terms) at ``op``'s latency."""
    b_in, b_out, _, _ = cluster_links(ctx.cluster, ctx.cal)
    bandwidth = b_out if g.crosses_nodes else b_in
    latency = op_latency(ctx.cluster, ctx.cal, op, g.crosses_nodes)
    n = g.size
    return (n - 1) / n * nbytes / (bandwidth * eff) + (n - 1) * latency


def all_gather(ctx: Context, g: GroupShape, nbytes: float, eff: float = 1.0,
               synced: bool = False) -> float:
    """All-gather (or reduce-scatter) whose full (gathered) tensor has ``nbytes`` bytes;
    ``synced``: issued right after another collective of the group, its peers already there
    (intra_latency_us_all_gather_synced)."""
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    return _ring(ctx, g, nbytes, eff, "all_gather_synced" if synced else "all_gather")


def reduce_scatter(ctx: Context, g: GroupShape, nbytes: float, eff: float = 1.0) -> float:
    """NCCL's ring reduce-scatter moves what an all-gather moves. Gloo has no reduce-scatter of
    its own: torch's ProcessGroupGloo all-reduces the whole buffer and keeps a slice, and so do
    plait's sequence-parallel and ZeRO-1 scatters there (lowering/collectives.py reduce_scatter):
    an all-reduce's cost."""
    if ctx.cluster.backend == "gloo":
        return all_reduce(ctx, g, nbytes, eff)
    return all_gather(ctx, g, nbytes, eff)


def all_reduce(ctx: Context, g: GroupShape, nbytes: float, eff: float = 1.0) -> float:
    """Two ring passes, each latency term at the all-reduce's own measured latency."""
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    return 2 * _ring(ctx, g, nbytes, eff, "all_reduce")


def all_to_all(ctx: Context, g: GroupShape, nbytes: float) -> float:
    """Every rank scatters ``nbytes`` evenly over the group (its own share stays local): one
    message of nbytes / n per peer, the node's peers over NVLink and the others over the NIC at
    the same time. Each message pays the link's latency before its bytes, so the achieved share
    of a link falls with the message size: m / (m + latency x bandwidth) per peer. Each level
    runs at its own all-to-all efficiency (a2a_eff over NVLink, a2a_inter_eff over the NIC)."""
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    b_in, b_out, a_in, a_out = cluster_links(ctx.cluster, ctx.cal)
    n, r, cal = g.size, g.per_node, ctx.cal
    eff_out = cal.a2a_inter_eff or cal.a2a_eff
    intra = (r - 1) * (nbytes / n / (b_in * cal.a2a_eff) + cal.a2a_peer_latency * a_in)
    inter = (n - r) * (nbytes / n / (b_out * eff_out) + cal.a2a_peer_latency * a_out)
    return max(intra, inter) + (a_out if g.crosses_nodes else a_in)


def p2p(ctx: Context, g: GroupShape, nbytes: float, waited: bool = True) -> float:
    """One send between neighbours of the group (pipeline stages, ring attention). ``waited``:
    the caller waits for it as soon as it is issued, an exchange as the CP ring and Schedule1F1B
    issue theirs, at the latency `plait calibrate` measures for one (intra_latency_us_p2p); else
    (receives posted ahead, sends waited for later: the interleaved schedule) the level's latency,
    which is all that is measured for those."""
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    b_in, b_out, a_in, a_out = cluster_links(ctx.cluster, ctx.cal)
    latency = op_latency(ctx.cluster, ctx.cal, "p2p", g.crosses_nodes) if waited else (
        a_out if g.crosses_nodes else a_in)
    return nbytes / (b_out if g.crosses_nodes else b_in) + latency


# ------------------------------------------------------------------------------------------------
# Around every block, per micro-batch, forward pass (backward moves the same volumes again); a
# kind's own traffic (attention's CP ring, MoE's dispatch, Mamba's CP states) is in its cost facet
# ------------------------------------------------------------------------------------------------

def tp_comm(ctx: Context) -> float:
    """Tensor parallel around one block: all-gather before + reduce-scatter after with sequence
    parallel, or one all-reduce after without. Exposed (no TP overlap). The gather follows the
    previous block's scatter with only a residual add and a norm between (in backward the
    same, reversed): its peers arrive together (synced)."""
    lay = ctx.layout
    if lay.tp <= 1:
        return 0.0
    g = ctx.group("dense", "tp")
    full = ctx.tokens * ctx.model.hidden * ctx.act_bytes
    if lay.sp:
        return all_gather(ctx, g, full, synced=True) + reduce_scatter(ctx, g, full)
    return all_reduce(ctx, g, full)


def vocab_loss_comm(ctx: Context) -> float:
    """The vocabulary-parallel cross entropy's forward (lowering/tp_ops.py): two all-reduces over
    TP per micro-batch, the row maxima (max_over) and each token's (sum of exponentials, target
    logit) (reduce_from_tp), fp32 and latency-bound; their backward moves nothing."""
    if ctx.layout.tp <= 1:
        return 0.0
    g = ctx.group("dense", "tp")
    row = ctx.tokens * counts.FP32_BYTES
    return all_reduce(ctx, g, row) + all_reduce(ctx, g, 2 * row)


def pp_send(ctx: Context, waited: bool = True, messages: int = 1) -> float:
    """Activations (or their gradients) sent to the next pipeline stage per micro-batch, as one
    call carrying ``messages`` of them."""
    if ctx.layout.pp <= 1:
        return 0.0
    nbytes = ctx.tokens_sp * ctx.model.hidden * ctx.act_bytes
    return p2p(ctx, ctx.group("dense", "pp"), messages * nbytes, waited)


def pp_exchange(ctx: Context) -> float:
    """A chunk's pipeline traffic per micro-batch: its activations forward and their gradients
    back, in the calls the schedule issues (each call one latency). torch.distributed.pipelining's
    Schedule1F1B fires a stage's activation send together with its next gradient receive and its
    gradient send with its next activation receive, one batch_isend_irecv each (schedules.py
    fwd_send_bwd_recv / bwd_send_fwd_recv): with pp = 2 both stages have one neighbour and issue
    one exchange per micro-batch (m + 1 calls a step, warm-up and cool-down included:
    benchmarks/count_collectives.py), an interior stage one per neighbour. The interleaved schedule
    (vpp > 1) issues every send and receive as its own call, its receives posted ahead and its
    sends waited for later (schedules.py _PipelineScheduleRuntime): not the exchange
    intra_latency_us_p2p measures (p2p's ``waited``)."""
    if ctx.layout.vpp > 1:
        return 2 * pp_send(ctx, waited=False)
    if ctx.layout.pp == 2:
        return pp_send(ctx, messages=2)
    return 2 * pp_send(ctx)


# ------------------------------------------------------------------------------------------------
# Data parallel
# ------------------------------------------------------------------------------------------------

def traffic_bytes(ctx: Context) -> tuple[int, int]:
    """(weight all-gather, gradient reduction) bytes per parameter of this job
    (counts.dp_traffic_bytes: the compute dtype and fp32)."""
    return counts.dp_traffic_bytes(PrecisionPolicy.of(ctx.job).kind)


def dp_sync(ctx: Context, dense_params: float, expert_params: float) -> tuple[float, float]:
    """(gradient reduction, parameter all-gather) seconds per step for one rank's parameters under
    replicated / zero1 (traffic_bytes: fp32 gradients, bf16 parameters). FSDP moves parameters
    per micro-batch instead: see fsdp_unit."""
    kind = ctx.layout.dp_kind
    if kind == "fsdp":
        return 0.0, 0.0
    param_b, grad_b = traffic_bytes(ctx)
    dense_g, expert_g = ctx.group("dense", "dp-cp"), ctx.group("expert", "edp")
    if kind == "replicated":
        red = all_reduce(ctx, dense_g, dense_params * grad_b) + all_reduce(
            ctx, expert_g, expert_params * grad_b)
        return red, 0.0
    red = reduce_scatter(ctx, dense_g, dense_params * grad_b) + reduce_scatter(
        ctx, expert_g, expert_params * grad_b)
    gather = all_gather(ctx, dense_g, dense_params * param_b) + all_gather(
        ctx, expert_g, expert_params * param_b)
    return red, gather


def step_reductions(ctx: Context) -> float:
    """Every step every rank joins two all-reduces of one number over the whole world: the loss
    (for the log) and the squared gradient norm (for clipping). Latency-bound; they wait for the
    slowest rank, so nothing hides them."""
    world, gpn = ctx.layout.world, ctx.cluster.gpus_per_node
    g = GroupShape(size=world, nodes=-(-world // gpn))
    return 2 * all_reduce(ctx, g, 4.0)


def fsdp_unit(ctx: Context, dense_params: float, expert_params: float) -> tuple[float, float]:
    """(one all-gather, one reduce-scatter) seconds of FSDP traffic for one unit's parameters
    (their full, gathered count on this rank's TP / EP shard): the weights in the compute dtype,
    the gradients in fp32 (traffic_bytes). Per micro-batch the unit is gathered
    counts.FSDP_GATHERS_PER_MICROBATCH times (before forward, again before backward) and
    scattered FSDP_SCATTERS_PER_MICROBATCH time (pipeline.fsdp_exposed). Dense parameters shard
    over DP x CP, experts over EDP: each on its own group's ring."""
    if ctx.layout.dp_kind != "fsdp":
        return 0.0, 0.0
    eff = ctx.cal.fsdp_eff
    param_b, grad_b = traffic_bytes(ctx)
    dense_g, expert_g = ctx.group("dense", "dp-cp"), ctx.group("expert", "edp")
    gather = (all_gather(ctx, dense_g, dense_params * param_b, eff)
              + all_gather(ctx, expert_g, expert_params * param_b, eff))
    scatter = (reduce_scatter(ctx, dense_g, dense_params * grad_b, eff)
               + reduce_scatter(ctx, expert_g, expert_params * grad_b, eff))
    return gather, scatter


def hidden(ctx: Context, collective: str, seconds: float, window: float) -> float:
    """Seconds of a ``collective`` ("all_gather", "reduce_scatter", "all_to_all", "p2p", "fsdp": a
    unit's gather or gradient scatter as FSDP2 issues them) lasting
    ``seconds`` that ``window`` seconds of compute running beside it hide: the device's
    overlap_COLLECTIVE (measured by `plait calibrate`, else planner/cost/context.py's default)
    times the time the two run together, the shorter of them."""
    return getattr(ctx.cal, f"overlap_{collective}") * min(seconds, max(0.0, window))
