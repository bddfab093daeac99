"""The loader of a blended, phased data recipe (`data { sources { ... } phase ... }`).

The global sample order comes from ir/blend.py (which source, which draw of it, and a keyed
permutation of the source's windows per epoch: which window, computed per draw, never stored): a function of the step and the
seed only, so any DP size and any layout read the same global batches (DP rank d takes the d-th
contiguous share, as BatchLoader does), and a resumed run continues at the checkpoint's step with
nothing else to restore.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from plait.ir.blend import BlendSchedule, permute, round_keys
from plait.ir.datarecipe import epoch_overruns, schedule
from plait.ir import legality
from plait.ir.errors import PlaitError
from plait.ir.job import TrainJob

from .data import Batch, TokenSource, open_source
from .packing import Packing, packed_batch


class BlendedLoader:
    def __init__(self, sources: Sequence[TokenSource], names: Sequence[str], blend: BlendSchedule,
                 seq_len: int, global_batch: int, seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                 device: torch.device = torch.device("cpu"), packing: Packing = Packing()):
        self.packing = packing
        problem = legality.divides("global batch", global_batch, "dp", dp_size)
        if problem:
            raise PlaitError(problem)
        self.sources, self.names, self.blend = list(sources), list(names), blend
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, torch.device(device)
        self.windows = [s.num_windows(seq_len + 1) for s in self.sources]
        self._key_cache: dict[tuple[int, int], np.ndarray] = {}

    def _keys(self, k: int, epoch: int) -> np.ndarray:
        keys = self._key_cache.get((k, epoch))
        if keys is None:
            keys = self._key_cache[(k, epoch)] = round_keys(self.seed, k, epoch)
        return keys

    def global_samples(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, window of that source) for each sample of step `step`'s global batch."""
        src, draw = self.blend.samples(step * self.global_batch, self.global_batch)
        window = np.empty_like(draw)
        for k in np.unique(src):
            mine = src == k
            if self.windows[k] == 0:
                raise PlaitError(f"data source {self.names[k]!r} holds no window of "
                                 f"{self.seq_len + 1} tokens")
            epoch, within = np.divmod(draw[mine], self.windows[k])
            shuffled = np.empty_like(within)
            for e in np.unique(epoch):  # a fresh shuffle of the source each epoch
                at = epoch == e
                shuffled[at] = permute(within[at], self.windows[k], self._keys(int(k), int(e)))
            window[mine] = shuffled
        return src, window

    def local_batch(self, step: int) -> Batch:
        share = self.global_batch // self.dp_size
        src, window = self.global_samples(step)
        samples = [(self.sources[k], w) for k, w in zip(src, window)]
        return packed_batch(self.packing, samples, slice(self.dp_rank * share,
                            (self.dp_rank + 1) * share), self.seq_len + 1, self.device)


def blended_loader(job: TrainJob, seq_len: int, global_batch: int, dp_rank: int = 0,
                   dp_size: int = 1, device: torch.device = torch.device("cpu"),
                   sources: Optional[Sequence[TokenSource]] = None) -> BlendedLoader:
    """The job's blend, its sources opened (each without its held-out validation split), its
    epoch caps checked against the job's steps."""
    from .validation import training_part

    sources = sources or [open_source(s.path, job.model.vocab) for s in job.data.sources]
    sources = [training_part(s, job.data, seq_len) for s in sources]
    names = [s.name for s in job.data.sources]
    loader = BlendedLoader(sources, names, schedule(job), seq_len, global_batch, job.data.seed,
                           dp_rank, dp_size, device, Packing.of(job.data))
    overruns = epoch_overruns(job, dict(zip(names, loader.windows)))
    if overruns:
        raise PlaitError(overruns[0][1], hint="raise epochs, lower the source's weight, or train "
                         "fewer tokens")
    return loader
