"""Published measurements the cost model and counts are checked against.

The project's shared folder (``../shared/reference`` beside the checkout) is the living source;
``specs/reference`` keeps a copy so a clone alone can run the tests and benchmarks.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = (ROOT.parent / "shared" / "reference", ROOT / "specs" / "reference")


def reference_dir() -> Path:
    for cand in CANDIDATES:
        if (cand / "published_params.csv").exists():
            return cand
    raise FileNotFoundError(f"no reference tables in {' or '.join(map(str, CANDIDATES))}")


def reference_file(name: str) -> Path:
    """The named table (e.g. "moe_folding_table3.csv"), from the first folder that has it."""
    for cand in CANDIDATES:
        if (cand / name).exists():
            return cand / name
    raise FileNotFoundError(f"no reference table {name} in {' or '.join(map(str, CANDIDATES))}")
