"""Numbers in explanations, written so they say something: compared times get the digits that tell
them apart ("4.051 s vs 4.059 s", not "4.05 s vs 4.05 s"), small rates get a smaller unit
("38.2 GFLOP/s", not "0 TFLOP/s"), and a device is called a GPU only when it is one."""
from __future__ import annotations

import math

_RATE_UNITS = ((1e15, "PFLOP/s"), (1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1e6, "MFLOP/s"), (1e3, "KFLOP/s"))
MAX_DIGITS = 6  # beyond this two times are the same for any purpose


def significant(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits, no exponent for everyday magnitudes."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def seconds(x: float) -> str:
    """A time in seconds to two decimals, or three significant digits below 0.1 s."""
    return f"{x:.2f}" if abs(x) >= 0.1 or x == 0 else significant(x)


def seconds_pair(a: float, b: float) -> tuple[str, str]:
    """Texts of two times with the fewest decimals that show they differ (when they do)."""
    for digits in range(3, MAX_DIGITS + 1):
        ta, tb = significant(a, digits), significant(b, digits)
        if ta != tb:
            return ta, tb
    return significant(a, 3), significant(b, 3)


def percent(x: float) -> str:
    """A signed percentage: one decimal, or one significant digit when that would show 0.0."""
    if x != 0 and abs(x) < 0.05:
        return f"{x:+.1g}%"
    return f"{x:+.1f}%"


def flops_rate(flops_per_s: float) -> str:
    """`412 TFLOP/s`, `1.23 TFLOP/s`, `38.2 GFLOP/s`."""
    for scale, unit in _RATE_UNITS:
        if abs(flops_per_s) >= scale:
            return f"{significant(flops_per_s / scale)} {unit}"
    return f"{significant(flops_per_s)} FLOP/s"


def device_word(backend: str) -> str:
    """What one rank runs on: a GPU under NCCL, a device otherwise (gloo on CPU)."""
    return "GPU" if backend == "nccl" else "device"
