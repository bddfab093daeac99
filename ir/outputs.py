"""Directories plait writes (prune runs, datasets, run directories) carry a marker file written when
plait creates them. plait writes into a directory only when it is new, empty or marked as the same
kind of output, and deletes one (`--fresh`) only when it is marked: a path from a spec or a flag
can never make plait overwrite or remove what a user put there.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from plait.ir.errors import PlaitError

MARKER = ".plait-output"


def output_kind(path: str | Path) -> str | None:
    """The kind of plait output ``path`` is ("prune run", "dataset", ...), None if plait did not
    create it."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text())["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_output_dir(path: str | Path, kind: str, fresh: bool = False) -> Path:
    """Raise unless plait may write a ``kind`` into ``path`` (and, with ``fresh``, delete what is
    there). Touches nothing: callers check every input before any work starts."""
    root = Path(path)
    if not root.exists():
        if root.is_symlink():
            raise PlaitError(f"{root} is a dangling link; plait does not write through it")
        return root
    if not root.is_dir():
        raise PlaitError(f"{root} exists and is not a directory", hint="name a new directory")
    found = output_kind(root)
    if found is None and any(root.iterdir()):
        raise PlaitError(f"{root} is not empty and plait did not create it; refusing to write a {kind} "
                         "into it" + (" or delete it" if fresh else ""),
                         hint="name a new or empty directory")
    if found is not None and found != kind:
        raise PlaitError(f"{root} holds a plait {found}, not a {kind}", hint="name another directory")
    return root


def claim_output_dir(path: str | Path, kind: str, fresh: bool = False) -> Path:
    """``path`` ready for a ``kind`` of plait output: created (with the marker) when new, emptied
    first with ``fresh`` (only if plait created it); see check_output_dir for what is refused."""
    root = check_output_dir(path, kind, fresh)
    if fresh and output_kind(root) == kind:
        if root.is_symlink():
            raise PlaitError(f"{root} is a link; plait does not delete through links",
                             hint="pass the directory it points to")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"created_by": "plait", "kind": kind}) + "\n")
    return root
