"""The stage-partition ILP equals brute force on small random instances (both formulations)."""
import itertools
import random

import pytest

from plait.planner.ilp import (OPTIMAL, PartitionProblem, partition_fits, partition_time, solve)


def compositions(total, parts):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0,) + cuts + (total,)
        yield tuple(b - a for a, b in zip(bounds, bounds[1:]))


def brute_force(p):
    best = None
    for sizes in compositions(len(p.unit_types), p.chunks):
        for options in itertools.product(p.options, repeat=p.chunks):
            if partition_fits(p, sizes, options):
                t = partition_time(p, sizes, options)
                best = t if best is None else min(best, t)
    return best


def random_problem(rng, n_types):
    pp, vpp = rng.choice([(1, 1), (2, 1), (3, 1), (2, 2)])
    units = rng.randint(pp * vpp, pp * vpp + 4)
    types = tuple(rng.randrange(n_types) for _ in range(units))
    time, act, transient = [], [], []
    for _ in range(n_types):
        base = rng.uniform(1, 3)
        time.append((base, base * rng.uniform(1.0, 1.1), base * rng.uniform(1.25, 1.4)))
        a = rng.uniform(2, 6)
        act.append((a, a * rng.uniform(0.5, 0.8), a * rng.uniform(0.05, 0.2)))
        transient.append((0.0, a * 0.2, a))
    static = tuple(rng.uniform(1, 4) for _ in range(n_types))
    inflight = tuple(float(pp - r) for r in range(pp))
    p = PartitionProblem(
        unit_types=types, time=tuple(time), act=tuple(act), transient=tuple(transient),
        static=static, pp=pp, vpp=vpp, inflight=inflight, buffers=tuple([0.5] * pp),
        chunk_time=0.1, first_time=rng.uniform(0, 2), first_static=1.0,
        last_time=rng.uniform(0, 3), last_static=2.0, fragmentation=0.05, reserve=1.0,
        capacity=1e9, window=units)
    # a capacity between "everything fits" and "nothing fits" makes memory bind
    return p.__class__(**{**p.__dict__, "capacity": rng.uniform(8, 40)})


@pytest.mark.parametrize("n_types", [1, 2])
def test_ilp_equals_brute_force(n_types):
    rng = random.Random(1234 + n_types)
    checked = infeasible = 0
    for _ in range(25):
        p = random_problem(rng, n_types)
        expect = brute_force(p)
        got = solve(p, time_limit=20)
        if expect is None:
            assert got is None
            infeasible += 1
            continue
        assert got is not None and got.status == OPTIMAL
        assert partition_fits(p, got.sizes, got.options)
        assert sum(got.sizes) == len(p.unit_types) and min(got.sizes) >= 1
        assert got.z == pytest.approx(expect, rel=1e-6)
        checked += 1
    assert checked >= 10 and infeasible >= 1  # both regimes exercised


def test_pinned_option_and_too_few_units():
    p = PartitionProblem(unit_types=(0,) * 4, time=((1.0, 1.1, 1.3),), act=((5.0, 3.0, 1.0),),
                         transient=((0.0, 1.0, 5.0),), static=(1.0,), pp=2, vpp=1,
                         inflight=(2.0, 1.0), buffers=(0.0, 0.0), options=(2,))
    got = solve(p)
    assert got.options == (2, 2) and got.sizes == (2, 2)
    assert solve(PartitionProblem(**{**p.__dict__, "pp": 5, "inflight": (1.0,) * 5,
                                     "buffers": (0.0,) * 5})) is None


def test_memory_forces_recompute_and_unequal_stages():
    # rank 0 holds 2 micro-batches: with no recompute it only fits if it gets fewer units
    p = PartitionProblem(unit_types=(0,) * 6, time=((1.0, 1.05, 1.33),), act=((2.0, 1.5, 0.2),),
                         transient=((0.0, 0.5, 2.0),), static=(1.0,), pp=2, vpp=1,
                         inflight=(2.0, 1.0), buffers=(0.0, 0.0), capacity=14.0)
    got = solve(p)
    assert got is not None
    assert got.z == pytest.approx(brute_force(PartitionProblem(**{**p.__dict__})))


def test_warm_start_keeps_the_optimum():
    rng = random.Random(77)
    solved = 0
    for _ in range(12):
        p = random_problem(rng, 2)
        sizes = tuple([1] * (p.chunks - 1) + [len(p.unit_types) - p.chunks + 1])
        options = (2,) * p.chunks
        if not partition_fits(p, sizes, options):
            continue
        got = solve(p, time_limit=20, start=(sizes, options))
        assert got is not None and got.z == pytest.approx(brute_force(p), rel=1e-6)
        solved += 1
    assert solved >= 3
