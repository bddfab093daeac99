"""Errors meant for people. The CLI prints them (never a traceback) and exits with status 2."""
from __future__ import annotations

from typing import Optional


class PlaitError(Exception):
    """Base of every error a user can cause with bad input."""

    def __init__(self, message: str, hint: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def format(self) -> str:
        return self.message + (f"\n  hint: {self.hint}" if self.hint else "")


class SpecError(PlaitError):
    """An error in a spec file, located at file:line:col with the source line and a caret."""

    def __init__(self, message: str, file: Optional[str] = None, line: Optional[int] = None,
                 col: Optional[int] = None, source_line: Optional[str] = None,
                 hint: Optional[str] = None):
        super().__init__(message, hint)
        self.file, self.line, self.col, self.source_line = file, line, col, source_line

    def format(self) -> str:
        where = ":".join(str(p) for p in (self.file or "<spec>", self.line, self.col) if p is not None)
        out = f"{where}: error: {self.message}"
        if self.source_line is not None and self.col is not None:
            out += f"\n  {self.source_line.rstrip()}\n  {' ' * (self.col - 1)}^"
        if self.hint:
            out += f"\n  hint: {self.hint}"
        return out

    def __str__(self) -> str:
        return self.format()


class LayoutError(PlaitError):
    """A parallel layout or plan that cannot work, with the arithmetic that shows why."""
