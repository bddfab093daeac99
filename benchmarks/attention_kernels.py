"""The attention core's calibration on Hopper (H100 / H200 / H800 specs: attn_eff, attn_knee,
attn_bwd_ratio) from published kernel micro-benchmarks, not from end-to-end rows.

Source: FlashAttention-3 (Shah et al. 2024, arXiv 2407.08608), Figures 5 and 6: H100 SXM5, bf16,
head dim 128, 16K tokens per call (batch x length), causal, FLOPs of a causal call counted as half
the square (as plait's counts do). cuDNN's fused attention is the kernel Megatron-Core runs on
Hopper (Transformer Engine's default fused attention backend there); FlashAttention-3 is shown
beside it. The fit is `plait calibrate`'s own (runtime/calibrate_attention.py fit_attention): least
squares of 1/eff against 1/s for the forward, the backward's ratio at the same knee.

    .venv/bin/python benchmarks/attention_kernels.py
"""
from __future__ import annotations

import sys

from plait.runtime.calibrate_attention import fit_attention

PEAK_H100_BF16 = 989.5e12  # specs/devices/h100-sxm5-80gb.plait
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
# TFLOP/s at LENGTHS, causal, head dim 128 (FlashAttention-3, Figures 5-6)
CUDNN_FWD = (315, 410, 484, 518, 529, 539)
CUDNN_BWD = (305, 408, 465, 499, 518, 516)
FA3_FWD = (292, 423, 521, 579, 602, 616)
FA3_BWD = (316, 424, 501, 542, 559, 561)


def points(fwd, bwd) -> list[tuple[float, float, float]]:
    return [(s, f * 1e12, b * 1e12) for s, f, b in zip(LENGTHS, fwd, bwd)]


def predicted(eff: float, knee: float, s: float) -> float:
    """TFLOP/s the fitted curve gives at length ``s`` (forward)."""
    return PEAK_H100_BF16 * eff / (1 + knee / s) / 1e12


def main() -> int:
    for name, fwd, bwd in (("cuDNN", CUDNN_FWD, CUDNN_BWD), ("FA3", FA3_FWD, FA3_BWD)):
        eff, knee, ratio = fit_attention(points(fwd, bwd), PEAK_H100_BF16)
        print(f"{name}: attn_eff {eff:.3f}  attn_knee {knee:.0f}  attn_bwd_ratio {ratio:.3f}")
        print(f"  {'seq':>6} {'fwd':>5} {'fit':>6} {'bwd':>5} {'fit':>6}")
        for s, f, b in zip(LENGTHS, fwd, bwd):
            pf = predicted(eff, knee, s)
            print(f"  {s:>6} {f:>5} {pf:>6.0f} {b:>5} {pf * ratio:>6.0f}"
                  f"   {pf / f - 1:+.1%} {pf * ratio / b - 1:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
