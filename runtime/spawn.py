"""Local rank processes forked from a server that has already imported torch and plait.

`torch.multiprocessing.spawn` starts each rank as a fresh interpreter that imports torch and plait's
runtime again: ~2.8 CPU s per rank, 11 s of wall time for 4 ranks on 2 cores, on every spawn. A
fork server imports them once per parent process and forks each rank from that state (measured:
a 4-rank gloo init + teardown 6.5 s with spawn, 0.1 s from a warm fork server). The server is
single-threaded and has run no torch op, so no thread pool or CUDA context is forked, which is
the hazard runtime/data_prepare.py avoids by spawning.

A forked rank would inherit the server's stdout / stderr, those of the moment the server started;
each rank instead gets the caller's current ones (`_CallerStdio`), as a spawned rank does.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from multiprocessing import reduction
from typing import Callable

import torch.multiprocessing as mp

# Imported by the server before its first fork (a failed import only makes ranks import it later)
# torch._dynamo: the first meta kernel written in Python (shape propagation) imports it, ~3.7 s.
PRELOAD = ("torch", "torch.distributed", "torch._dynamo", "plait.lowering.compile",
           "plait.runtime.train")


def start_ranks(fn: Callable, args: tuple, nprocs: int, join: bool = True):
    """``fn(rank, *args)`` on ``nprocs`` local processes, as torch.multiprocessing.start_processes
    does (join=False returns its context)."""
    multiprocessing.set_forkserver_preload(list(PRELOAD))  # read when the server starts
    sys.stdout.flush()
    sys.stderr.flush()
    return mp.start_processes(_rank, args=(_CallerStdio(), fn, args), nprocs=nprocs, join=join,
                              start_method="forkserver")


def _rank(rank: int, stdio: "_CallerStdio", fn: Callable, args: tuple) -> None:
    """``stdio`` did its work when it was unpickled, before this runs (``_install``)."""
    fn(rank, *args)


class _CallerStdio:
    """Pickled for a new rank as duplicates of the caller's fds 1 and 2 (multiprocessing passes
    them to the forked process), which the rank installs as its own when it unpickles them."""

    def __reduce__(self):
        return _install, (reduction.DupFd(1), reduction.DupFd(2))


def _install(out, err) -> "_CallerStdio":
    for fd, dup in ((1, out), (2, err)):
        own = dup.detach()
        os.dup2(own, fd)
        os.close(own)
    return _CallerStdio()
