"""Fault injection for the test suite, off unless ES_MPI_FAULT is set.

ES_MPI_FAULT="KIND@gen=G,rank=R" with KIND one of
  raise     raise an exception on rank R after generation G's update
  diverge   add 1e-3 to one master weight on rank R after generation G's update
  nonfinite make generation G's update non-finite (every rank)
  sleep     sleep 60 s on rank R in generation G (so a test can kill it mid-generation)
The tests use it to prove that the abort, divergence and refusal paths work;
reading one environment variable per generation costs nothing measurable.
"""
from __future__ import annotations

import os
import time


def _spec():
    raw = os.environ.get("ES_MPI_FAULT", "")
    if not raw or "@" not in raw:
        return None
    kind, _, rest = raw.partition("@")
    kv = dict(p.split("=", 1) for p in rest.split(",") if "=" in p)
    return kind, int(kv.get("gen", -1)), int(kv.get("rank", -1))


def active(kind: str, generation: int, rank: int) -> bool:
    s = _spec()
    return bool(s) and s[0] == kind and s[1] == generation and s[2] in (-1, rank)


def after_update(weights, generation: int, rank: int) -> None:
    if active("raise", generation, rank):
        raise RuntimeError(f"injected fault on rank {rank} at generation {generation}")
    if active("diverge", generation, rank):
        weights.master[0].view(-1)[0] += 1e-3
        weights.version += 1
        weights.restore()
    if active("sleep", generation, rank):
        time.sleep(60)
