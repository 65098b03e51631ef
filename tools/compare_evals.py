#!/usr/bin/env python
"""Paired comparison of two held-out evaluations on the same prompts: the mean
per-prompt change of the reward, of "correct" and of every numeric component,
with a 95 % CI (normal approximation over prompts).  Start and end of a run
are scored on the same prompts, so the paired interval is the one that says
whether a change is outside the noise; the two runs' own intervals overlap
far more.

  es-mpi eval --config C --limit 48 --out base.jsonl
  es-mpi eval --config C --limit 48 --checkpoint RUN/checkpoints/gen-000024.h5 --out end.jsonl
  python tools/compare_evals.py base.jsonl end.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

SKIP = {"index", "id", "completion", "n_tokens"}


def read_eval(path: str) -> dict[str, dict]:
    rows = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                rows[str(r["id"])] = r
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not an es-mpi eval line ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no eval lines")
    return rows


def paired(a: dict[str, dict], b: dict[str, dict]) -> dict[str, tuple[float, float, float, float]]:
    """field -> (mean in a, mean in b, mean of b - a, 95 % CI half-width), over the prompts in both."""
    ids = [i for i in a if i in b]
    if not ids:
        raise ValueError("the two evaluations share no prompt id")
    fields = [k for k, v in a[ids[0]].items() if k not in SKIP and isinstance(v, (int, float))]
    out = {}
    for k in fields:
        x = np.array([float(a[i][k]) for i in ids])
        y = np.array([float(b[i][k]) for i in ids])
        d = y - x
        ci = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan
        out[k] = (float(x.mean()), float(y.mean()), float(d.mean()), float(ci))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    args = ap.parse_args(argv)
    try:
        a, b = read_eval(args.before), read_eval(args.after)
        res = paired(a, b)
    except (OSError, ValueError) as e:
        print(f"compare_evals: error: {e}", file=sys.stderr)
        return 2
    n = len([i for i in a if i in b])
    print(f"{n} prompts in both; change = after - before, 95% CI of the mean per-prompt change")
    for k, (x, y, d, ci) in res.items():
        print(f"{k:<16} {x:10.4f} -> {y:10.4f}   change {d:+.4f} ± {ci:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
