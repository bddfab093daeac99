"""Rank -> group mapping against Megatron-Core's RankGenerator (order tp-cp-ep-dp-pp)."""
import pytest

from plait.ir.errors import LayoutError
from plait.ir.plan import Layout
from plait.planner.groups import group_of, rank_groups


def issue_layout(**kw):
    # 16 GPUs: TP2 CP2 PP2 (DP2) and ETP1 EP4 (EDP2)
    return Layout(tp=2, cp=2, pp=2, dp=2, etp=1, ep=4, edp=2, **kw)


def test_issue_example_dense():
    g = rank_groups(issue_layout())["dense"]
    assert g["tp"][:3] == [[0, 1], [2, 3], [4, 5]]
    assert g["dp"][:5] == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12]]
    assert g["cp"][:3] == [[0, 2], [1, 3], [4, 6]]
    assert g["pp"][:3] == [[0, 8], [1, 9], [2, 10]]
    assert g["dp-cp"][:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["tp-pp"][:2] == [[0, 1, 8, 9], [2, 3, 10, 11]]


def test_issue_example_expert():
    g = rank_groups(issue_layout())["expert"]
    assert g["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert g["edp"][:4] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["etp"][:3] == [[0], [1], [2]]
    assert g["etp-ep"] == g["ep"]
    assert g["pp"] == rank_groups(issue_layout())["dense"]["pp"]


def test_groups_partition_the_world():
    lay = Layout(tp=2, cp=1, dp=4, pp=2, etp=1, ep=8, edp=1)
    for side in rank_groups(lay).values():
        for name, groups in side.items():
            flat = sorted(r for grp in groups for r in grp)
            assert flat == list(range(16)), name


def test_expert_tp_equal_dense_tp_matches():
    # mcore-style (ETP = TP, EP inside DP): the expert tp groups equal the dense tp groups
    lay = Layout(tp=2, dp=4, pp=2, etp=2, ep=4, edp=1)
    g = rank_groups(lay)
    assert g["expert"]["etp"] == g["dense"]["tp"]
    assert g["expert"]["ep"][0] == [0, 2, 4, 6]


def test_other_order():
    # "tp-cp-ep-pp-dp": dp varies slowest
    lay = Layout(tp=2, dp=2, pp=2, etp=2, edp=2, order="tp-cp-ep-pp-dp")
    g = rank_groups(lay)["dense"]
    assert g["pp"][:2] == [[0, 2], [1, 3]]
    assert g["dp"][:2] == [[0, 4], [1, 5]]


def test_world_mismatch_shows_arithmetic():
    with pytest.raises(LayoutError, match="differs"):
        rank_groups(Layout(tp=2, dp=2, pp=2, ep=4, edp=2))


def test_bad_order():
    with pytest.raises(LayoutError, match="order"):
        rank_groups(Layout(order="tp-xx-pp"))


def test_group_of():
    lay = issue_layout()
    assert group_of(lay, "dense", "dp", 5) == (1, 5)
    assert group_of(lay, "expert", "ep", 13) == (12, 13, 14, 15)
