"""Grammar and AST: what the parser accepts, and located SpecErrors for what it does not."""
from decimal import Decimal

import pytest

from plait.ir.dsl import ast
from plait.ir.dsl.parse import parse
from plait.ir.errors import SpecError


def only_block(text: str) -> dict:
    (decl,) = parse(text).decls
    return {e.key: e for e in decl.block.entries}


def test_declarations_uses_and_positions():
    m = parse('use "a.plait", "../b.plait"\n\nmodel "x" {\n  vocab = 3\n}\ndevice "d" {}\n', "f.plait")
    assert [p.value for p in m.uses[0].paths] == ["a.plait", "../b.plait"]
    assert [(d.kind, d.name) for d in m.decls] == [("model", "x"), ("device", "d")]
    assert m.decls[0].pos == ast.Pos(3, 1) and m.decls[0].name_pos == ast.Pos(3, 7)
    assert m.decls[0].block.entries[0].pos == ast.Pos(4, 3)
    assert m.file == "f.plait"


@pytest.mark.parametrize("text, number, unit", [
    ("80 GiB", "80", "GiB"), ("3.35TB/s", "3.35", "TB/s"), ("400 Gb/s", "400", "Gb/s"),
    ("989.5 TFLOP/s", "989.5", "TFLOP/s"), ("5 us", "5", "us"), ("128K", "128", "K"),
    ("1e-5", "1e-5", None), ("-2", "-2", None), (".5", ".5", None), ("2 M", "2", "M"),
])
def test_quantities_keep_number_and_unit(text, number, unit):
    q = only_block(f'device "d" {{ x = {text} }}')["x"].value
    assert isinstance(q, ast.Quantity)
    assert (q.number, q.unit, q.text) == (Decimal(number), unit, text)


def test_entries_separated_by_newlines_commas_or_spaces_and_comments_ignored():
    entries = only_block('model "m" {  # comment\n a = 1, b = 2\n c = 3 d = "s" # trailing\n ,, e = x }')
    assert list(entries) == ["a", "b", "c", "d", "e"]
    assert entries["d"].value == ast.String("s", ast.Pos(3, 12))
    assert entries["e"].value.name == "x"


def test_calls_nest_and_accept_trailing_commas():
    v = only_block('model "m" { rope = rope(theta = 1e6, scaling = yarn(factor = 8,),) }')["rope"].value
    assert isinstance(v, ast.Call) and v.name == "rope"
    theta, scaling = v.args
    assert theta.key == "theta" and scaling.value.name == "yarn"
    assert only_block('model "m" { x = f() }')["x"].value.args == ()


def test_layer_expressions_build_repeat_and_concat_nodes():
    v = only_block('model "m" { layers = 3 * [attention, mlp] + 58 * [attention, moe] + [mlp] }')["layers"].value
    assert isinstance(v, ast.Concat) and len(v.parts) == 3
    first = v.parts[0]
    assert isinstance(first, ast.Repeat) and first.left.number == 3
    assert [i.name for i in first.right.items] == ["attention", "mlp"]
    assert isinstance(v.parts[2], ast.ListValue)


def test_sub_blocks_nest():
    entries = only_block('train "t" { layout { tp = auto, ep = 8 } }')
    layout = entries["layout"]
    assert isinstance(layout, ast.SubBlock)
    assert [e.key for e in layout.block.entries] == ["tp", "ep"]


def test_keywords_are_names_inside_blocks():
    entries = only_block('model "m" { use = 1, user = 2 }')
    assert list(entries) == ["use", "user"]


def syntax_error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text, "s.plait")
    return info.value


@pytest.mark.parametrize("text, message, line, col, hint", [
    ('model "m" {\n  heads 4\n}', "unexpected number 4", 2, 9, "key = value"),
    ('model "m" {\n  a = "open\n}', "unexpected character '\"'", 2, 7, "must end on the line"),
    ('model "m" {\n  a = 3 @\n}', "unexpected character '@'", 2, 9, "expected"),
    ('model "m" {\n  a = 3\n', "unexpected end of file", 2, 8, "not closed"),
    ('model "m" {\n  use "x.plait"\n}', "unexpected '\"x.plait\"'", 2, 7, "top level"),
    ('model m {}', "unexpected 'm'", 1, 7, "a string"),
    ('model "m" { a = [1, 2 }', "unexpected '}'", 1, 23, "']'"),
    ('model "m" { a = 3 } }', "unexpected '}'", 1, 21, "end of file"),
])
def test_syntax_errors_are_located_spec_errors(text, message, line, col, hint):
    e = syntax_error(text)
    assert message in e.message
    assert (e.file, e.line, e.col) == ("s.plait", line, col)
    assert hint in e.hint
    assert e.source_line == text.splitlines()[line - 1]
    assert e.format().splitlines()[2].index("^") == col + 1  # caret under the column


def test_deep_nesting_is_a_spec_error_not_a_recursion_error():
    e = syntax_error('model "m" { a = ' + "[" * 3000 + "]" * 3000 + " }")
    assert "nested too deeply" in e.message
