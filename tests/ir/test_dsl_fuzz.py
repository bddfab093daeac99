"""Fuzzing the front end: mutated spec text gives a Library or a SpecError, never another exception."""
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plait.ir.dsl import Library, parse_text
from plait.ir.errors import SpecError

SPECS = Path(__file__).resolve().parents[2] / "specs"
SOURCES = sorted((p.read_text(), str(p.parent)) for p in SPECS.rglob("*.plait"))
TOKENS = ["{", "}", "=", ",", "[", "]", "(", ")", "*", "+", '"', "#", "\n", " ", "K", "GiB", "GB/s", "us",
          "1e999", "-1", "0", "0.5", "1e30", "100000", "true", "none", "auto", "attention", "moe", "mamba",
          "mlp", "layers", "pattern", '"M*-E?"', "use", '"../models/tiny-dense.plait"', "model", "train",
          "device", "cluster", "heads", "kv_heads = 3", "experts", "top_k", "groups", "rope(theta = 1)",
          "yarn(factor = 2)", "layout { tp = 3 }", "gpus = 7", "999999 * [attention]", "\u00e9", "\t"]

mutation = st.one_of(
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 40)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.sampled_from(TOKENS)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.text(max_size=8)),
    st.tuples(st.just("replace"), st.floats(0, 1), st.sampled_from(TOKENS)),
    st.tuples(st.just("duplicate_line"), st.floats(0, 1), st.just("")),
)


def mutate(text: str, mutations) -> str:
    for kind, where, payload in mutations:
        at = int(where * len(text))
        if kind == "delete":
            text = text[:at] + text[at + payload:]
        elif kind == "insert":
            text = text[:at] + payload + text[at:]
        elif kind == "replace":
            end = text.find(" ", at + 1)
            text = text[:at] + payload + (text[end:] if end >= 0 else "")
        else:
            lines = text.splitlines(keepends=True) or [""]
            i = min(int(where * len(lines)), len(lines) - 1)
            text = "".join(lines[:i + 1] + lines[i:])
    return text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SOURCES), st.lists(mutation, min_size=1, max_size=3))
def test_mutated_specs_give_a_library_or_a_spec_error(source, mutations):
    text, base_dir = source
    try:
        lib = parse_text(mutate(text, mutations), file="fuzz.plait", base_dir=base_dir)
    except SpecError as e:
        assert e.format()  # printable, located where it can be
        return
    assert isinstance(lib, Library)
