"""Knowledge distillation of a pruned student from its frozen teacher, built on the training core.

  single_device.py   the loss and the one-process Distiller on the reference modules
  parallel.py        DistillTrainer: the same loss through the compiled runtime under a parallel plan
  launch.py          local processes, one per rank, running a DistillTrainer (plait prune)
"""
