"""Timestamps that include the device's queued work.

CUDA kernels run asynchronously: `time.perf_counter()` after a launch
measures the launch, not the work, so every phase time (t_materialise,
t_decode, t_update, the copy bandwidth, the paper loop) would be wrong on a
GPU.  Every timestamp es-mpi takes goes through `Clock`, which waits for the
device first.  Cost: one `torch.cuda.synchronize` per timestamp (a few
microseconds when the queue is empty; the wait itself is the work being
timed).  On CPU it is `perf_counter`.
"""
from __future__ import annotations

import time

import torch


class Clock:
    """`clock()` -> seconds (perf_counter) once `device`'s queued work is done."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.sync = self.device.type == "cuda"

    def __call__(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def timed(self, fn, *args, **kw):
        """(fn(*args, **kw), its wall seconds including device work)."""
        t0 = self()
        out = fn(*args, **kw)
        return out, self() - t0
