"""The blend sequence (ir/blend.py): exact counts at every prefix, O(batch) random access."""
import numpy as np
import pytest

from plait.ir.blend import BlendSchedule, Phase, arrivals, counts

WEIGHTS = [(0.35, 0.40, 0.15, 0.10), (0.45, 0.25, 0.20, 0.10), (0.7, 0.2, 0.05, 0.03, 0.02),
           (0.01, 0.99), (1 / 3, 1 / 3, 1 / 3), (0.2,) * 5]


def _greedy(weights, n):
    """Megatron's BlendedDataset rule, replayed sample by sample: the largest deficit goes next."""
    w, got, out = np.asarray(weights), np.zeros(len(weights)), []
    for i in range(n):
        k = int(np.argmax(w * (i + 1) - got))
        got[k] += 1
        out.append(k)
    return np.asarray(out)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_every_prefix_holds_each_source_within_one_sample_of_its_weight(weights):
    n = 20_000
    src, draw = arrivals(weights, 0, n)
    realised = np.cumsum(np.eye(len(weights))[src], axis=0)
    deviation = np.abs(realised - np.outer(np.arange(1, n + 1), weights)).max()
    print(f"\nweights {weights}: max |count - weight * n| over {n} prefixes = {deviation:.3f} "
          f"(Megatron's greedy: {_greedy_deviation(weights, 4000):.3f} over 4000)")
    assert deviation < 1.0
    for k in range(len(weights)):  # each source's draws are 0, 1, 2, ... in order
        assert np.array_equal(draw[src == k], np.arange((src == k).sum()))


def _greedy_deviation(weights, n):
    realised = np.cumsum(np.eye(len(weights))[_greedy(weights, n)], axis=0)
    return np.abs(realised - np.outer(np.arange(1, n + 1), weights)).max()


@pytest.mark.parametrize("weights", WEIGHTS[:3])
def test_any_slice_equals_the_same_slice_of_the_whole_sequence(weights):
    whole, _ = arrivals(weights, 0, 5000)
    for first, count in ((0, 1), (1, 7), (999, 64), (4321, 679)):
        assert np.array_equal(arrivals(weights, first, count)[0], whole[first:first + count])
    assert list(counts(weights, 3333)) == list(np.bincount(whole[:3333], minlength=len(weights)))


def test_far_positions_cost_no_replay():
    """Sample 10^11 (a trillion-token job's range) is found directly and agrees with counts."""
    w = (0.35, 0.40, 0.15, 0.10)
    src, draw = arrivals(w, 10 ** 11, 16)
    before = counts(w, 10 ** 11)
    assert np.abs(before - np.asarray(w) * 10 ** 11).max() < 1
    for k, d in zip(src, draw):
        assert d == before[k]  # the next draw of that source
        before[k] += 1


def test_phases_switch_at_their_start_and_sources_continue():
    sched = BlendSchedule([Phase(0, (1.0, 0.0)), Phase(100, (0.0, 1.0)), Phase(150, (0.5, 0.5))], 2)
    src, draw = sched.samples(90, 80)
    assert list(src[:10]) == [0] * 10 and list(src[10:60]) == [1] * 50
    assert list(draw[:10]) == list(range(90, 100)) and list(draw[10:60]) == list(range(50))
    tail_src, tail_draw = src[60:], draw[60:]
    assert sorted(tail_draw[tail_src == 0]) == list(range(100, 110))  # source 0 continues at 100
    assert list(sched.draws_until(170)) == [110, 60]


@pytest.mark.parametrize("n", [1, 2, 3, 20, 1000, 4097, 65536])
def test_the_window_shuffle_is_a_keyed_permutation(n):
    from plait.ir.blend import permute, round_keys

    p = permute(np.arange(n), n, round_keys(1, 2, 3))
    assert sorted(p.tolist()) == list(range(n))
    assert np.array_equal(permute(np.arange(n)[::-1], n, round_keys(1, 2, 3)), p[::-1])  # per index
    if n >= 20:
        other = permute(np.arange(n), n, round_keys(1, 2, 4))
        assert not np.array_equal(p, other) and not np.array_equal(p, np.arange(n))
        assert np.mean(p == other) < 0.2  # another epoch: a different order, not a shifted one


def test_the_shuffle_of_a_billion_windows_needs_no_array_of_a_billion():
    from plait.ir.blend import permute, round_keys

    n = 10 ** 9
    picks = permute(np.arange(n - 64, n), n, round_keys(7, 0, 0))
    assert len(set(picks.tolist())) == 64 and picks.min() >= 0 and picks.max() < n


def test_the_small_and_the_vectorised_shuffles_agree():
    from plait.ir.blend import SMALL, permute, round_keys

    keys = round_keys(3, 1, 4)
    for n in (5, 1000, 10 ** 9):
        big = permute(np.arange(SMALL + 40) % n, n, keys)  # the numpy path
        small = np.concatenate([permute(np.arange(i, min(i + 8, SMALL + 40)) % n, n, keys)
                                for i in range(0, SMALL + 40, 8)])
        assert np.array_equal(big, small)
