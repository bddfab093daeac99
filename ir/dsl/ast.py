"""The syntax tree of a spec file, exactly as written: no units applied, no names resolved.

parse.py builds it; resolve.py turns it into the IR. Every node carries the position of its first
character so that resolution errors can point at it.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Optional, Union


@dataclass(frozen=True)
class Pos:
    line: int
    col: int


@dataclass(frozen=True)
class Quantity:
    """A number with an optional unit: ``80 GiB``, ``128K``, ``1e-5``. ``number`` is exact."""

    text: str
    number: Decimal
    unit: Optional[str]
    pos: Pos


@dataclass(frozen=True)
class String:
    value: str
    pos: Pos


@dataclass(frozen=True)
class Ident:
    """A bare name: an enum value, a block kind in a layer list, true/false/auto/none."""

    name: str
    pos: Pos


@dataclass(frozen=True)
class Call:
    """``rope(theta = 1e6)``: a name with keyword arguments."""

    name: str
    args: tuple["Assign", ...]
    pos: Pos


@dataclass(frozen=True)
class ListValue:
    items: tuple["Value", ...]
    pos: Pos


@dataclass(frozen=True)
class Repeat:
    """``count * body`` (either operand may be the count; resolve.py decides)."""

    left: "Value"
    right: "Value"
    pos: Pos


@dataclass(frozen=True)
class Concat:
    parts: tuple["Value", ...]
    pos: Pos


Value = Union[Quantity, String, Ident, Call, ListValue, Repeat, Concat]


@dataclass(frozen=True)
class Assign:
    key: str
    value: Value
    pos: Pos  # of the key
    end_line: int = 0  # the last line of the value (fmt.py places comments by lines)


@dataclass(frozen=True)
class Block:
    """``{ ... }``: assignments and nested blocks, in source order."""

    entries: tuple[Union[Assign, "SubBlock"], ...]
    pos: Pos  # of the opening brace
    end_line: int = 0  # of the closing brace


@dataclass(frozen=True)
class SubBlock:
    key: str
    block: Block
    pos: Pos  # of the key

    @property
    def end_line(self) -> int:
        return self.block.end_line


@dataclass(frozen=True)
class Decl:
    """``model "name" { ... }``; ``kind`` is checked by resolve.py."""

    kind: str
    name: str
    block: Block
    pos: Pos  # of the kind keyword
    name_pos: Pos


@dataclass(frozen=True)
class Use:
    paths: tuple[String, ...]
    pos: Pos


@dataclass(frozen=True)
class Module:
    """One parsed file."""

    file: str
    text: str
    uses: tuple[Use, ...]
    decls: tuple[Decl, ...]
    comments: tuple[tuple[Pos, str], ...] = ()  # `# ...` comments, in source order (for fmt)

    def source_line(self, line: int) -> Optional[str]:
        lines = self.text.split("\n")  # as the lexer counts lines (not \u2028, \x0c, ...)
        return lines[line - 1] if 0 < line <= len(lines) else None
