"""Helpers of the cost-model tests: a job whose device carries extra calibration values, and the
whole model as one stage."""
from plait.planner.calibration import overridden


def calibrated(job, **values):
    """``job`` with ``values`` merged over its device's calibration (planner/calibration.py
    overridden, with keyword arguments)."""
    return overridden(job, values)


def stages_of_one(table):
    """Every unit of ``table`` on one stage."""
    from plait.planner.cost.pipeline import stages_of
    return stages_of(table, (len(table.units),), (0,))
