"""Context parallelism without processes: the zigzag layout, the ring's chunk pairs (every causal
pair exactly once, balanced work), ring-attention math against SDPA (forward and gradients), Mamba
state passing against the whole-sequence scan, and the pass on shapes and errors."""
from dataclasses import replace

import pytest
import torch

from plait.ir.dsl import load_model
from plait.ir.errors import LayoutError
from plait.ir.model import Rope
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.lowering import cp_attention, cp_ops, cp_pairs
from plait.lowering.build import build_model
from plait.lowering.compile import dense_layout, lower
from plait.lowering.cp_attention import chunk_pairs, ring_backward, ring_forward
from plait.lowering.mamba_cp import chunk_final_state, entering_states
from plait.lowering.modules import ssd
from plait.lowering.modules.attention import causal_attention

torch.set_num_threads(1)
HYBRID = load_model("specs/models/tiny-hybrid.plait")
SPEC = replace(HYBRID, attention=replace(HYBRID.attention, rope=Rope(theta=10000.0)))


def plan(layout: Layout, spec=SPEC, seq=32) -> ParallelPlan:
    layout = dense_layout(layout)
    return ParallelPlan(job="t", model=spec.name, cluster="local-cpu", world=layout.world,
                        layout=layout, stages=even_stages(spec.num_layers, layout.pp),
                        global_batch=4, seq_len=seq)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_shards_round_trip_and_positions(cp):
    x = torch.arange(2 * 8 * cp).reshape(2, 8 * cp)
    pieces = [cp_ops.zigzag_shard(x, cp, r) for r in range(cp)]
    assert torch.equal(cp_ops.zigzag_unshard(pieces), x)
    for r, piece in enumerate(pieces):
        assert torch.equal(cp_ops.zigzag_positions(piece[..., None], cp, r), piece[0])
    gathered = torch.cat(pieces, dim=1)
    assert torch.equal(gathered[:, cp_ops.natural_from_gathered(cp, 4)], x)
    assert pieces[0][0, :4].tolist() == [0, 1, 2, 3] and pieces[0][0, 4] == 4 * (2 * cp - 1)


@pytest.mark.parametrize("cp", [2, 3, 4, 8])
def test_ring_computes_every_causal_chunk_pair_once_with_balanced_work(cp):
    for rank in range(cp):
        seen = []
        for src in range(cp):
            for qi, ki, offset in chunk_pairs(cp, rank, src):
                qa, kb = cp_ops.zigzag_chunks(cp, rank)[qi], cp_ops.zigzag_chunks(cp, src)[ki]
                assert qa >= kb and offset == qa - kb
                seen.append((qa, kb))
        want = [(qa, kb) for qa in cp_ops.zigzag_chunks(cp, rank) for kb in range(qa + 1)]
        assert sorted(seen) == sorted(want)
        # zigzag balance: every rank attends to 2*cp + 1 chunk pairs (two of them diagonal)
        assert len(seen) == 2 * cp + 1


@pytest.mark.parametrize("kernel", ["auto", "math"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_ring_math_on_one_rank_equals_causal_sdpa(kv_heads, kernel):
    """Both pair kernels a CPU / non-flash ring runs (CPU flash, explicit scores), merged by LSE."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 12, kv_heads, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 12, kv_heads, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    want = causal_attention(q, k, v, 0.3)
    out, lse = ring_forward(q, k, v, 0.3, cp_ops.PeerExchange("cp", 1, 0), kernel=kernel)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(want)
    grads = torch.autograd.grad(want, (q, k, v), dout)
    mine = ring_backward(dout, q, k, v, out, lse, 0.3, cp_ops.PeerExchange("cp", 1, 0), kernel=kernel)
    for a, b in zip(mine, grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("offset, window, kind", [(0, None, "causal"), (6, None, "all"), (0, 6, "causal"),
                                                (6, 12, "all"), (0, 3, "band"), (6, 6, "band"),
                                                (12, 8, "band")])
def test_cpu_flash_pair_kernels_equal_the_explicit_math(offset, window, kind):
    """Same chunk (causal), an earlier chunk wholly inside the window, and banded pairs (the kernel
    with a mask), rows that see no key included (offset 6, window 6: the last query sees none; its
    lse is -inf). The backward takes a merged, finite lse, as the ring's (a query sees itself)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(2, 3, 6, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    assert cp_attention.pair_visibility(6, offset, window) == kind
    out, lse = cp_attention.pair_forward(q, k, v, 0.5, offset, window)
    out_m, lse_m = cp_pairs.math_forward(q, k, v, 0.5, offset, window)
    torch.testing.assert_close((out, lse), (out_m, lse_m))
    lse = torch.logaddexp(lse, cp_pairs.math_forward(q, k, v, 0.5, 0, None)[1])
    for a, b in zip(cp_attention.pair_backward(do, q, k, v, out, lse, 0.5, offset, window),
                    cp_pairs.math_backward(do, q, k, v, out, lse, 0.5, offset, window)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("window", [None, 12])
def test_a_low_precision_pair_kernel_gets_bf16_operands_and_merges_in_fp32(monkeypatch, window):
    """The path SDPA's flash backend takes on CUDA (bf16 operands, bf16 pair outputs, fp32 LSE,
    merges and gradient sums in fp32), here with PyTorch's CPU flash kernel on bf16 in its place.
    Against fp32 attention of the same bf16 inputs: a few bf16 roundings (2^-8) of the pair
    outputs and of the gradients the kernel returns, norm-wise; bound 2e-2."""
    monkeypatch.setitem(cp_pairs.KERNELS, "bf16-flash", cp_pairs.PairKernel(
        "bf16-flash", cp_pairs.cpu_flash_forward, cp_pairs.cpu_flash_backward, low_precision=True))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 16, h, 8, generator=gen).bfloat16() for h in (4, 2, 2))
    dout = torch.randn(2, 16, 4, 8, generator=gen).bfloat16()
    one = cp_ops.PeerExchange("cp", 1, 0)
    out, lse = ring_forward(q, k, v, 0.3, one, window, "bf16-flash")
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    grads = ring_backward(dout, q, k, v, out, lse, 0.3, one, window, "bf16-flash")
    ref = [t.float().requires_grad_() for t in (q, k, v)]
    want = causal_attention(*ref, 0.3, window)
    wanted = torch.autograd.grad(want, ref, dout.float())
    for got, exp in [(out, want)] + list(zip(grads, wanted)):
        assert got.dtype == torch.bfloat16
        assert ((got.float() - exp).norm() / exp.norm()).item() < 2e-2
    # an fp32 ring asking for a low-precision kernel runs the math pairs (flash has no fp32), as
    # does a head dimension flash does not take
    assert cp_pairs.resolve("bf16-flash", q.float()).name == "math"
    assert cp_pairs.resolve("bf16-flash", torch.zeros(1, 2, 2, 12, dtype=torch.bfloat16)).name == "math"


def test_sdpa_flash_pairs_run_a_sliding_window_band_as_fp32_math():
    """SDPA's flash kernel has no band mask: a band pair runs the math on upcast operands (no CUDA
    op involved, so this runs here), equal to the math kernel on the same values."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(2, 3, 6, 8, generator=gen).bfloat16() for _ in range(4))
    assert cp_attention.pair_visibility(6, 6, 6) == "band"
    out, lse = cp_pairs.sdpa_flash_forward(q, k, v, 0.5, 6, 6)
    want = cp_pairs.math_forward(q.float(), k.float(), v.float(), 0.5, 6, 6)
    assert out.dtype == torch.float32
    torch.testing.assert_close((out, lse), want)
    lse = torch.logaddexp(lse, cp_pairs.math_forward(q.float(), k.float(), v.float(), 0.5, 0)[1])
    got = cp_pairs.sdpa_flash_backward(do, q, k, v, out.bfloat16(), lse, 0.5, 6, 6)
    wanted = cp_pairs.math_backward(do.float(), q.float(), k.float(), v.float(), out.bfloat16().float(),
                                    lse, 0.5, 6, 6)
    for a, b in zip(got, wanted):
        torch.testing.assert_close(a, b)


def test_scan_state_passing_reproduces_the_whole_sequence():
    """The identity cp_ssd_scan relies on: zero-state chunk scans plus exp(cumsum a) C . E_c,
    with E from the chunks' final states and decays, equal the scan of the whole sequence."""
    gen = torch.Generator().manual_seed(1)
    b, s, h, p, g, n, parts = 2, 24, 4, 3, 2, 5, 4
    x = torch.randn(b, s, h, p, generator=gen, dtype=torch.float64)
    dt = torch.rand(b, s, h, generator=gen, dtype=torch.float64) * 0.5
    A = -torch.rand(h, generator=gen, dtype=torch.float64) * 2
    B, C = (torch.randn(b, s, g, n, generator=gen, dtype=torch.float64) for _ in range(2))
    want = ssd.ssd_sequential(x, dt, A, B, C)
    chunks = [t.chunk(parts, dim=1) for t in (x, dt, B, C)]
    finals = [chunk_final_state(chunks[0][i], chunks[1][i], A, chunks[2][i]) for i in range(parts)]
    entering = entering_states(torch.stack([f[0] for f in finals]), torch.stack([f[1] for f in finals]))
    out = []
    for i in range(parts):
        xi, dti, Bi, Ci = (c[i] for c in chunks)
        y = ssd.ssd_chunked(xi, dti, A, Bi, Ci, 4)
        decay = torch.exp((dti * A).cumsum(1))
        Ch = ssd.heads_from_groups(Ci, h)
        out.append(y + torch.einsum("bshn,bhpn->bshp", Ch, entering[i]) * decay[..., None])
    torch.testing.assert_close(torch.cat(out, dim=1), want, rtol=1e-10, atol=1e-10)


def test_cp_program_replaces_every_sequence_op():
    program = lower(build_model(SPEC, seed=0), SPEC, plan(Layout(cp=2, tp=2, sp=True)), 3)
    assert program.coords["cp"] == 1
    code = program.stage(0).code
    for name in ("zigzag_shard", "zigzag_positions", "ring_attention", "cp_causal_conv1d",
                 "cp_ssd_scan"):
        assert name in code, name
    assert "causal_attention(" not in code.replace("ulysses", "")
    inp, _, out, _ = program.stage_io["stage0"]
    assert tuple(inp) == (1, 32) and tuple(out) == (1, 32 // 2, SPEC.vocab // 2)  # local logits
    assert "zigzag_shard" in program.loss.code


def test_cp_with_pipeline_stages_slices_inputs_in_their_own_stage():
    program = lower(build_model(SPEC, seed=0), SPEC, plan(Layout(cp=2, pp=2, tp=2, sp=True)), 0)
    assert tuple(program.stage_io["stage0"][2]) == (1, 32 // 4, SPEC.hidden)  # seq / (cp * tp)
    assert "zigzag_shard" in program.stage(0).code and "zigzag_shard" in program.loss.code


def test_alltoall_variant_is_selected_by_the_layout():
    program = lower(build_model(SPEC, seed=0), SPEC, plan(Layout(cp=2, cp_comm="alltoall")), 0)
    assert "ulysses_attention" in program.stage(0).code


@pytest.mark.parametrize("layout, seq, message", [
    (Layout(cp=4), 36, "36 % 8 = 4"),
    (Layout(cp=8), 32, "shorter than the Mamba conv halo"),
    (Layout(cp=4, cp_comm="alltoall", tp=2), 64, "2 % 4 = 2"),
    (Layout(cp=2, cp_comm="sideways"), 32, "cp_comm = 'sideways'"),
])
def test_cp_layout_errors_show_the_arithmetic(layout, seq, message):
    with pytest.raises(LayoutError, match=message):
        lower(build_model(SPEC, seed=0), SPEC, plan(layout, seq=seq), 0)
