"""Every registered block kind offers the same functions in its module, parallelize and prune
facets (the protocol the attention kind's facet docstrings document), so the core can call any
kind's facet without knowing which kind it is."""
import inspect

import pytest

from plait.ir import kinds

FACETS = ("module", "parallelize", "prune")


def public_functions(facet) -> set[str]:
    """Functions a facet module defines itself (not ones it imports), without private helpers."""
    return {name for name, f in inspect.getmembers(facet, inspect.isfunction)
            if f.__module__ == facet.__name__ and not name.startswith("_")}


@pytest.mark.parametrize("which", FACETS)
def test_every_kind_exposes_the_same_function_names(which):
    protocol = public_functions(kinds.facet(kinds.names()[0], which))
    assert protocol, f"the {which} facet of {kinds.names()[0]} defines no functions"
    for kind in kinds.names():
        assert public_functions(kinds.facet(kind, which)) == protocol, (kind, which)


@pytest.mark.parametrize("which", FACETS)
def test_the_first_kind_documents_its_protocol(which):
    """The protocol is written down where a newcomer adding a kind will read it."""
    facet = kinds.facet(kinds.names()[0], which)
    missing = [name for name in public_functions(facet) if name not in facet.__doc__]
    assert not missing, f"{facet.__name__}'s docstring does not describe {missing}"


def test_the_planner_half_of_the_prune_facet_loads_without_torch():
    """planner/prune reads the prune facet; importing it must not pull torch in."""
    import subprocess
    import sys
    code = ("import sys; from plait.ir import kinds; "
            "[kinds.facet(k, 'prune') for k in kinds.names()]; import plait.planner.prune.plan; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
