"""The block-kind registry (ir/kinds.py): names, pattern symbols, facet lookup."""
import pytest

from plait.ir import kinds
from plait.ir.model import BLOCK_KINDS, PATTERN_SYMBOLS


def test_model_vocabulary_comes_from_the_registry():
    assert BLOCK_KINDS == kinds.names() == ("attention", "mlp", "moe", "mamba")
    assert PATTERN_SYMBOLS == {"*": "attention", "-": "mlp", "E": "moe", "M": "mamba"}


def test_unknown_kind_and_facet_are_named():
    with pytest.raises(KeyError, match="unknown block kind 'ssm'; kinds: attention, mlp, moe, mamba"):
        kinds.kind("ssm")
    with pytest.raises(KeyError, match="unknown facet 'cosst'"):
        kinds.facet("moe", "cosst")


def test_kind_package_is_plait_kinds_name():
    assert kinds.kind("mamba").package == "plait.kinds.mamba"
