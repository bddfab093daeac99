"""plait calibrate's attention probe (runtime/calibrate_attention.py) times the kernel the runtime
binds (runtime/kernels.py select), in the op's [batch, seq, heads, head_dim] layout."""

def test_attention_probe_times_the_kernel_the_runtime_binds(monkeypatch):
    import torch

    from plait.runtime import calibrate_attention, kernels

    real = kernels.select("attention", "cpu")
    seen = []

    def counted(q, k, v, scale, window=None):
        seen.append(q.shape)
        return real.fn(q, k, v, scale, window)

    chosen = kernels.Choice("attention", "a bound kernel", True, "test", counted)
    monkeypatch.setattr(calibrate_attention.kernels, "select", lambda op, device, fp8=False: chosen)
    fwd, bwd = calibrate_attention.attention_rates(32, 2, 2, 8, torch.float32, torch.device("cpu"))
    assert fwd > 0 and bwd > 0
    assert seen and all(s == (2, 32, 2, 8) for s in seen)  # [batch, seq, heads, head_dim]


def test_bound_is_the_reference_op_where_no_fused_kernel_is_bound():
    """kernels.bound: what a compiled graph's node runs after bind; on this CPU every reference op
    keeps its own function, and a function that is no seam is returned as it is."""
    from plait.lowering.modules import attention as ref_attention
    from plait.lowering.modules import mamba as ref_mamba
    from plait.runtime import kernels

    for ref in (ref_attention.causal_attention, ref_mamba.ssd_scan):
        fn, what = kernels.bound(ref, "cpu")
        assert fn is ref and what == kernels.select(kernels.SEAMS[ref], "cpu").kernel
    assert kernels.bound(len, "cpu") == (len, "len")
