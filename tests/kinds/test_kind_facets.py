"""The facets of every block kind (plait/kinds/<kind>/counts.py, hf.py, dsl.py; module.py,
parallelize.py, prune.py): each kind exposes the same protocol, and the model-level sums in
plait.ir.counts are exactly the sums of the kinds' terms over the layers."""
import inspect
from pathlib import Path

import pytest

from plait.ir import counts, kinds
from plait.ir.counts import ActivationShape
from plait.ir.dsl import load_model

# The protocols, as the attention facets' docstrings state them (checked below to agree).
PROTOCOL = {
    "counts": ("params", "flops", "recompute_flops", "inactive_params", "fp32_kept_params",
               "saved_bytes", "selective_bytes", "shapes", "EXPERTS", "EXPORTS"),
    "hf": ("DECODER_SLOT", "DECODER_NORM", "llama_names", "hybrid_names", "nemotron_h_fields"),
    "dsl": ("read", "check_layers", "format_block", "HYBRID", "PRUNE_AXES", "axis_width",
            "structure_problem", "JOB_OPTIONS", "read_job_options", "format_job_options",
            "document_mask_problem"),
    # lowering level (tests/kinds/test_lowering_facet_protocol.py holds them to these names only)
    "module": ("mixer", "traced_whole"),
    "parallelize": ("tensor_parallel", "sequence_ops", "routed_experts"),
    "prune": ("axis_groups", "axis_step", "structure_hint", "layout_divisors", "narrowed",
              "check_prunable", "importance_hooks", "magnitude", "slice_index"),
}
# Every kind, and what sets kinds apart: MLA, windows, layernorm / learned positions, shared
# experts with a gate, sigmoid routing, hybrids with and without MoE.
MODELS = ("llama-3.1-8b", "mistral-7b-v0.1", "gpt-1.7b", "mixtral-8x7b", "qwen2-57b-a14b",
          "deepseek-v3", "nemotron-h-8b", "tiny-moe", "tiny-hybrid")


SPECS = Path(__file__).resolve().parents[2] / "specs" / "models"


def model(name):
    return load_model(str(SPECS / f"{name}.plait"))


@pytest.mark.parametrize("which", sorted(PROTOCOL))
def test_every_kind_exposes_the_same_protocol(which):
    reference = kinds.facet(kinds.names()[0], which)
    for name in PROTOCOL[which]:
        assert name in inspect.getdoc(reference), f"{which} protocol name {name} undocumented"
    for kind in kinds.names():
        facet = kinds.facet(kind, which)
        for name in PROTOCOL[which]:
            assert hasattr(facet, name), f"{kind}'s {which} facet lacks {name}"
            mine, theirs = getattr(facet, name), getattr(reference, name)
            if callable(theirs) and not isinstance(theirs, type):
                assert list(inspect.signature(mine).parameters) == list(inspect.signature(theirs).parameters), \
                    f"{kind}.{which}.{name} takes other arguments than the protocol's"


def test_kind_exports_are_unique_and_reachable_from_counts():
    seen = {}
    for kind in kinds.names():
        facet = kinds.facet(kind, "counts")
        for name in facet.EXPORTS:
            assert name not in seen, f"{name} exported by {seen.get(name)} and {kind}"
            seen[name] = kind
            assert getattr(counts, name) is getattr(facet, name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_count'"):
        counts.not_a_count  # noqa: B018


@pytest.mark.parametrize("name", MODELS)
def test_model_totals_are_the_sum_of_the_kinds_terms(name):
    m = model(name)
    facet = {k: kinds.facet(k, "counts") for k in set(m.layers)}
    layers = sum(counts.norm_params(m) + facet[k].params(m) for k in m.layers)
    p = counts.params(m)
    assert p.total == counts.embedding_params(m) + counts.head_params(m) + counts.final_norm_params(m) + layers
    assert p.active == p.total - sum(facet[k].inactive_params(m) for k in m.layers)
    seq, index = 4096, {k: -1 for k in facet}
    forward = counts.logits_flops(m)
    for k in m.layers:
        index[k] += 1
        forward += facet[k].flops(m, seq, True, index[k])
    assert counts.flops_per_token(m, seq, training=False) == pytest.approx(forward, rel=1e-12)
    selective = sum(facet[k].recompute_flops(m, seq) for k in m.layers)
    assert counts.recompute_flops_per_token(m, seq, "selective") == pytest.approx(selective, rel=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_layer_bytes_and_shapes_are_the_kinds_terms(name):
    m = model(name)
    s = ActivationShape(tokens=4096.0, seq=2048.0, tp=2, sp=True, act_bytes=2, etp=1, routed_tokens=8192.0)
    for k in set(m.layers):
        facet = kinds.facet(k, "counts")
        assert counts.layer_saved_bytes(m, k, s) == (sum(facet.saved_bytes(m, s).values()),
                                                     sum(facet.selective_bytes(m, s).values()))
        dense, expert = counts.layer_shapes(m, k)
        assert counts.params_of(dense + expert) == counts.layer_params(m, k)
        assert counts.fp32_kept_params(m, k, 2) == facet.fp32_kept_params(m, 2)


@pytest.mark.parametrize("name", MODELS)
def test_dsl_facets_write_what_they_read(name):
    """format_block's entries name only fields the kind's reader knows, and the prune axes report
    the model's own widths as structurally sound."""
    m = model(name)
    for k in set(m.layers):
        facet = kinds.facet(k, "dsl")
        assert facet.format_block(m.block(k), m)
        for axis in facet.PRUNE_AXES:
            width = facet.axis_width(m, axis)
            assert width > 0 and facet.structure_problem(m, axis, width) is None
