"""fp8: the emulated tensorwise GEMM (lowering/fp8.py) against torchao's Float8Linear on CPU and
against its own definition; the fp8_linears pass applies the BF16-ends rule to a compiled program
(and leaves fp32 / bf16 programs untouched); the kernel bound for each fp8 node is the one
`plait doctor` reports."""
import pytest
import torch
import torch.nn.functional as F

from plait.ir.job import Precision
from plait.ir.plan import Layout
from plait.ir.precision import PrecisionPolicy
from plait.lowering import fp8
from plait.lowering.build import build_model
from plait.lowering.compile import lower
from plait.lowering.trace import info
from plait.runtime import fp8_backends, kernels

from passes_util import SPEC, plan

torch.set_num_threads(1)
BF16_ULP = 2.0 ** -7  # relative spacing of bf16 numbers in [1, 2)


def _operands(seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, 64, generator=gen).to(torch.bfloat16)
    w = (torch.randn(96, 64, generator=gen) * 0.05).to(torch.bfloat16)
    b = torch.randn(96, generator=gen).to(torch.bfloat16) if bias else None
    return x, w, b


def _run(fn, x, w, b=None, seed=1):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(x, w, b)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(grad)
    return out.detach(), x.grad, w.grad


def test_quantise_is_a_saturating_per_tensor_cast():
    t = torch.tensor([0.5, -2.0, 1e-3, 3.0])
    q, scale = fp8.quantise(t, fp8.E4M3)
    assert q.dtype == torch.float8_e4m3fn and scale == pytest.approx(448 / 3.0)
    assert q.float().abs().max() == 448  # the amax maps onto the format's largest number
    assert torch.allclose(q.float() / scale, t, rtol=2 ** -3)  # 3 mantissa bits
    zero, s0 = fp8.quantise(torch.zeros(3), fp8.E5M2)
    assert torch.isfinite(s0) and not zero.float().any()


def test_emulation_is_close_to_bf16_but_not_equal():
    """The GEMMs really run on fp8 operands: off the bf16 result by fp8 rounding, not more."""
    x, w, _ = _operands()
    out, gx, gw = _run(fp8.fp8_linear, x, w)
    ref, rgx, rgw = _run(lambda a, b, c: F.linear(a, b), x.float(), w.float())
    for got, want in ((out, ref), (gx, rgx), (gw, rgw)):
        rel = (got.float() - want).norm() / want.norm()
        assert 1e-3 < rel < 0.06  # E4M3: 2^-4 relative step; E5M2 gradients 2^-3


def _torchao_float8_linear():
    """torchao's own Float8Linear GEMM (matmul_with_hp_or_float8_args, default config) as a
    function of (x, weight, bias)."""
    module = pytest.importorskip("torchao.float8.float8_linear")
    config = module.Float8LinearConfig()
    mm_config = module.Float8Linear(1, 1, bias=False, config=config, device="meta").linear_mm_config

    def linear(x, weight, bias=None):
        out = module.matmul_with_hp_or_float8_args.apply(x, weight.t(), mm_config, config)
        return out if bias is None else out + bias.to(out.dtype)
    return linear


def test_emulation_equals_torchao_float8_linear_on_cpu():
    """Same scales, same casts: outputs and both gradients agree with torchao's Float8Linear GEMM
    (tensorwise, dynamic) to one bf16 rounding step on a handful of elements (fp32 sums in another
    order), exactly everywhere else."""
    x, w, b = _operands(bias=True)
    for got, want in zip(_run(fp8.fp8_linear, x, w, b), _run(_torchao_float8_linear(), x, w, b)):
        assert got.dtype == want.dtype == torch.bfloat16
        diff = (got.float() - want.float()).abs()
        assert (diff > 0).float().mean() < 1e-3
        assert (diff <= BF16_ULP * want.float().abs() + 1e-6).all()


def test_bound_torchao_backend_is_torchao_float8_linear():
    """What kernels.bind binds on CUDA (torchao's cast and GEMM under plait's fp8 autograd, so TP
    shards can take whole-tensor scales) computes torchao Float8Linear's numbers bit for bit."""
    torchao_linear = fp8_backends.torchao_linear(pytest.importorskip("torchao.float8"))
    x, w, b = _operands(bias=True)
    for got, want in zip(_run(torchao_linear, x, w, b), _run(_torchao_float8_linear(), x, w, b)):
        assert torch.equal(got, want)


def _fp8_program(ends: int, layout=Layout(tp=2, etp=2), rank=0):
    policy = PrecisionPolicy.from_precision(Precision("fp8", "tensorwise", ends, ends), SPEC.num_layers)
    model = build_model(SPEC, dtype=torch.bfloat16, seed=0)
    return lower(model, SPEC, plan(layout), rank, precision=policy), policy


def _fp8_nodes(gm):
    return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function" and n.target is fp8.fp8_linear]


@pytest.mark.parametrize("ends", [1, 2])
def test_fp8_linears_follow_the_bf16_ends_rule(ends):
    program, policy = _fp8_program(ends)
    layers = {info(n).layer for n in _fp8_nodes(program.pipe)}
    assert layers == set(policy.fp8_layers) == set(range(ends, SPEC.num_layers - ends))
    # every linear of an fp8 layer: q, k, v, o (attention) / gate, up, down (SwiGLU mlp)
    per_layer = {l: sum(info(n).layer == l for n in _fp8_nodes(program.pipe)) for l in layers}
    assert all(per_layer[l] == (4 if SPEC.layers[l] == "attention" else 3) for l in layers)


def test_tp_sharded_fp8_linears_take_whole_tensor_scales():
    """Under TP every fp8 linear names the TP axis and its role (column: q/k/v, gate/up; row: o,
    down), so its scales are the whole tensors' (tests/lowering/test_fp8_tp.py runs it); without TP
    none does."""
    program, _ = _fp8_program(1, Layout(tp=2, etp=2, sp=True))
    roles = set()
    for node in _fp8_nodes(program.pipe):
        axis, size, role = node.args[3:]
        assert (axis, size) == ("tp", 2)
        want = "row" if any(k in str(node.args[1]) for k in ("o_proj", "down_proj")) else "column"
        assert role == want, (node.name, node.args[1], role)
        roles.add(role)
    assert roles == {"column", "row"}
    single, _ = _fp8_program(1, Layout())
    assert all(len(n.args) == 3 for n in _fp8_nodes(single.pipe))


def test_fp32_and_bf16_programs_have_no_fp8_gemm():
    for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        policy = PrecisionPolicy(kind, SPEC.num_layers)
        program = lower(build_model(SPEC, dtype=dtype), SPEC, plan(Layout()), 0, precision=policy)
        assert not _fp8_nodes(program.pipe)


def _bound_as_reported(device: str) -> dict:
    """Bind a compiled fp8 program for ``device``; every attention / fp8 linear node must call the
    function `plait doctor`'s report names for its op. Returns the report by op."""
    kernels.reset()
    program, _ = _fp8_program(1)
    bound = kernels.bind(program.pipe, device, fp8=True)
    report = {c.op: c for c in kernels.report(device, fp8=True)}
    ops = kernels.bound_ops(program.pipe)
    assert {op for op, _ in ops.values()} == {"attention", "fp8_linear"}
    for name, (op, fn) in ops.items():
        assert bound[name] == report[op].kernel
        # a fused kernel replaces the node's target; a fallback leaves the reference op in place
        assert fn is (report[op].fn if report[op].fused else kernels.SEAM_OPS[op])
    kernels.reset()
    return report


def test_bound_kernels_are_the_reported_ones_on_cpu():
    report = _bound_as_reported("cpu")
    assert not any(c.fused for c in report.values())
    assert report["fp8_linear"].fn is fp8.fp8_linear


def test_bound_kernels_are_the_reported_ones_with_a_stubbed_cuda_registry(monkeypatch):
    """The GPU path: CUDA 'available', flash-attn 'installed' (a stub; torchao is the real one, its
    adapter built as on CUDA); every attention
    and fp8 linear node of the compiled program calls exactly the function doctor reports."""
    import types

    flash = types.SimpleNamespace(flash_attn_func=lambda q, k, v, softmax_scale, causal: q,
                                  flash_attn_varlen_func=lambda *a, **k: a[0])

    table = {"flash-attn": flash, "torchao": pytest.importorskip("torchao.float8")}
    monkeypatch.setattr(kernels, "cuda_ready", lambda device: (True, ""))
    monkeypatch.setattr(kernels, "probe", lambda package: (table[package], "") if package in table
                        else (None, f"{package} is not installed"))
    report = _bound_as_reported("cuda")
    assert report["attention"].fused and report["fp8_linear"].fused
