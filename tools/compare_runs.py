#!/usr/bin/env python
"""Overlay the reward curves of several runs (held-out points in the same
colour), labelled by run directory name.

  python tools/compare_runs.py RUN_DIR [RUN_DIR ...] --out FILE.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from es_mpi.errors import UserError  # noqa: E402
from es_mpi.runs.runlog import read_run  # noqa: E402


def plot(runs: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        name = run["run_dir"].resolve().name
        gen, ev = run["gen"], run["eval"]
        (line,) = ax.plot(gen["generation"], gen["reward_mean"], label=name)
        if len(ev["generation"]):
            ax.plot(ev["generation"], ev["mean_reward"], "o", color=line.get_color(),
                    label=f"{name} (held-out)")
    ax.set_xlabel("generation")
    ax.set_ylabel("mean reward")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    try:
        plot([read_run(d) for d in args.run_dirs], args.out)
    except (UserError, OSError) as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
