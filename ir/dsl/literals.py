"""Spec-text literals for fmt.py and the block kinds' dsl facets: numbers, quantities with units,
layer lists, calls and the fields that differ from their defaults. Each writer produces text that
the parser reads back to exactly the same value."""
from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Iterable

from .reader import UNITS

# Preferred units per kind, best first; ties in length go to the earlier one.
_UNIT_ORDER = {
    "bytes": ("GiB", "TiB", "MiB", "KiB", "GB", "TB", "MB", "KB", "B"),
    "bandwidth": ("TB/s", "GB/s", "Gb/s", "MB/s", "B/s"),
    "compute": ("TFLOP/s", "PFLOP/s", "GFLOP/s", "FLOP/s"),
    "time": ("us", "ms", "s", "ns"),
}
_BASE_UNIT = {"bytes": "B", "bandwidth": "B/s", "compute": "FLOP/s", "time": "s"}


def number(x, tokens: bool = False) -> str:
    """Shortest text for an int or float; ``tokens`` writes multiples of 1024 as `128K`."""
    if isinstance(x, bool):
        raise TypeError("booleans are not numbers")
    if isinstance(x, int):
        if tokens and x >= 8192 and x % 1024 == 0:
            return f"{x // 1024}K"
        return str(x)
    return decimal_text(Decimal(repr(x)))


def decimal_text(d: Decimal) -> str:
    """`1e-5`, `0.95`, `500000`, `1e6`: plain digits unless an exponent is much shorter."""
    d = d.normalize()
    sign, digits, exp = d.as_tuple()
    mantissa = "".join(map(str, digits))
    sci_exp = exp + len(digits) - 1
    sci = ("-" if sign else "") + mantissa[0] + ("." + mantissa[1:] if len(mantissa) > 1 else "") + f"e{sci_exp}"
    plain = format(d, "f")
    if sci_exp <= -4 or (sci_exp >= 6 and len(sci) < len(plain)):
        return sci
    return plain


def quantity(value: float, kind: str) -> str:
    """``value`` (SI) in the unit of ``kind`` that writes it in the fewest digits, then characters."""
    best = None
    for rank, unit in enumerate(_UNIT_ORDER[kind]):
        scale = UNITS[unit][1]
        text = decimal_text(Decimal(repr(value)) / scale)
        if float(Decimal(text) * scale) != value:
            continue  # not exact in this unit
        scaled = Decimal(text)
        digits = len(scaled.normalize().as_tuple().digits)
        awkward = not (1 <= abs(scaled) < 10000)
        key = (awkward, digits, len(text), rank)
        if best is None or key < best[0]:
            best = (key, f"{text} {unit}")
    if best is None:  # no unit reproduces the float exactly: the base unit, full precision
        return f"{decimal_text(Decimal(repr(value)))} {_BASE_UNIT[kind]}"
    return best[1]


def layers_text(layers: tuple[str, ...]) -> str:
    """`56 * [attention, moe]`, `3 * [attention, mlp] + 58 * [attention, moe]`, or a plain list."""
    parts, singles, i = [], [], 0
    while i < len(layers):
        unit, reps = _longest_run(layers, i)
        if reps > 1:
            if singles:
                parts.append("[" + ", ".join(singles) + "]")
                singles = []
            parts.append(f"{reps} * [" + ", ".join(unit) + "]")
        else:
            singles.extend(unit)
        i += len(unit) * reps
    if singles:
        parts.append("[" + ", ".join(singles) + "]")
    return " + ".join(parts)


def _longest_run(layers: tuple[str, ...], start: int) -> tuple[tuple[str, ...], int]:
    """The repeated unit starting at ``start`` that covers the most layers (shortest unit on ties)."""
    best = (layers[start:start + 1], 1)
    for size in range(1, min(8, len(layers) - start) + 1):
        unit = layers[start:start + size]
        reps = 1
        while layers[start + reps * size:start + (reps + 1) * size] == unit:
            reps += 1
        if reps > 1 and reps * size > best[1] * len(best[0]):
            best = (unit, reps)
    return best


def changed(obj, keys: Iterable[str]) -> list[tuple[str, str]]:
    """(key, text) for the fields of ``obj`` that differ from their dataclass defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(obj)}
    return [(k, value_text(getattr(obj, k))) for k in keys if getattr(obj, k) != defaults[k]]


def value_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return number(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(value_text(x) for x in v) + "]"
    if isinstance(v, str) and v.isidentifier():
        return v
    return f'"{v}"'


def call(name: str, args: list[tuple[str, str]]) -> str:
    """`name(k = v, ...)`."""
    return f"{name}(" + ", ".join(f"{k} = {v}" for k, v in args) + ")"
