"""Where the comments of a spec file belong, so `plait fmt` keeps them.

Each comment is attached to a *path*: ``()`` for the file, ``(keyword, name)`` for a declaration,
``(keyword, name, key, subkey, ...)`` for an entry. A comment on the line where an entry starts
trails that entry; a comment on a line of its own leads the next entry of its block, or closes the
block when no entry follows. fmt.py writes each where its path is written, and a comment whose
entry the canonical form drops (a default value) at the end of the enclosing block: comments move,
they are never lost.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from . import ast

Path = tuple[str, ...]
USE: Path = ("use",)  # comments before the `use` line


@dataclass
class Notes:
    leading: list[str] = field(default_factory=list)  # lines before the entry
    trailing: list[str] = field(default_factory=list)  # after the entry (after `}` for a block)
    opening: list[str] = field(default_factory=list)  # after `{`
    closing: list[str] = field(default_factory=list)  # lines before `}`

    def all(self) -> list[str]:
        return self.leading + self.opening + self.closing + self.trailing


def attach(module: ast.Module) -> dict[Path, Notes]:
    """Every comment of ``module`` keyed by the path it belongs to."""
    notes: dict[Path, Notes] = {}
    decls = [((d.kind, d.name), d) for d in module.decls]
    first_use = min((u.pos.line for u in module.uses), default=None)
    for pos, text in module.comments:
        line = pos.line
        inside = next(((p, d) for p, d in decls if d.pos.line <= line <= d.block.end_line), None)
        if inside is not None:
            path, decl = inside
            _in_block(notes, path, decl.block, line, text, header_line=decl.pos.line)
        elif first_use is not None and line < first_use:
            _note(notes, USE).leading.append(text)
        else:
            after = next((p for p, d in decls if d.pos.line > line), None)
            if after is None:
                _note(notes, ()).closing.append(text)
            else:
                _note(notes, after).leading.append(text)
    return notes


Entry = Union[ast.Assign, ast.SubBlock]


def _in_block(notes, path: Path, block: ast.Block, line: int, text: str, header_line: int) -> None:
    """Place a comment on ``line`` inside ``block`` (whose `{` is on ``header_line``)."""
    if line == block.end_line:  # on the `}` line: after the block
        _note(notes, path).trailing.append(text)
        return
    starting = [e for e in block.entries if e.pos.line == line]
    spanning = next((e for e in block.entries if e.pos.line < line <= e.end_line), None)
    if starting and isinstance(starting[-1], ast.SubBlock) and starting[-1].end_line > line:
        entry = starting[-1]  # `key {  # ...` with entries below
        _in_block(notes, path + (entry.key,), entry.block, line, text, header_line=line)
    elif starting:
        _note(notes, path + (starting[-1].key,)).trailing.append(text)
    elif isinstance(spanning, ast.SubBlock):
        _in_block(notes, path + (spanning.key,), spanning.block, line, text, spanning.pos.line)
    elif line == header_line:
        _note(notes, path).opening.append(text)
    else:
        following = next((e for e in block.entries if e.pos.line > line), None)
        if following is None:
            _note(notes, path).closing.append(text)
        else:
            _note(notes, path + (following.key,)).leading.append(text)


def _note(notes: dict[Path, Notes], path: Path) -> Notes:
    return notes.setdefault(path, Notes())
