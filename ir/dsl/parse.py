"""Spec text -> AST (ast.py). The lark transformer here only builds nodes; meaning comes in resolve.py.

Every lark error becomes a SpecError with file, line, column, the source line and a hint, so a user
never sees a parser traceback.
"""
from __future__ import annotations

import re
import unicodedata
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from plait.ir.errors import SpecError

from . import ast

GRAMMAR = Path(__file__).with_name("plait.lark")
_NUMBER_AND_UNIT = re.compile(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)[ \t]*(\S*)")

# Readable names for the grammar's terminals in "expected ..." messages.
_TERMINAL_NAMES = {"NAME": "a name", "STRING": "a string", "QUANTITY": "a number", "$END": "end of file"}


_COMMENTS: list[Token] = []  # filled by the lexer during one parse() (comments are ignored tokens)


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(GRAMMAR.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True,
                lexer_callbacks={"COMMENT": _COMMENTS.append})


def _pos(node) -> ast.Pos:
    if isinstance(node, Token):
        return ast.Pos(node.line, node.column)
    return ast.Pos(node.line, node.column)  # lark Meta


class _ToAst(Transformer):
    """Builds ast nodes bottom-up; no checks beyond what the grammar already enforces."""

    def quantity(self, children):
        (tok,) = children
        number, unit = _NUMBER_AND_UNIT.fullmatch(str(tok)).groups()
        return ast.Quantity(str(tok), Decimal(number), unit or None, _pos(tok))

    def string(self, children):
        (tok,) = children
        return ast.String(str(tok)[1:-1], _pos(tok))

    def ident(self, children):
        (tok,) = children
        return ast.Ident(str(tok), _pos(tok))

    def call(self, children):
        name, *args = children
        return ast.Call(str(name), tuple(a for a in args if a is not None), _pos(name))

    @v_args(meta=True)
    def list(self, meta, children):
        return ast.ListValue(tuple(c for c in children if c is not None), _pos(meta))

    @v_args(meta=True)
    def repeat(self, meta, children):
        left, right = children
        return ast.Repeat(left, right, _pos(meta))

    @v_args(meta=True)
    def concat(self, meta, children):
        left, right = children
        parts = left.parts if isinstance(left, ast.Concat) else (left,)
        return ast.Concat(parts + (right,), _pos(meta))

    @v_args(meta=True)
    def arg(self, meta, children):
        key, value = children
        return ast.Assign(str(key), value, _pos(key), meta.end_line)

    assign = arg

    def sub_block(self, children):
        key, block = children
        return ast.SubBlock(str(key), block, _pos(key))

    @v_args(meta=True)
    def block(self, meta, children):
        return ast.Block(tuple(children), _pos(meta), meta.end_line)

    def decl(self, children):
        kind, name, block = children
        return ast.Decl(str(kind), str(name)[1:-1], block, _pos(kind), _pos(name))

    @v_args(meta=True)
    def use(self, meta, children):
        paths = tuple(ast.String(str(t)[1:-1], _pos(t)) for t in children)
        return ast.Use(paths, _pos(meta))

    def start(self, children):
        return tuple(children)


def parse(text: str, file: str = "<string>") -> ast.Module:
    """Parse spec text into an ast.Module; raises SpecError on any syntax error."""
    _COMMENTS.clear()
    try:
        tree = _parser().parse(text)
        items = _ToAst().transform(tree)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    except (RecursionError, VisitError) as e:
        if isinstance(e, VisitError) and not isinstance(e.orig_exc, RecursionError):
            raise
        line = _most_nested_line(text)
        raise SpecError("values are nested too deeply", file=file, line=line, col=1,
                        source_line=_line(text, line), hint="flatten the nested lists") from None
    uses = tuple(i for i in items if isinstance(i, ast.Use))
    decls = tuple(i for i in items if isinstance(i, ast.Decl))
    comments = tuple((_pos(t), str(t).rstrip()) for t in _COMMENTS)
    _COMMENTS.clear()
    return ast.Module(file=file, text=text, uses=uses, decls=decls, comments=comments)


def _most_nested_line(text: str) -> int:
    """The line with the most brackets and operators: where a too-deep value most likely is."""
    lines = text.split("\n")
    weight = [sum(line.count(c) for c in "[(+*") for line in lines]
    return weight.index(max(weight)) + 1 if lines else 1


def _line(text: str, line: int):
    lines = text.split("\n")  # as the lexer counts lines (not \u2028, \x0c, ...)
    return lines[line - 1] if 0 < line <= len(lines) else ""


def _end_position(text: str) -> tuple[int, int]:
    lines = text.rstrip("\n").split("\n")
    return len(lines), len(lines[-1]) + 1


def _expected(names) -> str:
    parser = _parser()
    shown = set()
    for name in names:
        if name in _TERMINAL_NAMES:
            shown.add(_TERMINAL_NAMES[name])
            continue
        term = next((t for t in parser.terminals if t.name == name), None)
        literal = getattr(getattr(term, "pattern", None), "value", name) if term else name
        shown.add(f"'{literal}'")
    return ", ".join(sorted(shown))


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> SpecError:
    line, col = (e.line, e.column) if getattr(e, "line", -1) not in (-1, None) else _end_position(text)
    hint = None
    if isinstance(e, UnexpectedCharacters):
        char = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        message = f"unexpected character {char!r}"
        if char == '"':
            hint = "a string must end on the line it starts"
        elif char.isnumeric() and not char.isascii():
            hint = f"numbers are written with the ASCII digits 0-9 ({char!r} is {unicodedata.name(char, 'a digit')})"
        elif e.allowed:
            hint = f"expected {_expected(e.allowed)}"
    elif isinstance(e, UnexpectedToken) and e.token.type != "$END":
        message, hint = _unexpected_token(e, text)
    else:  # UnexpectedEOF or a token at the end of the input
        line, col = _end_position(text)
        message = "unexpected end of file"
        expected = getattr(e, "expected", None) or getattr(e, "accepts", None)
        hint = f"expected {_expected(expected)}" if expected else None
        if expected and "RBRACE" in expected:
            hint = "a block is not closed: add '}'"
    return SpecError(message, file=file, line=line, col=col, source_line=_line(text, line), hint=hint)


def _unexpected_token(e: UnexpectedToken, text: str) -> tuple[str, str]:
    tok = e.token
    shown = f"'{tok}'" if tok.type != "QUANTITY" else f"number {tok}"
    message = f"unexpected {shown}"
    expected = set(e.accepts or e.expected or ())
    if re.search(r"(^|[\s{,])use\s*$", text[: tok.start_pos]) and tok.type == "STRING":
        return message, "`use` goes at the top level of the file, outside any declaration"
    if "EQUAL" in expected and "LBRACE" in expected:
        return message, "write `key = value` or `key { ... }`"
    return message, f"expected {_expected(expected)}"
