"""The runtime: executes compiled programs and decides nothing.

The training core sits at this level (mesh, schedule, train, optim, zero1, checkpoint*, data*,
kernels, launch, ...). Two subpackages build on it and nothing in the core imports them:
``distill/`` (distillation of pruned models) and ``harness/`` (parity, resume and measurement
harnesses for tests and benchmarks).
"""
