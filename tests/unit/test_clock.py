"""Honest GPU timings (issue 16 item 9): every timestamp waits for the
device's queued work first."""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch

import es_mpi
from es_mpi.clock import Clock


def test_cuda_clock_synchronizes_before_each_timestamp(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: events.append(("time",)) or real())
    clock = Clock("cuda:1")
    _, dt = clock.timed(lambda: events.append(("work",)))
    assert dt >= 0
    assert events == [("sync", "cuda:1"), ("time",), ("work",), ("sync", "cuda:1"), ("time",)]


def test_cpu_clock_never_synchronizes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (_ for _ in ()).throw(AssertionError("synced")))
    c = Clock("cpu")
    assert c() <= c()


def test_no_timestamp_bypasses_the_clock():
    """Phase times are taken through Clock only: a bare perf_counter in the
    trainer, bench or paper loop would time kernel launches on a GPU."""
    root = Path(es_mpi.__file__).parent
    allowed = {"clock.py", "dtypes.py"}  # dtypes: a CPU-only matmul probe
    bare = [str(p.relative_to(root)) for p in root.rglob("*.py")
            if p.name not in allowed and re.search(r"\bperf_counter\b", p.read_text())]
    assert not bare, f"time.perf_counter outside es_mpi/clock.py in {bare}"
