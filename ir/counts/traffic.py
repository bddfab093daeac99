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


def expert_loop_traffic(rows: float, n: float, k: float, experts: float,
                        act_bytes: float) -> tuple[float, float]:
    """(forward, backward) bytes the routed experts' loop path (lowering/modules/experts.py
    grouped_linear where torch._grouped_mm does not run) copies around ``experts`` GEMMs of
    [rows x k] @ [k x n] beyond the GEMMs themselves: forward concatenates the experts' outputs
    (reads and writes rows x n each); backward concatenates their input gradients (rows x k each)
    and stacks their weight gradients (n x k each, unbind's backward)."""
    return (2 * experts * rows * n * act_bytes,
            2 * experts * (rows * k + n * k) * act_bytes)
