#!/usr/bin/env python
"""Plot one run: reward mean with its min-max band and the held-out reward per
generation; the task's "correct" measure (accuracy; for conciseness, whether
the answer still contains the target) held out and in training beside it; and
the seconds of each generation stacked by phase.  Held-out points on the full
set (start, end) are filled, those on the periodic subset open.

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
import numpy as np  # noqa: E402

from es_mpi.errors import UserError  # noqa: E402
from es_mpi.runs.runlog import TIMINGS, read_run  # noqa: E402


def _heldout(ax, ev, y, yerr, label):
    """Held-out points: filled on the full set, open on the periodic subset."""
    n = np.asarray(ev["n_prompts"])
    full = n == n.max()
    for sel, face, what in ((full, None, f"{label}, full set"), (~full, "none", f"{label}, subset")):
        if sel.any():
            ax.errorbar(np.asarray(ev["generation"])[sel], np.asarray(y)[sel], yerr=np.asarray(yerr)[sel],
                        fmt="o", mfc=face, capsize=3, label=f"{what} (95% CI)")


def plot(run: dict, out: Path) -> None:
    gen, ev = run["gen"], run["eval"]
    x = gen["generation"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 9.5), sharex=True)
    ax1.fill_between(x, gen["reward_min"], gen["reward_max"], alpha=0.25, label="members min-max")
    ax1.plot(x, gen["reward_mean"], label="mean reward (population)")
    have_eval = len(ev["generation"]) > 0
    if have_eval:
        _heldout(ax1, ev, ev["mean_reward"], ev["ci95"], "held-out reward")
    ax1.set_ylabel("reward")
    ax1.set_title(f"{run['run_dir'].resolve().name}: {run['config'].task.name} on {run['config'].model.path}")
    ax1.legend(loc="best", fontsize="small")
    # "correct" in training: the population's mean over members and prompts.
    correct = np.asarray(gen["correct"], dtype=np.float64)
    if correct.size:
        ax2.plot(x, np.nanmean(correct.reshape(len(x), -1), axis=1), color="C0", alpha=0.6,
                 label="correct (population, training prompts)")
    if have_eval:
        acc, n = np.asarray(ev["accuracy"]), np.maximum(np.asarray(ev["n_prompts"]), 1)
        ci = 1.96 * np.sqrt(acc * (1 - acc) / n)  # normal approximation, as for the reward
        _heldout(ax2, ev, acc, ci, "held-out correct")
    ax2.set_ylabel("correct (accuracy)")
    ax2.set_ylim(-0.02, 1.02)
    ax2.legend(loc="best", fontsize="small")
    phases = [t for t in TIMINGS if t != "t_total"]
    ax3.stackplot(x, *[gen[t] for t in phases], labels=[t[2:] for t in phases])
    ax3.set_xlabel("generation (updates done before it)")
    ax3.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax3.set_ylabel("seconds (rank 0)")
    ax3.legend(loc="upper left", fontsize="small", ncol=3)
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
