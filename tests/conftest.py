"""Suite-wide settings.

One intra-op thread in the test process, set before any test runs (not only by the modules that
happen to be collected): a reduction's rounding then does not depend on OMP_NUM_THREADS or the
machine's core count, so every comparison, including the single-device references that the
multi-process tests compute in this process, gives the same numbers on any machine. Spawned
ranks set one thread themselves (runtime.harness.parity, tests/lowering/moe_dist_util.py).
"""
import torch


def pytest_configure(config):
    torch.set_num_threads(1)
