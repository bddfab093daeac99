"""The AST rule of /work/tools/kind_branches.py for the tests that hold a core folder to zero
kind-name branches (issue #16): comparisons and membership tests against a block kind's literal
name, and literal lookups such as ``model.block("moe")`` or ``model.count("mamba")``. The kind
names come from the registry."""
import ast

from plait.ir import kinds


def _names_a_kind(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in kinds.names()
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_kind(e) for e in node.elts)
    return False


def kind_branches(source: str) -> list[tuple[int, str]]:
    """(line, what) of each comparison against a kind's name and each literal kind lookup."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and (_names_a_kind(node.left)
                                              or any(_names_a_kind(c) for c in node.comparators)):
            hits.append((node.lineno, "compare"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("block", "count") and node.args and _names_a_kind(node.args[0])):
            hits.append((node.lineno, "lookup"))
    return sorted(hits)
