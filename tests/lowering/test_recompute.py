"""The recompute pass (tier 1, one process): layers become checkpointed regions, the program still
equals the reference bit for bit, and backward really re-runs what each mode says."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plait.ir.errors import LayoutError
from plait.ir.model import Attention, ModelSpec, MoE
from plait.ir.plan import Layout, Stage, even_stages
from plait.lowering.build import build_model
from plait.lowering.compile import program_text
from plait.lowering.passes.recompute import FSDP_GROUPS, layer_modules, regions
from plait.lowering.recompute import is_recomputing

from passes_util import SEQ, SPEC, lowered

ATTENTION_LAYERS = SPEC.layers.count("attention")


def _batch(n=2):
    tokens = torch.randint(0, SPEC.vocab, (n, SEQ), generator=torch.Generator().manual_seed(1))
    return tokens, torch.roll(tokens, -1, 1)


def _program(mode: str, pp: int = 1):
    return lowered(Layout(pp=pp), stages=even_stages(SPEC.num_layers, pp, recompute=mode))


class OpCounter(TorchDispatchMode):
    """How often each aten op runs while the mode is active."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(mode: str) -> Counter:
    program = _program(mode)
    tokens, labels = _batch()
    loss = program.pipe(tokens, labels)
    with OpCounter() as counter:
        loss.backward()
    return counter.calls


@pytest.fixture(scope="module")
def backward_ops():
    return {mode: _backward_ops(mode) for mode in ("none", "selective", "full")}


def test_none_recomputes_nothing(backward_ops):
    calls = backward_ops["none"]
    assert calls["_scaled_dot_product_flash_attention_for_cpu"] == 0 and calls["addmm"] == 0


def test_selective_reruns_the_attention_core_but_no_gemm(backward_ops):
    calls, none = backward_ops["selective"], backward_ops["none"]
    assert calls["_scaled_dot_product_flash_attention_for_cpu"] == ATTENTION_LAYERS
    assert calls["mm"] == none["mm"] and calls["addmm"] == 0  # matmul outputs were kept


def test_full_reruns_every_layer_forward(backward_ops):
    calls, none = backward_ops["full"], backward_ops["none"]
    assert calls["_scaled_dot_product_flash_attention_for_cpu"] == ATTENTION_LAYERS
    linears = sum(1 for _ in build_model(SPEC).layers.modules() if isinstance(_, torch.nn.Linear))
    # every layer linear once more, but the last of each layer (o_proj / down_proj): checkpoint
    # stops re-running a region once the tensors backward needs are back
    assert calls["addmm"] + calls["mm"] - none["mm"] == linears - SPEC.num_layers


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputing_program_equals_the_reference_bit_for_bit(mode):
    model = build_model(SPEC, seed=0)
    tokens, labels = _batch()
    want = model(tokens, labels)
    want.backward()
    program = _program(mode, pp=2)
    got = program.pipe(tokens, labels)
    got.backward()
    assert torch.equal(got, want)
    ref = dict(model.named_parameters())
    names = []
    for c in range(program.num_chunks):
        for name, p in program.stage(c).named_parameters():
            assert torch.equal(p.grad, ref[name].grad), name
            names.append(name)
    assert sorted(names) == sorted(ref)  # reference names, each once


def test_each_layer_is_one_region_and_the_rerun_is_flagged():
    program = _program("full", pp=2)
    assert set(regions(program.stage(0))) == {"layer0", "layer1", "layer2"}
    assert set(regions(program.stage(1))) == {"layer3", "layer4", "layer5"}
    seen = []
    region = regions(program.stage(0))["layer1"]
    region.register_forward_pre_hook(lambda *_: seen.append(is_recomputing()))  # re-runs stop early
    tokens, labels = _batch()
    program.pipe(tokens, labels).backward()
    assert seen == [False, True]  # forward, then the re-run in backward
    assert not is_recomputing()


def test_stages_recompute_independently_and_the_text_shows_regions():
    stages = (Stage(0, 0, 0, 3, recompute="full"), Stage(1, 0, 3, 6, recompute="none"))
    program = lowered(Layout(pp=2), stages=stages)
    assert regions(program.stage(1)) == {}
    text = program_text(program)["stage0.py"]
    assert "checkpointed(recompute_layer0, 'full'" in text and "# recompute region layer2" in text


def test_unknown_recompute_option_is_a_layout_error():
    with pytest.raises(LayoutError, match="recompute 'most'"):
        lowered(Layout(), stages=(Stage(0, 0, 0, 6, recompute="most"),))


def test_moe_expert_load_counts_each_token_once_under_full_recompute():
    """The aux-loss-free balancing counter is a side effect of forward; the re-run skips it."""
    spec = ModelSpec(name="moe-rc", vocab=64, hidden=32, layers=("attention", "moe"),
                     attention=Attention(heads=2, kv_heads=2, head_dim=16),
                     moe=MoE(experts=4, top_k=2, ffn=16, expert_bias=True))
    tokens = torch.randint(0, spec.vocab, (2, SEQ), generator=torch.Generator().manual_seed(4))
    loads = {}
    for mode in ("none", "full"):
        program = lowered(Layout(), stages=even_stages(2, 1, recompute=mode), spec=spec)
        program.pipe(tokens, tokens.roll(-1, 1)).backward()
        loads[mode] = next(b for n, b in program.pipe.named_buffers() if n.endswith("expert_load"))
    assert loads["none"].sum() == 2 * SEQ * 2  # tokens x top_k
    assert torch.equal(loads["full"], loads["none"])


@pytest.mark.parametrize("mode", ["none", "full"])
def test_fsdp_runs_each_layer_as_one_called_module_holding_the_layer(mode):
    """FSDP's units (runtime/fsdp.py): every layer is a child module the stage calls (a plain
    call, or the recompute region), reaching its parameters through the stage's own layer module,
    so the unit's hooks fire when the layer runs and cover every weight it reads; layers group as
    the planner's units (attention + MLP); names and numerics unchanged."""
    model = build_model(SPEC, seed=0)
    tokens, labels = _batch()
    want = model(tokens, labels)
    program = lowered(Layout(dp=2, dp_kind="fsdp"), stages=even_stages(SPEC.num_layers, 1, recompute=mode))
    stage = program.stage(0)
    units = layer_modules(stage)
    assert sorted(units) == list(range(SPEC.num_layers))
    assert stage.meta[FSDP_GROUPS] == ((0, 1), (2, 3), (4, 5))
    if mode == "none":
        calls = [n.target for n in stage.graph.nodes if n.op == "call_module"]
        assert calls == ["embed", *(f"fsdp_units.layer{i}" for i in range(6)), "head"]
    for i, unit in units.items():
        assert unit.get_submodule(f"layers.{i}") is stage.get_submodule(f"layers.{i}")
        assert [n for n, _ in unit.named_children()] == ["layers"]
    assert sorted(n for n, _ in stage.named_parameters()) == sorted(n for n, _ in model.named_parameters())
    assert torch.equal(program.pipe(tokens, labels), want)
