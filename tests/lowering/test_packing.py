"""Packed documents and the SFT loss mask in the reference model, without processes.

fp64 throughout: "equal" below means within 1e-12 (rounding of reordered sums), while a missing
mask moves the loss of the tiny random model by ~5e-4 (> 1e-6 asserted); the loss-mask test
compares gradients bit for bit."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plait.ir.dsl import load_model
from plait.ir.errors import PlaitError
from plait.ir.model import MLP, Attention, ModelSpec, Rope
from plait.lowering.build import build_model
from plait.lowering.modules.attention import document_attention
from plait.lowering.modules.model import IGNORE_INDEX
from plait.runtime.kernels import document_segments
from plait.runtime.packing import Packing, positions_after_eos, positions_from_starts

torch.set_num_threads(1)
SPEC = ModelSpec(name="pack", vocab=64, hidden=32, layers=("attention", "mlp") * 2,
                 attention=Attention(heads=4, kv_heads=2, head_dim=8, rope=Rope()), mlp=MLP(ffn=48))
LENGTHS = [(5, 7, 4), (16,), (1, 9, 6)]  # documents per row of a [3, 16] packed batch
TOL = 1e-12


def packed_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, SPEC.vocab, (len(LENGTHS), 16), generator=gen)
    labels = torch.randint(0, SPEC.vocab, (len(LENGTHS), 16), generator=gen)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    return tokens, labels, positions


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("window", [None, 3])
def test_packed_with_document_mask_equals_each_document_alone(window):
    """With a sliding window too: the window applies inside each document."""
    spec = SPEC if window is None else replace(SPEC, attention=replace(SPEC.attention, window=window))
    tokens, labels, positions = packed_batch()
    packed = build_model(spec, dtype=torch.float64, document_mask=True)
    loss = packed(tokens, labels, positions)
    loss.backward()
    alone = build_model(spec, dtype=torch.float64)  # the plain model, one document per call
    total = torch.zeros((), dtype=torch.float64)
    for r, row in enumerate(LENGTHS):
        start = 0
        for n in row:
            piece = slice(start, start + n)
            total = total + alone(tokens[r:r + 1, piece], labels[r:r + 1, piece]) * n
            start += n
    total = total / tokens.numel()
    total.backward()
    assert abs(float(loss.detach()) - float(total.detach())) < TOL
    want = grads(alone)
    for name, g in grads(packed).items():
        assert (g - want[name]).abs().max() < TOL, name
    # the mask matters: the same packed rows without it attend across documents
    unmasked = build_model(spec, dtype=torch.float64)(tokens, labels)
    assert abs(float(unmasked.detach()) - float(total.detach())) > 1e-6


def test_masked_labels_contribute_exactly_zero_gradient():
    """Changing the targets the loss mask excludes changes no gradient bit; the loss times the
    batch's scale is the mean over the counted tokens."""
    tokens, labels, positions = packed_batch()
    counted = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    model = build_model(SPEC, dtype=torch.float64, document_mask=True, loss_mask=True)
    results = []
    for other in (labels, (labels + 7) % SPEC.vocab):
        model.zero_grad()
        masked = torch.where(counted, labels, IGNORE_INDEX)
        # the raw targets differ only where not counted; the loader turns those into IGNORE_INDEX
        raw = torch.where(counted, labels, other)
        assert torch.equal(torch.where(counted, raw, IGNORE_INDEX), masked)
        loss = model(tokens, torch.where(counted, raw, IGNORE_INDEX), positions)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    logits = model(tokens, None, positions)
    want = F.cross_entropy(logits.flatten(0, 1), masked.flatten(), ignore_index=IGNORE_INDEX)
    scale = counted.numel() / int(counted.sum())
    assert abs(float(l0 * scale) - float(want.detach())) < TOL
    # masking really drops tokens: the unmasked mean differs
    assert abs(float(F.cross_entropy(logits.flatten(0, 1), labels.flatten()).detach()) - float(want.detach())) > 1e-6


def test_document_attention_is_block_diagonal_causal():
    q, k, v = (torch.randn(1, 6, 2, 4, dtype=torch.float64) for _ in range(3))
    docs = torch.tensor([[0, 0, 0, 3, 3, 3]])
    out = document_attention(q, k, v, 0.5, docs)
    for piece in (slice(0, 3), slice(3, 6)):
        alone = F.scaled_dot_product_attention(*(t[:, piece].transpose(1, 2) for t in (q, k, v)),
                                               is_causal=True, scale=0.5).transpose(1, 2)
        assert (out[:, piece] - alone).abs().max() < TOL
    cu, longest = document_segments(torch.tensor([[0, 0, 2, 2], [-1, -1, -1, 3]]))
    assert cu.tolist() == [0, 2, 4, 7, 8] and longest == 3


def test_positions_restart_per_document_and_at_the_window_start():
    starts = np.array([0, 5, 12, 13])
    # a window starting mid-document counts it from 0 (Megatron's reset_position_ids)
    assert positions_from_starts(starts, 3, 12).tolist() == [0, 1, 0, 1, 2, 3, 4, 5, 6, 0, 0, 1]
    assert positions_after_eos(np.array([4, 9, 0, 5, 0, 0, 7]), eos=0).tolist() == [0, 1, 2, 0, 1, 0, 0]
    assert Packing.of(__import__("plait.ir.job", fromlist=["Data"]).Data(objective="sft")).loss_mask


def test_a_model_with_mamba_layers_refuses_document_masking():
    hybrid = load_model("specs/models/tiny-hybrid.plait")
    with pytest.raises(PlaitError, match="Mamba state is not reset"):
        build_model(hybrid, document_mask=True)


def test_every_stage_of_a_cp_pp_program_reads_its_own_positions_slice():
    """cp2 x pp2 x tp2 (sp): each stage takes the positions as an input (a kwarg of the pipeline
    schedule) and slices its own zigzag share; no stage hands positions to the next."""
    from plait.ir.plan import Layout, ParallelPlan, even_stages
    from plait.lowering import cp_ops
    from plait.lowering.compile import dense_layout, lower

    layout = dense_layout(Layout(cp=2, pp=2, tp=2, sp=True))
    plan = ParallelPlan(job="t", model=SPEC.name, cluster="local-cpu", world=layout.world,
                        layout=layout, stages=even_stages(SPEC.num_layers, 2), global_batch=2,
                        seq_len=16)
    for rank in (0, 7):  # a fresh model each: lowering makes its weights the rank's shards
        program = lower(build_model(SPEC, document_mask=True), SPEC, plan, rank)
        for chunk, stage in program.local_modules():
            inputs = [n.target for n in stage.graph.nodes if n.op == "placeholder"]
            assert inputs[-1] == "positions" and len(inputs) == 2, inputs
            slices = [n for n in stage.graph.nodes if n.target is cp_ops.zigzag_shard]
            assert len(slices) == 1 + (chunk == 0)  # one per attention layer (+ the tokens)
        # the boundary is the activation alone: [mbs, seq / cp / tp (SP), hidden]
        assert program.stage_io["stage0"][2] == (1, 16 // 2 // 2, SPEC.hidden)
