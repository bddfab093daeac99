"""Typed reading of AST values: units to SI, integers, enums, booleans, and blocks of keys.

A ``Reader`` wraps one block (or the arguments of a call) and hands out typed values by key; its
``finish()`` rejects every key that was never asked for, with a did-you-mean hint. All errors are
SpecErrors that point at the offending key or value.
"""
from __future__ import annotations

import decimal
import difflib
import math
from decimal import Decimal
from typing import Any, Iterable, Optional, Sequence, Union

from plait.ir.errors import SpecError

from . import ast

# unit -> (kind, scale to SI). Decimal scales keep `2.039 TB/s` exact until the final float().
UNITS: dict[str, tuple[str, Decimal]] = {
    "B": ("bytes", Decimal(1)), "KB": ("bytes", Decimal(10) ** 3), "MB": ("bytes", Decimal(10) ** 6),
    "GB": ("bytes", Decimal(10) ** 9), "TB": ("bytes", Decimal(10) ** 12),
    "KiB": ("bytes", Decimal(2) ** 10), "MiB": ("bytes", Decimal(2) ** 20),
    "GiB": ("bytes", Decimal(2) ** 30), "TiB": ("bytes", Decimal(2) ** 40),
    "B/s": ("bandwidth", Decimal(1)), "MB/s": ("bandwidth", Decimal(10) ** 6),
    "GB/s": ("bandwidth", Decimal(10) ** 9), "TB/s": ("bandwidth", Decimal(10) ** 12),
    "Gb/s": ("bandwidth", Decimal(10) ** 9 / 8),
    "FLOP/s": ("compute", Decimal(1)), "GFLOP/s": ("compute", Decimal(10) ** 9),
    "TFLOP/s": ("compute", Decimal(10) ** 12), "PFLOP/s": ("compute", Decimal(10) ** 15),
    "ns": ("time", Decimal("1e-9")), "us": ("time", Decimal("1e-6")), "ms": ("time", Decimal("1e-3")),
    "s": ("time", Decimal(1)),
    "K": ("count", Decimal(1024)), "M": ("count", Decimal(1024) ** 2),
}
UNIT_KINDS = {
    "bytes": "a size in bytes (e.g. 80 GiB)",
    "bandwidth": "a bandwidth (e.g. 450 GB/s)",
    "compute": "a compute rate (e.g. 989.5 TFLOP/s)",
    "time": "a time (e.g. 5 us)",
    "count": "a count (e.g. 128K)",
}
MAX_INT = 10 ** 18  # beyond any real size; keeps `vocab = 1e999999` from building a huge integer
REQUIRED = object()
_WIDE = decimal.Context(prec=60, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)  # no Overflow trap in range


class Context:
    """Where values come from: the parsed file, for error locations."""

    def __init__(self, module: ast.Module):
        self.module = module

    def error(self, message: str, pos: Optional[ast.Pos], hint: Optional[str] = None) -> SpecError:
        line, col = (pos.line, pos.col) if pos else (None, None)
        source = self.module.source_line(line) if line else None
        return SpecError(message, file=self.module.file, line=line, col=col, source_line=source,
                         hint=hint)


def did_you_mean(word: str, options: Iterable[str]) -> Optional[str]:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def describe(value: ast.Value) -> str:
    if isinstance(value, ast.Quantity):
        return f"the number {value.text}"
    if isinstance(value, ast.String):
        return f'the string "{value.value}"'
    if isinstance(value, ast.Ident):
        return f"the name '{value.name}'"
    if isinstance(value, ast.Call):
        return f"{value.name}(...)"
    if isinstance(value, ast.ListValue):
        return "a list"
    return "a layer expression"


def to_int(ctx: Context, value: ast.Value, what: str, minimum: Optional[int] = 1) -> int:
    """An integer; a `K`/`M` suffix multiplies by 1024 / 1024^2 (`seq_len = 128K`)."""
    if not isinstance(value, ast.Quantity) or (value.unit and UNITS[value.unit][0] != "count"):
        raise ctx.error(f"{what} must be an integer, got {describe(value)}", _pos(value))
    exact = _scaled(value.number, UNITS[value.unit][1] if value.unit else Decimal(1))
    if exact.copy_abs() >= MAX_INT:  # copy_abs, not abs(): no rounding, so 1e999999K cannot overflow
        raise ctx.error(f"{what} = {value.text} is too large", value.pos)
    if exact != exact.to_integral_value():
        raise ctx.error(f"{what} must be an integer, got {value.text}", value.pos)
    number = int(exact)
    if minimum is not None and number < minimum:
        raise ctx.error(f"{what} must be at least {minimum}, got {number}", value.pos)
    return number


def to_float(ctx: Context, value: ast.Value, what: str, minimum: Optional[float] = None,
             positive: bool = False) -> float:
    if not isinstance(value, ast.Quantity) or value.unit is not None:
        raise ctx.error(f"{what} must be a plain number, got {describe(value)}", _pos(value))
    return _checked_float(ctx, value, value.number, what, minimum, positive)


def to_quantity(ctx: Context, value: ast.Value, kind: str, what: str) -> float:
    """A positive number with a unit of ``kind``, converted to SI base units."""
    expect = UNIT_KINDS[kind]
    if not isinstance(value, ast.Quantity):
        raise ctx.error(f"{what} must be {expect}, got {describe(value)}", _pos(value))
    if value.unit is None:
        raise ctx.error(f"{what} needs a unit: {expect}", value.pos,
                        hint=f"units for {kind}: " + ", ".join(u for u, (k, _) in UNITS.items() if k == kind))
    unit_kind, scale = UNITS[value.unit]
    if unit_kind != kind:
        raise ctx.error(f"{what} must be {expect}, got {value.unit} ({unit_kind})", value.pos)
    return _checked_float(ctx, value, _scaled(value.number, scale), what, None, positive=True)


def _scaled(number: Decimal, scale: Decimal) -> Decimal:
    """``number * scale`` exactly enough, with no decimal.Overflow for `1e999999 GiB`: the range
    checks after it turn a huge value into a located error."""
    with decimal.localcontext(_WIDE):
        return number * scale


def _checked_float(ctx, value, exact: Decimal, what, minimum, positive) -> float:
    number = float(exact)
    if not math.isfinite(number):
        raise ctx.error(f"{what} = {value.text} is out of range", value.pos)
    if positive and number <= 0:
        raise ctx.error(f"{what} must be positive, got {value.text}", value.pos)
    if minimum is not None and number < minimum:
        raise ctx.error(f"{what} must be at least {minimum:g}, got {value.text}", value.pos)
    return number


def to_bool(ctx: Context, value: ast.Value, what: str) -> bool:
    if isinstance(value, ast.Ident) and value.name in ("true", "false"):
        return value.name == "true"
    raise ctx.error(f"{what} must be true or false, got {describe(value)}", _pos(value))


def to_choice(ctx: Context, value: ast.Value, choices: Sequence[str], what: str) -> str:
    if isinstance(value, ast.Ident) and value.name in choices:
        return value.name
    if isinstance(value, ast.String) and value.value in choices:
        hint = f"write {what} = {value.value} (a name, without quotes)"
    else:
        got = value.name if isinstance(value, (ast.Ident, ast.Call)) else None
        hint = did_you_mean(got, choices) if got else None
    raise ctx.error(f"{what} must be one of {', '.join(choices)}; got {describe(value)}", _pos(value), hint=hint)


def to_string(ctx: Context, value: ast.Value, what: str) -> str:
    if isinstance(value, ast.String):
        return value.value
    hint = f'write {what} = "{value.name}"' if isinstance(value, ast.Ident) else None
    raise ctx.error(f"{what} must be a string, got {describe(value)}", _pos(value), hint=hint)


def _pos(value: ast.Value) -> ast.Pos:
    return value.pos


Entry = Union[ast.Assign, ast.SubBlock]


class Reader:
    """Typed access to the keys of one block or call, rejecting duplicates and unknown keys."""

    def __init__(self, ctx: Context, entries: Sequence[Entry], where: str, pos: ast.Pos):
        self.ctx, self.where, self.pos = ctx, where, pos
        self.entries: dict[str, Entry] = {}
        self.known: list[str] = []
        for entry in entries:
            first = self.entries.get(entry.key)
            if first is not None:
                raise ctx.error(f"duplicate key '{entry.key}' in {where}", entry.pos,
                                hint=f"'{entry.key}' is already set on line {first.pos.line}")
            self.entries[entry.key] = entry

    @classmethod
    def of_call(cls, ctx: Context, call: ast.Call) -> "Reader":
        return cls(ctx, call.args, f"{call.name}(...)", call.pos)

    def has(self, key: str) -> bool:
        self._know(key)
        return key in self.entries

    def raw(self, key: str, default: Any = REQUIRED, example: str = "...") -> Any:
        """The AST value of ``key`` (an ast.Value, or ast.Block for ``key { ... }``)."""
        self._know(key)
        entry = self.entries.get(key)
        if entry is None:
            if default is REQUIRED:
                self._typo_of(key)
                raise self.ctx.error(f"{self.where} is missing '{key}'", self.pos,
                                     hint=f"add {key} = {example}")
            return default
        if isinstance(entry, ast.SubBlock):
            return entry.block
        return entry.value

    def value(self, key: str, default: Any = REQUIRED, example: str = "...") -> Any:
        value = self.raw(key, default, example)
        if isinstance(value, ast.Block):
            raise self.ctx.error(f"'{key}' takes a value: write {key} = {example}", self.entries[key].pos)
        return value

    def block(self, key: str) -> Optional["Reader"]:
        self._know(key)
        entry = self.entries.get(key)
        if entry is None:
            return None
        if not isinstance(entry, ast.SubBlock):
            raise self.ctx.error(f"'{key}' is a block: write {key} {{ ... }}", entry.pos)
        return Reader(self.ctx, entry.block.entries, f"{key} block", entry.pos)

    def int(self, key, default=REQUIRED, minimum: Optional[int] = 1) -> Any:
        value = self.value(key, default, "<integer>")
        return value if value is default else to_int(self.ctx, value, key, minimum)

    def float(self, key, default=REQUIRED, minimum=None, positive=False) -> Any:
        value = self.value(key, default, "<number>")
        return value if value is default else to_float(self.ctx, value, key, minimum, positive)

    def quantity(self, key, kind: str, default=REQUIRED) -> Any:
        value = self.value(key, default, UNIT_KINDS[kind].split("e.g. ")[-1].rstrip(")"))
        return value if value is default else to_quantity(self.ctx, value, kind, key)

    def bool(self, key, default=REQUIRED) -> Any:
        value = self.value(key, default, "true")
        return value if value is default else to_bool(self.ctx, value, key)

    def choice(self, key, choices: Sequence[str], default=REQUIRED) -> Any:
        value = self.value(key, default, choices[0])
        return value if value is default else to_choice(self.ctx, value, choices, key)

    def string(self, key, default=REQUIRED) -> Any:
        value = self.value(key, default, '"..."')
        return value if value is default else to_string(self.ctx, value, key)

    def finish(self) -> None:
        """Reject keys nobody asked for (typos, keys of another block)."""
        for key, entry in self.entries.items():
            if key not in self.known:
                hint = did_you_mean(key, self.known) or f"known keys: {', '.join(self.known)}"
                raise self.ctx.error(f"unknown key '{key}' in {self.where}", entry.pos, hint=hint)

    def _typo_of(self, key: str) -> None:
        """A missing required key is most often a misspelt one: report the misspelling."""
        for other, entry in self.entries.items():
            if other not in self.known and did_you_mean(other, [key]):
                raise self.ctx.error(f"unknown key '{other}' in {self.where}", entry.pos,
                                     hint=f"did you mean '{key}'?")

    def _know(self, key: str) -> None:
        if key not in self.known:
            self.known.append(key)
