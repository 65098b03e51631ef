"""`es-mpi info` and the numbers tools/ print: a run summarised from its log
(read through runlog.read_run, so it works while the run is written)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..runs import checkpoint
from .. import config as config_mod
from ..engine.noise_id import fingerprint_of, fingerprint_short
from ..runs.runlog import TIMINGS, read_run


def _first_best_last(x: np.ndarray) -> tuple[float, float, float]:
    x = np.asarray(x, dtype=np.float64)
    if not x.size or not np.isfinite(x).any():
        return (math.nan,) * 3
    return float(x[0]), float(np.nanmax(x)), float(x[-1])


def summary(run: dict) -> dict[str, Any]:
    """One flat row per run (tools/summarize_run.py writes these as CSV)."""
    cfg, gen, ev, attrs = run["config"], run["gen"], run["eval"], run["attrs"]
    first, best, last = _first_best_last(gen["reward_mean"])
    held = ev["mean_reward"]
    times = {t: float(np.median(gen[t])) if len(gen[t]) else math.nan for t in TIMINGS}
    return {
        "name": Path(run["run_dir"]).resolve().name, "model": cfg.model.path, "task": cfg.task.name,
        "world_size": int(attrs.get("world_size", 0)), "generations": int(len(gen["generation"])),
        "generations_planned": cfg.es.generations,
        "reward_first": first, "reward_best": best, "reward_last": last,
        "best_generation": int(np.nanargmax(gen["reward_mean"])) if np.isfinite(best) else -1,
        "heldout_first": float(held[0]) if len(held) else math.nan,
        "heldout_last": float(held[-1]) if len(held) else math.nan,
        "heldout_accuracy_first": float(ev["accuracy"][0]) if len(held) else math.nan,
        "heldout_accuracy_last": float(ev["accuracy"][-1]) if len(held) else math.nan,
        "heldout_n_first": int(ev["n_prompts"][0]) if len(held) else 0,
        "heldout_n_last": int(ev["n_prompts"][-1]) if len(held) else 0,
        "heldout_first_gen": int(ev["generation"][0]) if len(held) else -1,
        "heldout_last_gen": int(ev["generation"][-1]) if len(held) else -1,
        "median_s_per_gen": times["t_total"], **{f"median_{t}": v for t, v in times.items() if t != "t_total"},
    }


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def info_lines(run_dir: str | Path) -> list[str]:
    run = read_run(run_dir)
    s, cfg, attrs = summary(run), run["config"], run["attrs"]
    d = Path(run_dir)
    changed = config_mod.diff(config_mod.Config(), cfg)
    flat = {f"{sec}.{k}": v for sec, kv in cfg.to_dict().items() for k, v in kv.items()}
    ckpts = checkpoint.list_complete(d)
    newest = checkpoint.latest(d)
    log_size = run["path"].stat().st_size
    lines = [
        f"run          {d}",
        f"model        {cfg.model.path} ({int(attrs.get('n_params', 0)):,} parameters, working dtype "
        f"{cfg.model.dtype})",
        f"task         {cfg.task.name}",
        f"noise        {attrs.get('noise_scheme', 'blake2b-tensor')}, drawn as "
        f"{fingerprint_short(fingerprint_of(attrs))}",
        f"world size   {s['world_size']} rank(s) x {int(attrs.get('threads_per_rank', 0))} thread(s) "
        f"on {attrs.get('hosts', '?')}",
        "config       " + ("differs from defaults in " + ", ".join(f"{k}={flat[k]!r}" for k in changed)
                             if changed else "all defaults"),
        f"generations  {s['generations']} done of {s['generations_planned']}",
        f"reward mean  first {s['reward_first']:.4f}, best {s['reward_best']:.4f} (gen {s['best_generation']}), "
        f"last {s['reward_last']:.4f}",
    ]
    if s["heldout_first_gen"] >= 0:
        lines.append(f"held-out     reward first {s['heldout_first']:.4f} (gen {s['heldout_first_gen']}), "
                     f"last {s['heldout_last']:.4f} (gen {s['heldout_last_gen']})")
        lines.append(f"held-out     accuracy first {s['heldout_accuracy_first']:.3f} (n={s['heldout_n_first']}), "
                     f"last {s['heldout_accuracy_last']:.3f} (n={s['heldout_n_last']})")
    else:
        lines.append("held-out     none")
    if newest is not None:
        lines.append(f"checkpoint   {newest} ({dict((p, g) for g, p in ckpts)[newest]} generations done; "
                     f"{len(ckpts)} kept)")
    else:
        lines.append("checkpoint   none")
    parts = ", ".join(f"{t[2:]} {s['median_' + t]:.3f}" for t in TIMINGS if t != "t_total")
    lines.append(f"time         median {s['median_s_per_gen']:.3f} s/generation ({parts})")
    size = f"size         log.h5 {_size(log_size)}"
    if newest is not None:
        ck = newest.stat().st_size
        size += (f"; a checkpoint {_size(ck)} (the log is {100 * log_size / ck:.1f}% of it and "
                 "`es-mpi replay` rebuilds any generation from it)")
    lines.append(size)
    return lines
