"""The fused-kernel registry: what runs here (the fallbacks, checked numerically), the selection
logic with availability monkeypatched (fake flash-attn / mamba-ssm / causal-conv1d / TE modules),
guarded imports, log-once, the graph seam, and `plait doctor`. fp8 numerics: tests/lowering/test_fp8.py."""
import logging
import types
from pathlib import Path

import pytest
import torch

from plait.cli import main
from plait.ir.dsl import load_model
from plait.ir.plan import Layout
from plait.lowering import cp_attention
from plait.lowering.build import build_model
from plait.lowering.compile import lower
from plait.lowering.fp8 import fp8_linear
from plait.lowering.modules import ssd
from plait.lowering.modules.attention import causal_attention
from plait.lowering.modules.mamba import causal_conv1d
from plait.runtime import fp8_backends, kernels
from plait.runtime.harness.parity import Case

torch.set_num_threads(1)
MODELS = Path(__file__).resolve().parents[2] / "specs" / "models"
torch.fx.wrap("causal_attention")  # one node when traced from this module too, as in the model


@pytest.fixture(autouse=True)
def fresh_registry():
    kernels.reset()
    yield
    kernels.reset()


def _qkv(sq, sk, hq=4, hkv=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, sq, hq, d, generator=gen, dtype=torch.float64),
            torch.randn(2, sk, hkv, d, generator=gen, dtype=torch.float64),
            torch.randn(2, sk, hkv, d, generator=gen, dtype=torch.float64))


def _explicit_attention(q, k, v, scale, mask):
    k, v = (t.repeat_interleave(q.shape[2] // t.shape[2], dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


def test_this_machine_runs_every_fallback_and_says_why():
    for choice in kernels.report("cpu"):
        assert not choice.fused and choice.reason
    assert kernels.select("attention").fn is kernels.sdpa_attention
    assert kernels.select("ssd_scan").fn is ssd.ssd_chunked
    assert kernels.select("causal_conv1d").fn is causal_conv1d
    assert "does not train in fp8" in kernels.select("fp8_linear", "cuda").reason
    assert kernels.select("fp8_linear", "cpu", fp8=True).fn is fp8_linear  # the emulation


@pytest.mark.parametrize("sq, sk", [(7, 7), (3, 7), (1, 5)])
def test_sdpa_fallback_aligns_the_causal_mask_bottom_right(sq, sk):
    q, k, v = _qkv(sq, sk)
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)  # query i sees keys <= i + sk - sq
    torch.testing.assert_close(kernels.sdpa_attention(q, k, v, 0.4),
                               _explicit_attention(q, k, v, 0.4, mask))
    if sq == sk:
        torch.testing.assert_close(kernels.sdpa_attention(q, k, v, 0.4), causal_attention(q, k, v, 0.4))
    assert kernels.bottom_right_causal_mask(2, 4).tolist() == [[True, True, True, False],
                                                                [True, True, True, True]]


@pytest.mark.parametrize("sq, sk", [(10, 10), (4, 10)])
def test_sdpa_fallback_windows_bottom_right(sq, sk):
    """A sliding window of 3: query i (at position i + sk - sq) sees keys 0 <= i + sk - sq - j < 3."""
    q, k, v = _qkv(sq, sk)
    mask = torch.tensor([[0 <= i + sk - sq - j < 3 for j in range(sk)] for i in range(sq)])
    torch.testing.assert_close(kernels.sdpa_attention(q, k, v, 0.4, window=3),
                               _explicit_attention(q, k, v, 0.4, mask))


def test_varlen_fallback_attends_within_each_packed_sequence():
    q, k, v = _qkv(9, 9)
    lengths = [4, 2, 3]
    cu = torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    out = kernels.sdpa_varlen_attention(q[0], k[0], v[0], cu, cu, 4, 4, 0.5)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        want = causal_attention(q[:1, part], k[:1, part], v[:1, part], 0.5)[0]
        torch.testing.assert_close(out[part], want)
        start += n


def _fake_cuda(monkeypatch, **modules):
    """CUDA 'available' and the given packages 'importable' as fake modules."""
    monkeypatch.setattr(kernels, "cuda_ready",
                        lambda device: (torch.device(device).type == "cuda", "not a CUDA device"))
    table = {k.replace("_", "-"): v for k, v in modules.items()}
    monkeypatch.setattr(kernels, "probe", lambda package: (table[package], "") if package in table
                        else (None, f"{package} is not installed"))


def test_selection_prefers_fused_kernels_when_cuda_and_the_package_are_there(monkeypatch):
    calls = []
    flash = types.SimpleNamespace(
        flash_attn_func=lambda q, k, v, softmax_scale, causal, window_size=(-1, -1): calls.append(
            ("flash", causal, window_size)) or q,
        flash_attn_varlen_func=lambda *a, softmax_scale, causal: calls.append(("varlen", causal)) or a[0])
    scan = types.SimpleNamespace(mamba_chunk_scan_combined=lambda x, dt, A, B, C, chunk: calls.append(("scan", chunk)) or x)
    _fake_cuda(monkeypatch, flash_attn=flash, mamba_ssm=scan)
    attention = kernels.select("attention", "cuda")
    assert attention.fused and attention.kernel.startswith("flash-attn")
    q = torch.zeros(1, 2, 1, 4)
    attention.fn(q, q, q, 0.5)
    attention.fn(q, q, q, 0.5, window=4096)  # the query and 4095 keys before it (transformers' rule)
    kernels.select("attention_varlen", "cuda").fn(q[0], q[0], q[0], None, None, 2, 2, 0.5)
    kernels.select("ssd_scan", "cuda").fn(q, None, None, None, None, 64)
    assert calls == [("flash", True, (-1, -1)), ("flash", True, (4095, 0)), ("varlen", True),
                     ("scan", 64)]
    conv = kernels.select("causal_conv1d", "cuda")
    assert not conv.fused and conv.reason == "causal-conv1d is not installed"


def test_causal_conv1d_adapter_passes_channels_first_and_silu(monkeypatch):
    seen = {}

    def causal_conv1d_fn(x, weight, bias, activation):
        seen.update(x=tuple(x.shape), weight=tuple(weight.shape), activation=activation)
        return x
    _fake_cuda(monkeypatch, causal_conv1d=types.SimpleNamespace(causal_conv1d_fn=causal_conv1d_fn))
    out = kernels.select("causal_conv1d", "cuda").fn(torch.zeros(2, 5, 3), torch.zeros(3, 1, 4), None)
    assert seen == {"x": (2, 3, 5), "weight": (3, 4), "activation": "silu"} and out.shape == (2, 5, 3)


def test_torchao_fp8_gemm_only_for_fp8_jobs_on_cuda(monkeypatch):
    """CUDA 'available' (stub) and the real torchao: its fp8 GEMM is chosen for fp8 jobs only, and
    the bound function runs torchao's cast and GEMM (on CPU here) on plait's fp8 autograd."""
    _fake_cuda(monkeypatch, torchao=pytest.importorskip("torchao.float8"))
    assert not kernels.select("fp8_linear", "cuda", fp8=False).fused
    choice = kernels.select("fp8_linear", "cuda", fp8=True)
    assert choice.fused and choice.kernel.startswith("torchao")
    ones = torch.ones(2, 3, dtype=torch.bfloat16)
    out = choice.fn(ones, torch.ones(4, 3, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16))
    assert torch.equal(out, torch.full((2, 4), 4.0, dtype=torch.bfloat16))  # 1.0 is exact in fp8
    assert not kernels.select("fp8_linear", "cpu", fp8=True).fused


def _tail():
    rule = kernels.RULES["fp8_linear"]
    return rule.fallback_name, rule.fallback, rule.fp8_only


@pytest.mark.parametrize("env, installed, want", [
    (None, ("torchao", "transformer-engine"), "torchao"),  # auto: torchao first
    (None, ("transformer-engine",), "transformer-engine"),  # auto: TE when torchao is missing
    ("transformer-engine", ("torchao", "transformer-engine"), "transformer-engine"),
    ("te", ("torchao", "transformer-engine"), "transformer-engine"),
    ("torchao", ("transformer-engine",), None),  # asked for torchao, not there: emulation
    ("emulation", ("torchao", "transformer-engine"), None),
    (None, (), None),
])
def test_fp8_backend_selection(monkeypatch, env, installed, want):
    """Which fp8 GEMM backend a CUDA fp8 run binds: PLAIT_FP8_BACKEND, else torchao, else TE, else
    the emulation; the reason names every candidate that was passed over."""
    if env is None:
        monkeypatch.delenv(fp8_backends.ENV, raising=False)
    else:
        monkeypatch.setenv(fp8_backends.ENV, env)
    fused = kernels.RULES["fp8_linear"].fused
    doubles = tuple(kernels.Fused(f.package, f.name, lambda module, f=f: _double(f.package)) for f in fused)
    monkeypatch.setitem(kernels.RULES, "fp8_linear", kernels.Rule(doubles, *_tail()))
    _fake_cuda(monkeypatch, **{p.replace("-", "_"): types.SimpleNamespace() for p in installed})
    choice = kernels.select("fp8_linear", "cuda", fp8=True)
    if want is None:
        assert not choice.fused and choice.fn is fp8_linear
        if env == "emulation":
            assert choice.reason == "PLAIT_FP8_BACKEND=emulation"
    else:
        assert choice.fused and choice.fn.backend == want and choice.kernel.startswith(want)
        if want == "transformer-engine" and env is None:
            assert choice.reason.startswith("torchao is not installed")


def _double(package: str):
    """The adapter a backend would build (here the emulation, tagged with the backend's name)."""
    def linear(x, weight, bias=None):
        return fp8_linear(x, weight, bias)
    linear.backend = package
    return linear


def test_a_backend_that_fails_to_build_falls_through_with_its_reason(monkeypatch):
    """TE raises RuntimeError without CUDA, and an adapter can fail its on-device self-check: the
    next backend (or the emulation) runs and the reason says why."""
    monkeypatch.delenv(fp8_backends.ENV, raising=False)

    def broken(module):
        raise RuntimeError("self-check: output 0.5 away from plait's fp8 emulation")
    fused = kernels.RULES["fp8_linear"].fused
    rule = kernels.Rule((kernels.Fused(fused[0].package, fused[0].name, broken),
                         kernels.Fused(fused[1].package, fused[1].name, lambda m: _double("te"))), *_tail())
    monkeypatch.setitem(kernels.RULES, "fp8_linear", rule)
    _fake_cuda(monkeypatch, torchao=types.SimpleNamespace(), transformer_engine=types.SimpleNamespace())
    choice = kernels.select("fp8_linear", "cuda", fp8=True)
    assert choice.fused and choice.fn.backend == "te"
    assert "torchao: self-check: output 0.5" in choice.reason


def test_an_unknown_fp8_backend_is_an_error_that_lists_the_choices(monkeypatch):
    monkeypatch.setenv(fp8_backends.ENV, "cutlass")
    with pytest.raises(ValueError, match="auto, torchao, transformer-engine, emulation"):
        kernels.select("fp8_linear", "cuda", fp8=True)


def test_a_broken_package_falls_back_with_its_error(monkeypatch):
    def broken(name):
        raise OSError("libcudart.so.12: cannot open shared object file")
    monkeypatch.setattr(kernels.importlib, "import_module", broken)
    module, why = kernels.probe("flash-attn")
    assert module is None and "OSError" in why and "libcudart" in why


def test_each_choice_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="plait.kernels"):
        for _ in range(3):
            kernels.select("attention")
            kernels.select("ssd_scan")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["kernel attention", "kernel ssd_scan"]


def test_bind_retargets_reference_nodes_only_for_fused_choices(monkeypatch):
    class Tiny(torch.nn.Module):
        def forward(self, q):
            return causal_attention(q, q, q, 0.5)
    gm = torch.fx.symbolic_trace(Tiny())
    before = gm.code
    assert list(kernels.bind(gm, "cpu").values()) == ["torch SDPA (bottom-right causal)"]
    assert gm.code == before  # fallback: the graph stays as lowered
    flash = types.SimpleNamespace(flash_attn_func=lambda q, k, v, softmax_scale, causal: q * 0)
    _fake_cuda(monkeypatch, flash_attn=flash)
    kernels.reset()
    swapped = kernels.bind(gm, "cuda")
    assert list(swapped.values()) == ["flash-attn flash_attn_func"]
    assert torch.equal(gm(torch.ones(1, 2, 1, 4)), torch.zeros(1, 2, 1, 4))


def _cp_program():
    """tiny-dense lowered for CP rank 0 of a cp = 2 ring layout (every attention is a ring node)."""
    spec = load_model(MODELS / "tiny-dense.plait")
    plan = Case("cp2", Layout(cp=2)).plan(spec, global_batch=2, seq=32)
    return lower(build_model(spec, dtype=torch.bfloat16, seed=0), spec, plan, 0), spec


@pytest.mark.parametrize("flash", [True, False])
def test_ring_attention_binds_the_flash_ring_exactly_when_doctor_reports_it(monkeypatch, flash):
    """CUDA 'available' (stub), torch's flash backend present or not: every ring-attention node
    of a compiled CP program calls what `plait doctor` reports for ring_attention."""
    _fake_cuda(monkeypatch, torch_flash=types.SimpleNamespace(is_flash_attention_available=lambda: flash))
    program, spec = _cp_program()
    bound = kernels.bind(program.pipe, "cuda")
    choice = {c.op: c for c in kernels.report("cuda")}["ring_attention"]
    assert choice.fused is flash
    rings = {n: fn for n, (op, fn) in kernels.bound_ops(program.pipe).items() if op == "ring_attention"}
    assert len(rings) == spec.layers.count("attention")
    for name, fn in rings.items():
        assert bound[name] == choice.kernel
        assert fn is (choice.fn if flash else cp_attention.ring_attention)
    if flash:
        assert choice.fn.pair_kernel == "sdpa-flash"
    else:
        assert "no flash attention backend" in choice.reason


def test_the_bound_flash_ring_keeps_fp32_rings_on_the_math_pairs():
    """SDPA's flash kernel has no fp32: the bound ring runs fp32 activations through the math pairs
    (here on one rank, so no process group), equal to causal attention."""
    ring = cp_attention.ring_attention_with("sdpa-flash")
    q, k, v = _qkv(8, 8)
    torch.testing.assert_close(ring(q, k, v, 0.4, "cp", 1, 0), causal_attention(q, k, v, 0.4))


def test_plait_doctor_prints_the_kernel_per_op(capsys):
    assert main(["doctor", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for op in kernels.OPS:
        assert op in out
    assert "torch SDPA" in out and "need CUDA" in out


def test_plait_doctor_says_which_fp8_backend_and_why(capsys, monkeypatch):
    monkeypatch.setenv(fp8_backends.ENV, "auto")  # restored after the test; doctor overrides it
    assert main(["doctor", "--device", "cuda", "--fp8", "--fp8-backend", "emulation"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "fp8 backend: plait fp8 emulation" in out and "(PLAIT_FP8_BACKEND=emulation: " in out
