"""Checks on the paths and numbers a command line names, run before any work starts: a wrong path
is an error naming it, not a traceback after training, and nothing a user owns is overwritten."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from plait.ir.errors import PlaitError


def at_least(value: Optional[int], minimum: int, flag: str) -> None:
    if value is not None and value < minimum:
        raise PlaitError(f"{flag} must be at least {minimum}, got {value}")


def writable_dir(path: str, flag: str) -> Path:
    """A directory that exists or can be created: not a file, not below a file, not read-only."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise PlaitError(f"{flag} {path} is a file, not a directory", hint="name a directory")
    ancestor = p
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise PlaitError(f"{flag} {path}: {ancestor} is a dangling link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PlaitError(f"{flag} {path}: {ancestor} is a file, so the directory cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PlaitError(f"{flag} {path}: {ancestor} is not writable")
    return p


def existing_dir(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise PlaitError(f"{flag} {path} does not exist")
    if not p.is_dir():
        raise PlaitError(f"{flag} {path} is not a directory")
    return p


def safetensors_source(path: str, flag: str = "--weights") -> Path:
    """A .safetensors file, or a directory holding at least one."""
    p = Path(path)
    if not p.exists():
        raise PlaitError(f"{flag} {path} does not exist")
    if p.is_dir():
        if not any(p.glob("*.safetensors")):
            raise PlaitError(f"{flag} {path} holds no *.safetensors files",
                             hint="pass a Hugging Face checkpoint directory or a .safetensors file")
        return p
    if p.suffix != ".safetensors" or not p.is_file():
        raise PlaitError(f"{flag} {path} is not a .safetensors file")
    return p


def replaceable_file(path: str, flag: str, written_by_plait: Callable[[str], bool]) -> Path:
    """An output file plait may write: new, or one it wrote before (``written_by_plait`` reads the
    existing text and says so). A directory, or a file of the user's, is refused."""
    p = Path(path)
    if p.is_dir():
        raise PlaitError(f"{flag} {path} is a directory", hint="name a file")
    if p.exists():
        try:
            ours = written_by_plait(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise PlaitError(f"{flag} {path} exists and plait did not write it; refusing to overwrite it",
                             hint="name a new file, or move that one away")
    writable_dir(str(p.parent) if str(p.parent) else ".", f"{flag} {path}: its directory")
    return p
