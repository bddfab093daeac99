"""Mutations of spec text for fuzzing the front end (test_dsl_fuzz.py draws them with hypothesis,
benchmarks/fuzz_specs.py with a seeded random generator).

A mutation is a plain tuple ``(kind, where, payload)``: ``where`` is a fraction in [0, 1) that picks
a character, token or line of the current text, so any tuple applies to any text. Kinds: deletions,
duplications and swaps (of characters, tokens, lines), unicode, huge and non-finite numbers, deep
nesting, tokens of the grammar, truncation.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from plait.ir.dsl import Library, parse_text
from plait.ir.dsl.fmt import format_file
from plait.ir.errors import PlaitError, SpecError

SPECS = Path(__file__).resolve().parents[2] / "specs"
LIBRARY = sorted((str(p.relative_to(SPECS)), p.read_text(), str(p.parent)) for p in SPECS.rglob("*.plait"))

TOKEN = re.compile(r'"[^"\n]*"|#[^\n]*|[0-9.]+(?:[eE][+-]?[0-9]+)?|[A-Za-z_][A-Za-z0-9_]*|\s+|.', re.S)
UNICODE = ["\u0663", "\uff11\uff10", "\u00b2", "\u216b", "\U0001d7d9", "\u0000", "\u202e", "\ufeff", "\u00a0",
           "\u2028", "\u0085", "\r", "\x0b", "\x0c", "\udc80", "\u0301", "\u00e9", "\U0001f642", "\u200b",
           "\u0130", "\u017f", "\u212a", "ﬁ"]
NUMBERS = ["1e999999", "-1e999999", "1e-999999", "99999999999999999999999999", "9223372036854775808",
           "inf", "-inf", "nan", "NaN", "Infinity", "0x10", "1_000", "0", "-0", "-1", "1e18", "1.", ".5",
           "1e", "+1", "--1", "0.0000001", "1e308", "2e308", "4.9e-324", "128K", "1e30 GiB", "0 GB/s",
           "-5 us", "1e999 TFLOP/s", "3.5K"]
GRAMMAR = ["{", "}", "=", ",", "[", "]", "(", ")", "*", "+", '"', "#", "\n", "use", "model", "train",
           "device", "cluster", "prune", "attention", "mlp", "moe", "mamba", "layers", "pattern", '"M*-E"',
           '"MMMM"', "true", "false", "none", "auto", "rope(theta = 1)", "yarn(factor = 2)",
           "layout { tp = 3 }", "gpus = 7", "999999 * [attention]", "[]", "0 * [mlp]", '"../nope.plait"',
           '"models/tiny-dense.plait"', "heads", "kv_heads = 3", "experts", "top_k", "groups",
           "dispatcher", "capacity_factor", "output", "weights", "data", "synthetic", "dataset()"]
NESTING = ["[", "(", "{", "+", "*", "call", "block", "-", "[mlp]", "[1]"]
DEPTHS = [2, 50, 500, 5000, 50000]
KINDS = ["delete_chars", "delete_token", "delete_line", "duplicate_token", "duplicate_line",
         "duplicate_lines", "swap_tokens", "swap_lines", "unicode", "number", "grammar", "nest",
         "nest_value", "truncate"]


def _pick(items: list, where: float) -> int:
    return min(int(where * len(items)), len(items) - 1)


def _tokens(text: str) -> list[str]:
    return TOKEN.findall(text) or [""]


def _lines(text: str) -> list[str]:
    return text.split("\n")


def nested(kind: str, depth: int) -> str:
    """``depth`` levels of one kind of nesting, in text the grammar may or may not accept."""
    return {"[": "[" * depth + "]" * depth, "(": "f(a = " * depth + "1" + ")" * depth,
            "[mlp]": "[" * depth + "mlp" + "]" * depth, "[1]": "[" * depth + "1" + "]" * depth,
            "{": "x { " * depth + "}" * depth, "+": "[mlp] + " * depth + "[mlp]",
            "*": "2 * " * depth + "[mlp]", "call": "rope(theta = " * depth + "1" + ")" * depth,
            "block": "attention { " * depth + "heads = 1" + " }" * depth, "-": "-" * depth + "1"}[kind]


def mutate(text: str, mutations) -> str:
    for kind, where, payload in mutations:
        text = _apply(text, kind, where, payload)
    return text


def _apply(text: str, kind: str, where: float, payload) -> str:
    if kind == "nest_value":  # a value replaced by a deep but well-formed one: [[[mlp]]], f(a = f(...))
        toks = _tokens(text)
        values = [k for k, t in enumerate(toks) if t[:1].isdigit() or t[:1] == "["] or [_pick(toks, where)]
        toks[values[_pick(values, where)]] = nested(*payload)
        return "".join(toks)
    if kind in ("delete_chars", "unicode", "nest", "truncate"):
        at = int(where * len(text))
        if kind == "delete_chars":
            return text[:at] + text[at + int(payload):]
        if kind == "truncate":
            return text[:at]
        insert = payload if kind == "unicode" else nested(*payload)
        return text[:at] + insert + text[at:]
    if kind.endswith("line") or kind.endswith("lines"):
        lines = _lines(text)
        i = _pick(lines, where)
        if kind == "delete_line":
            del lines[i]
        elif kind == "duplicate_line":
            lines.insert(i, lines[i])
        elif kind == "duplicate_lines":
            lines[i:i] = lines[i:i + int(payload)]
        else:  # swap_lines
            j = _pick(lines, float(payload))
            lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines)
    toks = _tokens(text)
    i = _pick(toks, where)
    if kind == "delete_token":
        del toks[i]
    elif kind == "duplicate_token":
        toks.insert(i, toks[i])
    elif kind == "swap_tokens":
        j = _pick(toks, float(payload))
        toks[i], toks[j] = toks[j], toks[i]
    elif kind == "number":
        numbers = [k for k, t in enumerate(toks) if t[:1].isdigit()] or [i]
        toks[numbers[_pick(numbers, where)]] = payload
    else:  # grammar
        toks[i] = payload
    return "".join(toks)


def random_mutation(rng: random.Random) -> tuple:
    kind = rng.choice(KINDS)
    where = rng.random()
    payload = {"delete_chars": lambda: rng.randint(1, 40), "duplicate_lines": lambda: rng.randint(2, 12),
               "swap_tokens": rng.random, "swap_lines": rng.random,
               "unicode": lambda: rng.choice(UNICODE) * rng.randint(1, 3), "number": lambda: rng.choice(NUMBERS),
               "grammar": lambda: rng.choice(GRAMMAR),
               "nest": lambda: (rng.choice(NESTING), rng.choice(DEPTHS)),
               "nest_value": lambda: (rng.choice(NESTING), rng.choice(DEPTHS))}.get(kind, lambda: None)()
    return kind, where, payload


def check(text: str, base_dir: str) -> str:
    """``ok``, ``error`` (a located SpecError) or ``unlocated`` (a SpecError without a line); any
    other exception propagates: a crash. A library that loads must format and load back equal."""
    try:
        lib = parse_text(text, file="fuzz.plait", base_dir=base_dir)
    except SpecError as e:
        e.format()
        if e.file != "fuzz.plait":  # located in a file it `use`s
            return "error" if e.line is not None else "unlocated"
        return "error" if e.line is not None and 1 <= e.line <= text.count("\n") + 1 else "unlocated"
    assert isinstance(lib, Library)
    try:
        again = parse_text(format_file(lib), file="fuzz.plait", base_dir=base_dir)
    except PlaitError as e:  # a spec fmt cannot express (a cluster resized beyond its size) says so
        assert not isinstance(e, SpecError), f"fmt wrote a spec that does not load: {e.format()}"
        return "ok"
    for attr in ("models", "devices", "clusters", "jobs", "prune_jobs"):
        assert getattr(again, attr) == getattr(lib, attr), f"fmt changed the {attr}"
    return "ok"
