"""SIGTERM / SIGINT in a rank: finish the step, agree with every rank to stop, checkpoint (with
--save) and exit. Clusters preempt with SIGTERM and kill a while later; torchrun passes the signal
to every rank it started.

The ranks agree through one all-reduce (max) of a flag after each step, so all stop after the same
step and the checkpoint is complete, as Megatron-LM's exit-signal handler does with an all-gather.
"""
from __future__ import annotations

import signal
from typing import Optional

import torch

from plait.lowering import collectives as cc

from . import checkpoint

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """Every rank stopped after ``completed`` steps on a signal; ``saved``: the checkpoint written."""

    def __init__(self, signum: int, completed: int, saved):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {completed}"
                         + (f"; checkpoint {saved}" if saved else "; no checkpoint (no --save)"))
        self.signum, self.completed, self.saved = signum, completed, saved


class GracefulStop:
    """An after-step hook for Trainer.fit (called after the saver's): stop every rank together
    once any of them got a signal."""

    def __init__(self, saver=None):
        self.saver = saver  # checkpoint.Saver of the run (None without --save)
        self.received: Optional[int] = None
        self.previous = {}

    def install(self) -> "GracefulStop":
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.received = self.received or signum

    def agreed(self, device: torch.device) -> int:
        """The signal some rank got (0: none); the same answer on every rank."""
        flag = torch.tensor([float(self.received or 0)], device=device)
        return int(cc.all_reduce(flag, "max", "world")[0])

    def __call__(self, trainer, completed: int, total_steps: int) -> None:
        signum = self.agreed(trainer.mesh.device)
        if not signum:
            return
        saved = None
        if self.saver is not None:
            saved = self.saver.close()  # a save of this step still in flight completes
            if saved != checkpoint.step_dir(self.saver.root, completed):
                saved = checkpoint.save(trainer, self.saver.root, completed, total_steps)
        raise Stopped(signum, completed, saved)
