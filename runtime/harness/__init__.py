"""Harnesses that drive the runtime on local gloo ranks to check it or to measure it; the training
core never imports them.

  parity.py, parity_compare.py   parallel layouts against one device (loss, gradients, parameters)
  distill_parity.py              the same for distillation (runtime/distill/)
  resume_check.py                a resumed run equals an uninterrupted one (checkpoints)
  memory_probe.py, step_probe.py what a rank holds and how long a step takes, beside the planner's
                                 cost model (tests/runtime/test_memory_truth.py, benchmarks/)
"""
