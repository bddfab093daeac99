"""Tied embeddings across pipeline stages (tier 1, one process): the last stage's head owns a copy
of the embedding weight, and the two copies' gradients sum to the reference gradient."""
from dataclasses import replace

import pytest
import torch

from plait.ir.errors import LayoutError
from plait.ir.plan import Layout
from plait.lowering.build import build_model
from plait.lowering.compile import program_text

from passes_util import SEQ, SPEC, lowered

TIED = replace(SPEC, name="tied", tie_embeddings=True)


def _batch(n=2):
    tokens = torch.randint(0, TIED.vocab, (n, SEQ), generator=torch.Generator().manual_seed(2))
    return tokens, torch.roll(tokens, -1, 1)


@pytest.mark.parametrize("layout", [Layout(pp=2), Layout(pp=2, vpp=2)])
def test_copies_start_equal_and_their_gradients_sum_to_the_reference(layout):
    model = build_model(TIED, seed=0)
    tokens, labels = _batch()
    want = model(tokens, labels)
    want.backward()
    program = lowered(layout, rank=1, spec=TIED)  # the last pp rank (its text shows the copy)
    first, last = program.stage(0), program.stage(program.num_chunks - 1)
    embed, head = first.get_parameter("embed.weight"), last.get_parameter("embed.weight")
    assert embed is not head and torch.equal(embed, head)
    got = program.pipe(tokens, labels)
    got.backward()
    assert torch.equal(got, want)
    assert torch.allclose(embed.grad + head.grad, model.embed.weight.grad, atol=1e-7, rtol=0)
    assert program.grad_sync.embedding_sum == ("embed.weight",)
    assert "embedding group" in program_text(program)[f"stage{program.num_chunks - 1}.py"]


def test_tied_under_tp_keeps_both_copies_vocab_sharded():
    program = lowered(Layout(tp=2, pp=2), spec=TIED)
    assert program.shards["embed.weight"].dim == 0
    head = program.stage(1).get_parameter("embed.weight")
    assert head.shape == (TIED.vocab // 2, TIED.hidden)


def test_one_pipeline_rank_with_virtual_stages_is_refused():
    with pytest.raises(LayoutError, match="different pipeline ranks"):
        lowered(Layout(pp=1, vpp=2), spec=TIED)
