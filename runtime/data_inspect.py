"""`plait data inspect DATASET`: what a dataset holds (tokens, documents, length statistics)."""
from __future__ import annotations

import numpy as np
from rich.table import Table

from .data import MemmapTokens


def inspect_table(path: str) -> Table:
    source = MemmapTokens(path)
    table = Table(title=f"dataset {path}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    meta = source.meta
    kind = "Megatron indexed (.bin/.idx)" if source.indexed is not None else "plait flat tokens.bin"
    table.add_row("format", kind)
    table.add_row("tokenizer", f"{meta.get('tokenizer', 'unknown')} (vocab {meta.get('vocab', '?')})")
    table.add_row("dtype", str(source.tokens.dtype))
    table.add_row("tokens", f"{len(source.tokens):,}")
    if source.indexed is None:
        table.add_row("documents", "not recorded (older format: re-run `plait data prepare`)")
        return table
    lengths = source.indexed.document_lengths()
    table.add_row("documents", f"{len(lengths):,}")
    if len(lengths):
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
        table.add_row("document length min / mean / max",
                      f"{int(lengths.min()):,} / {lengths.mean():,.1f} / {int(lengths.max()):,}")
        table.add_row("document length p50 / p90 / p99", f"{p50:,.0f} / {p90:,.0f} / {p99:,.0f}")
    if source.mask_tokens is not None:  # an SFT dataset (`prepare --chat`)
        counted = int(np.count_nonzero(source.mask_tokens))
        table.add_row("loss mask (objective = sft)", f"{counted:,} tokens counted "
                      f"({counted / max(1, len(source.mask_tokens)):.1%})")
    return table
