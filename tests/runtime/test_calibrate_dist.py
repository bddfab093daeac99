"""Tier 2: data-parallel importance calibration. tiny-hybrid (attention, mlp, mamba layers) scored
on 3 batches split over 2 processes (2 batches on one, 1 on the other), the accumulators
all-reduced: the scores equal one process scoring all 3 batches (fp64 sums, 1e-9 relative), for
the cosine and the perplexity depth measures."""
import math

import pytest
import torch

from plait.ir.dsl import load_model
from plait.lowering.build import build_model
from plait.lowering.prune.importance import activation_scores
from plait.runtime.calibrate_dist import calibrate_parallel

SPEC = load_model("specs/models/tiny-hybrid.plait")


def _flat(scores) -> list[float]:
    out = list(scores.hidden)
    for layer in scores.layers:
        out += list(layer.units) + list(layer.channels) + [layer.block]
    return out


@pytest.mark.tier2
@pytest.mark.parametrize("depth", ["cosine", "perplexity"])
def test_data_parallel_calibration_equals_one_process(tmp_path, depth):
    model = build_model(SPEC, seed=3)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, SPEC.vocab, (2, 16), generator=g) for _ in range(3)]
    want = activation_scores(model, SPEC, batches, depth)
    got = calibrate_parallel(SPEC, model.state_dict(), batches, ranks=2, work=tmp_path, depth=depth)
    assert got.tokens == want.tokens == 3 * 2 * 16
    assert [(l.layer, l.kind, len(l.units), len(l.channels)) for l in got.layers] == \
        [(l.layer, l.kind, len(l.units), len(l.channels)) for l in want.layers]
    a, b = _flat(got), _flat(want)
    assert all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b)), \
        max(abs(x - y) for x, y in zip(a, b))
