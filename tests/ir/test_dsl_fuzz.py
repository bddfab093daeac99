"""Mutation fuzzing of the front end over the whole spec library: deletions, duplications, swaps,
unicode, huge and non-finite numbers, deep nesting, grammar tokens, truncation. Every mutated spec
gives a library that fmt writes back to an equal one, or a SpecError located at a line; never
another exception. (benchmarks/fuzz_specs.py runs 10,000 of these and tabulates the outcomes.)"""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_util import DEPTHS, GRAMMAR, LIBRARY, NESTING, NUMBERS, UNICODE, check, mutate

where = st.floats(0, 1, exclude_max=True)
nesting = st.tuples(st.sampled_from(NESTING), st.sampled_from(DEPTHS[:-1]))  # 50,000 deep: the benchmark
mutation = st.one_of(
    st.tuples(st.just("delete_chars"), where, st.integers(1, 40)),
    st.tuples(st.sampled_from(["delete_token", "delete_line", "duplicate_token", "duplicate_line", "truncate"]),
              where, st.none()),
    st.tuples(st.just("duplicate_lines"), where, st.integers(2, 12)),
    st.tuples(st.sampled_from(["swap_tokens", "swap_lines"]), where, where),
    st.tuples(st.just("unicode"), where, st.sampled_from(UNICODE) | st.text(min_size=1, max_size=4)),
    st.tuples(st.just("number"), where, st.sampled_from(NUMBERS)),
    st.tuples(st.just("grammar"), where, st.sampled_from(GRAMMAR)),
    st.tuples(st.sampled_from(["nest", "nest_value"]), where, nesting),
)


# derandomize: the same 300 cases on every run and machine (the suite is deterministic); new
# cases are benchmarks/fuzz_specs.py's job (10,000 per run)
@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(LIBRARY), st.lists(mutation, min_size=1, max_size=4))
def test_mutated_library_specs_load_or_fail_with_a_located_spec_error(source, mutations):
    name, text, base_dir = source
    assert check(mutate(text, mutations), base_dir) in ("ok", "error")
