#!/usr/bin/env python
"""One row per run: name, model, task, world size, generations, first/best/last
reward mean, last held-out reward, median seconds per generation.

  python tools/summarize_run.py RUN_DIR [RUN_DIR ...] [--csv FILE]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from es_mpi.errors import UserError  # noqa: E402
from es_mpi.commands.info import summary  # noqa: E402
from es_mpi.runs.runlog import read_run  # noqa: E402

COLUMNS = ("name", "model", "task", "world_size", "generations", "reward_first", "reward_best", "reward_last",
           "heldout_last", "median_s_per_gen")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    ap.add_argument("--csv", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    try:
        rows = [summary(read_run(d)) for d in args.run_dirs]
        if args.csv:
            with open(args.csv, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(COLUMNS)
                w.writerows([[r[c] for c in COLUMNS] for r in rows])
    except (UserError, OSError) as e:
        print(f"summarize_run: error: {e}", file=sys.stderr)
        return 2
    table = [list(COLUMNS)] + [[_fmt(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
