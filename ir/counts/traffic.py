"""Bytes the memory-bound ops of a block move through memory per forward pass (reads + writes):
what the cost model prices at the memory bandwidth (planner/cost/compute.py) and what `plait
calibrate`'s elementwise probe divides by its time (runtime/calibrate_ops.py). One source, so the
rate calibrate measures is the rate of exactly the bytes the model then charges."""
from __future__ import annotations


def norm_residual_traffic(tokens: float, hidden: float, act_bytes: float) -> tuple[float, float]:
    """(norm bytes, residual-add bytes) of ``tokens`` rows of the residual stream: the norm reads
    and writes it, the add reads two and writes one."""
    per = tokens * hidden * act_bytes
    return 2 * per, 3 * per


def activation_fn_traffic(tokens: float, up: float, width: float, act_bytes: float) -> float:
    """Bytes of an FFN's activation function: read the ``up`` (gate + up) columns, write
    ``width``."""
    return tokens * (up + width) * act_bytes
