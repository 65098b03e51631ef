#!/usr/bin/env python
"""Plot one run: reward mean with its min-max band and the held-out points per
generation, and the seconds of each generation stacked by phase.

  python tools/plot_run.py RUN_DIR [--out FILE.png]     (default RUN_DIR/plot.png)

Reads only through es_mpi.runs.runlog, so it works on a run still being written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from es_mpi.errors import UserError  # noqa: E402
from es_mpi.runs.runlog import TIMINGS, read_run  # noqa: E402


def plot(run: dict, out: Path) -> None:
    gen, ev = run["gen"], run["eval"]
    x = gen["generation"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax1.fill_between(x, gen["reward_min"], gen["reward_max"], alpha=0.25, label="members min-max")
    ax1.plot(x, gen["reward_mean"], label="mean reward (population)")
    if len(ev["generation"]):
        ax1.errorbar(ev["generation"], ev["mean_reward"], yerr=ev["ci95"], fmt="o", capsize=3,
                     label="held-out (95% CI)")
    ax1.set_ylabel("reward")
    ax1.set_title(f"{run['run_dir'].resolve().name}: {run['config'].task.name} on {run['config'].model.path}")
    ax1.legend(loc="best", fontsize="small")
    phases = [t for t in TIMINGS if t != "t_total"]
    ax2.stackplot(x, *[gen[t] for t in phases], labels=[t[2:] for t in phases])
    ax2.set_xlabel("generation (updates done before it)")
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.set_ylabel("seconds (rank 0)")
    ax2.legend(loc="upper left", fontsize="small", ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="PNG to write (default RUN_DIR/plot.png)")
    args = ap.parse_args(argv)
    try:
        run = read_run(args.run_dir)
        out = args.out or args.run_dir / "plot.png"
        plot(run, out)
    except (UserError, OSError) as e:
        print(f"plot_run: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
