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
    monkeypatch.setattr(calibrate_attention.kernels, "select", lambda op, device: chosen)
    fwd, bwd = calibrate_attention.attention_rates(32, 2, 2, 8, torch.float32, torch.device("cpu"))
    assert fwd > 0 and bwd > 0
    assert seen and all(s == (2, 32, 2, 8) for s in seen)  # [batch, seq, heads, head_dim]
