"""Helpers of the cost-model tests: a job whose device carries extra calibration values, and the
whole model as one stage."""
from dataclasses import replace


def calibrated(job, **values):
    """``job`` with ``values`` merged over its device's calibration."""
    dev = job.cluster.device
    merged = {**dict(dev.calibration), **values}
    dev = replace(dev, calibration=tuple(merged.items()))
    return replace(job, cluster=replace(job.cluster, device=dev))


def stages_of_one(table):
    """Every unit of ``table`` on one stage."""
    from plait.planner.cost.pipeline import stages_of
    return stages_of(table, (len(table.units),), (0,))
