"""Sliding-window attention without processes: the reference mask against transformers' rule, the
windowed ring attention of every CP rank (run as threads that pass tensors through queues, so the
real step, pair and merge code runs for cp 2, 4, 8) against whole-sequence windowed attention,
forward and gradients, with the steps outside the window really skipped; the CP pass keeping a
layer's window."""
import threading
from dataclasses import replace

import pytest
import torch

from plait.ir import counts
from plait.ir.dsl import load_model
from plait.ir.plan import Layout, ParallelPlan, even_stages
from plait.lowering import cp_ops
from plait.lowering.build import build_model
from plait.lowering.compile import dense_layout, lower
from plait.lowering.cp_attention import chunk_pairs, ring_backward, ring_forward
from plait.lowering.modules.attention import band_mask, causal_attention

torch.set_num_threads(1)
DENSE = load_model("specs/models/tiny-dense.plait")
WINDOWED = replace(DENSE, attention=replace(DENSE.attention, window=5, full_layers=(1,)))


def test_band_mask_is_transformers_sliding_window_rule():
    """transformers (masking_utils.sliding_window_overlay + causal): kv_idx > q_idx - window and
    kv_idx <= q_idx; a query sees itself and window - 1 keys before it."""
    s, w = 9, 3
    want = [[q - w < k <= q for k in range(s)] for q in range(s)]
    assert band_mask(s, s, 0, w).tolist() == want
    assert band_mask(s, s, 0, w).sum(-1).tolist() == [1, 2] + [3] * 7


def _attention_inputs(seq, heads=4, kv_heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, seq, h, dim, generator=gen, dtype=torch.float64, requires_grad=True)
            for h in (heads, kv_heads, kv_heads)]


def test_windowed_reference_equals_explicit_softmax():
    q, k, v = _attention_inputs(12)
    out = causal_attention(q, k, v, 0.3, window=4)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) * 0.3
    scores = scores.masked_fill(~band_mask(12, 12, 0, 4), float("-inf"))
    want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.repeat_interleave(2, dim=2))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(causal_attention(q, k, v, 0.3, window=12), causal_attention(q, k, v, 0.3))


class ThreadExchange:
    """cp_ops.PeerExchange's contract between threads. As with gloo's send / recv, messages from
    one rank to another match the receives in the order they were posted (at ``start``), not the
    order they are waited on."""

    def __init__(self, size, rank, boxes, sent):
        self.size, self.rank, self.boxes, self.sent = size, rank, boxes, sent
        self.posted = [0] * size  # receives posted per source

    def start(self, distance, tensors):
        self.sent.append(distance)
        to, source = (self.rank + distance) % self.size, (self.rank - distance) % self.size
        self.boxes[self.rank, to].put([t.clone() for t in tensors])
        ticket = (source, self.posted[source])
        self.posted[source] += 1
        return ticket

    def wait(self, ticket):
        source, index = ticket
        return self.boxes[source, self.rank].get(index)


class Mailbox:
    """Messages from one rank to another, in send order; ``get(i)`` waits for the i-th."""

    def __init__(self):
        self.items, self.ready = [], threading.Condition()

    def put(self, item):
        with self.ready:
            self.items.append(item)
            self.ready.notify_all()

    def get(self, index):
        with self.ready:
            assert self.ready.wait_for(lambda: len(self.items) > index, timeout=60), "no message"
            return self.items[index]


def _run_ranks(size, fn):
    """fn(rank, exchange) on ``size`` threads; returns their results and each rank's sends."""
    boxes = {(a, b): Mailbox() for a in range(size) for b in range(size)}
    sent = [[] for _ in range(size)]
    results, errors = [None] * size, []

    def run(rank):
        try:
            results[rank] = fn(rank, ThreadExchange(size, rank, boxes, sent[rank]))
        except Exception as e:  # noqa: BLE001 - re-raised below on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results, sent


@pytest.mark.parametrize("cp, window", [(2, 3), (2, None), (4, 9), (4, 20), (8, 5)])
def test_windowed_ring_attention_equals_the_whole_sequence(cp, window):
    seq = 8 * cp  # zigzag chunks of 4 tokens
    q, k, v = _attention_inputs(seq, seed=cp)
    want = causal_attention(q, k, v, 0.3, window=window)
    dout = torch.randn_like(want)
    grads = torch.autograd.grad(want, (q, k, v), dout)
    shard = lambda t, r: cp_ops.zigzag_shard(t.detach(), cp, r)  # noqa: E731

    def rank_step(rank, exchange):
        mine = [shard(t, rank) for t in (q, k, v)]
        out, lse = ring_forward(*mine, 0.3, exchange, window)
        return out, ring_backward(shard(dout, rank), *mine, out, lse, 0.3, exchange, window)

    results, sent = _run_ranks(cp, rank_step)
    out = cp_ops.zigzag_unshard([r[0] for r in results])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for i, grad in enumerate(grads):
        mine = cp_ops.zigzag_unshard([r[1][i] for r in results])
        torch.testing.assert_close(mine, grad, rtol=1e-10, atol=1e-10)
    steps = counts.ring_steps(cp, seq, window)
    # forward: one K/V exchange per step after the first; backward: again, plus dK/dV sent home
    assert sent[0][:len(steps) - 1] == list(steps[1:])
    assert sorted(sent[0][len(steps) - 1:]) == sorted([*steps[1:], *(-t for t in steps[1:])])
    if (cp, window) == (8, 5):
        assert steps == (0, 1, 7)  # 2 of the 7 exchanges of full causal attention


def test_pairs_outside_the_window_are_left_out():
    """cp 4, chunks of 4, window 5: a query chunk sees the key chunk right before it, no further."""
    for rank in range(4):
        for src in range(4):
            for qi, ki, offset in chunk_pairs(4, rank, src, 4, 5):
                assert offset in (0, 4)


def _plan(layout: Layout, spec=WINDOWED, seq=32) -> ParallelPlan:
    layout = dense_layout(layout)
    return ParallelPlan(job="t", model=spec.name, cluster="local-cpu", world=layout.world,
                        layout=layout, stages=even_stages(spec.num_layers, layout.pp),
                        global_batch=4, seq_len=seq)


@pytest.mark.parametrize("cp_comm, op", [("ring", "ring_attention"), ("alltoall", "ulysses_attention")])
def test_cp_pass_keeps_each_layers_window(cp_comm, op):
    program = lower(build_model(WINDOWED, seed=0), WINDOWED, _plan(Layout(cp=2, cp_comm=cp_comm)), 0)
    calls = [line for line in program.stage(0).code.splitlines() if f"{op}(" in line]
    assert len(calls) == 4
    assert ["window = 5" in c for c in calls] == [True, False, True, True]  # layer 1 is full
