"""Mutation fuzzing of the spec front end: 10,000 mutated copies of the spec library (deletions,
duplications, swaps, unicode, huge and non-finite numbers, deep nesting, grammar tokens) through
parse -> resolve -> fmt -> parse. Each case must give a library that formats back to itself or a
SpecError located at a line; the table counts outcomes per mutation kind. Target: 0 crashes, 0
errors without a location.

    .venv/bin/python benchmarks/fuzz_specs.py [CASES] [SEED]
"""
from __future__ import annotations

import random
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "ir"))  # the mutations the test suite draws from

from fuzz_util import KINDS, LIBRARY, check, mutate, random_mutation  # noqa: E402


def run(cases: int, seed: int):
    rng = random.Random(seed)
    counts: dict[str, Counter] = defaultdict(Counter)
    crashes: dict[str, tuple] = {}
    start = time.perf_counter()
    for _ in range(cases):
        name, text, base = rng.choice(LIBRARY)
        mutations = [random_mutation(rng) for _ in range(rng.randint(1, 4))]
        kinds = {m[0] for m in mutations}
        try:
            outcome = check(mutate(text, mutations), base)
        except Exception as e:  # a crash: anything but a Library or a SpecError
            outcome = "crash"
            where = traceback.extract_tb(e.__traceback__)[-1]
            key = f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno}"
            crashes.setdefault(key, (name, mutations, f"{type(e).__name__}: {e}"[:300]))
        for kind in kinds:
            counts[kind][outcome] += 1
        counts["all"][outcome] += 1
    return counts, crashes, time.perf_counter() - start


def main() -> int:
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    sys.setrecursionlimit(1000)  # Python's default: what a user's `plait check` runs with
    counts, crashes, seconds = run(cases, seed)
    t = Table(title=f"spec fuzzing: {cases:,} mutated library specs (seed {seed}), {seconds:.1f} s, "
                    f"{1e3 * seconds / cases:.2f} ms per case")
    for col in ("mutation", "cases", "loaded + fmt round trip", "located SpecError", "unlocated", "crashes"):
        t.add_column(col, justify="left" if col == "mutation" else "right")
    for kind in KINDS + ["all"]:
        c = counts[kind]
        t.add_row(kind, f"{sum(c.values()):,}", f"{c['ok']:,}", f"{c['error']:,}", str(c["unlocated"]),
                  str(c["crash"]))
    bad = counts["all"]["crash"] + counts["all"]["unlocated"]
    t.caption = "0 crashes, 0 errors without a location" if not bad else f"{bad} FAILURES"
    console = Console(width=200)
    console.print(t)
    for key, (name, mutations, message) in crashes.items():
        console.print(f"crash {key}: {name} {mutations!r}\n  {message}", markup=False, highlight=False)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
