"""Which of a probe's repeats stands for it (runtime/calibrate_timing.py, `plait calibrate
--statistic`): the median by default (the plan predicts a run's median step), the fastest when
asked, the same choice in every probe that times repeats (timed, calibrate_ops.timed_cold)."""
import pytest
import torch

from plait.runtime import calibrate_ops, calibrate_timing


@pytest.fixture
def statistic():
    yield calibrate_timing.use_statistic
    calibrate_timing.use_statistic("median")


def test_the_median_repeat_by_default():
    assert calibrate_timing.statistic() == "median"
    assert calibrate_timing.representative([3.0, 1.0, 2.0, 9.0]) == 2.5
    assert calibrate_timing.representative([3.0, 1.0, 9.0]) == 3.0


def test_the_fastest_repeat_when_asked(statistic):
    statistic("min")
    assert calibrate_timing.representative([3.0, 1.0, 2.0, 9.0]) == 1.0


def test_an_unknown_statistic_is_refused(statistic):
    with pytest.raises(ValueError, match="median, min"):
        statistic("mean")


@pytest.mark.parametrize("probe", [calibrate_timing.timed, calibrate_ops.timed_cold])
def test_every_repeat_timer_takes_the_statistic(statistic, monkeypatch, probe):
    clock = iter(range(1000))  # perf_counter: each run lasts one tick more than the one before
    ticks = [0]

    def perf_counter():
        return ticks[0]

    def run():
        ticks[0] += next(clock) + 1

    monkeypatch.setattr(calibrate_timing.time, "perf_counter", perf_counter)
    monkeypatch.setattr(calibrate_ops.time, "perf_counter", perf_counter)
    cpu = torch.device("cpu")
    median = probe(run, cpu, repeat=5, warmup=2)
    statistic("min")
    clock = iter(range(1000))
    fastest = probe(run, cpu, repeat=5, warmup=2)
    assert (fastest, median) == (3, 5)  # runs 3..7 ticks long after 2 warm-ups: min 3, median 5
