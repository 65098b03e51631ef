#!/usr/bin/env python3
"""Predict seconds per ES generation at scale from unit costs measured by `es-mpi bench`.

    tools/scale_model.py BENCH.json [--out scale.png] [--prompts B] [--tokens L]
                         [--population N] [--antithetic] [--ranks R]

The model (per rank, per generation; every rank does the same work, so this
is the generation time):

    k        = ceil(N / R)                      members per rank
    K        = N/2 if antithetic else N         noise draws the update regenerates
    t_mat    = k * P / r_mat                    materialise members (draw P normals + cast)
    t_dec    = k * B * L / tps(P)               greedy decoding, tps(P) = tps0 * P0 / P
    t_upd    = K * P / r_upd                    regenerate all K draws and accumulate
    t_x      = x0 * max(1, log2 R) / max(1, log2 R0)   Allgather (tree latency)
    T        = t_mat + t_dec + t_upd + t_x
    pure inference = t_dec;   ES efficiency = t_dec / T

Unit costs from the bench JSON (measured at P0 parameters on R0 ranks):
    r_mat = members_per_rank * P0 / t_materialise
    r_upd = K0 * P0 / t_update
    tps0  = decode_tokens_per_s,   x0 = allgather_latency_s (the collective
            alone; older bench files: t_exchange, which includes waiting)
Decode throughput is assumed inversely proportional to the parameter count
(both the memory traffic and the FLOPs per token scale with P); noise and
update rates are per parameter and do not depend on P.  Use a bench JSON from
the hardware you plan for (tools/gpu_check.sh on a GPU): CPU unit costs say
nothing about a GPU.  The N x P update is the term that grows with the
population on every rank; the plot marks where it overtakes decoding.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

SIZES = {"0.5B": 0.49e9, "1.5B": 1.54e9, "3B": 3.09e9, "7B": 7.6e9, "8B": 8.0e9}


def unit_costs(bench: dict) -> dict:
    cfg = bench["config"]
    P0 = bench["n_params"]
    K0 = cfg["es"]["population"] // (2 if cfg["es"]["antithetic"] else 1)
    b = bench["breakdown_s"]
    if not b["t_update"] or not b["t_materialise"] or not bench.get("decode_tokens_per_s"):
        raise ValueError("bench JSON lacks update/materialise/decode timings (was the update empty?)")
    return {"P0": P0, "R0": bench["ranks"], "r_mat": bench["members_per_rank"] * P0 / b["t_materialise"],
            "r_upd": K0 * P0 / b["t_update"], "tps0": bench["decode_tokens_per_s"],
            "x0": bench.get("allgather_latency_s", b["t_exchange"])}


def predict(u: dict, P: float, N: int, R: int, B: int, L: int, antithetic: bool) -> dict:
    k = math.ceil(N / R)
    K = N // 2 if antithetic else N
    t_mat = k * P / u["r_mat"]
    t_dec = k * B * L / (u["tps0"] * u["P0"] / P)
    t_upd = K * P / u["r_upd"]
    t_x = u["x0"] * max(1.0, math.log2(R)) / max(1.0, math.log2(max(u["R0"], 1)))
    total = t_mat + t_dec + t_upd + t_x
    return {"materialise": t_mat, "decode": t_dec, "update": t_upd, "allgather": t_x, "total": total,
            "efficiency": t_dec / total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json")
    ap.add_argument("--out", default="scale_model.png")
    ap.add_argument("--population", type=int, default=30)
    ap.add_argument("--antithetic", action="store_true")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ranks", type=int, default=32, help="rank count of the efficiency-vs-N panel")
    ap.add_argument("--scaling-population", type=int, default=256,
                    help="population of the seconds-vs-R panel (R runs from 1 to this, at most 256)")
    a = ap.parse_args(argv)
    try:
        with open(a.bench_json) as f:
            u = unit_costs(json.load(f))
    except (OSError, ValueError, KeyError) as e:
        print(f"scale_model: {a.bench_json}: not a usable es-mpi bench JSON ({e})", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [2 ** i for i in range(9)]            # 1 .. 256
    pops = [8, 16, 32, 64, 128, 256, 512, 1024]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    print(f"{'model':>6} {'R':>4} {'N':>5} {'s/gen':>10} {'decode':>9} {'update':>9} {'eff':>6}")
    for name, P in SIZES.items():
        ts = [predict(u, P, a.scaling_population, R, a.prompts, a.tokens, a.antithetic)
              for R in ranks if R <= a.scaling_population]
        ax1.plot(ranks[:len(ts)], [t["total"] for t in ts], marker="o", label=name)
        effs = [predict(u, P, N, a.ranks, a.prompts, a.tokens, a.antithetic) for N in pops]
        ax2.plot(pops, [t["efficiency"] for t in effs], marker="o", label=name)
        cross = next((N for N, t in zip(pops, effs) if t["update"] > t["decode"]), None)
        if cross:
            ax2.axvline(cross, ls=":", lw=0.8, color=ax2.lines[-1].get_color())
        t = predict(u, P, a.population, min(a.ranks, a.population), a.prompts, a.tokens, a.antithetic)
        print(f"{name:>6} {min(a.ranks, a.population):>4} {a.population:>5} {t['total']:>10.1f} "
              f"{t['decode']:>9.1f} {t['update']:>9.1f} {t['efficiency']:>6.3f}"
              + (f"   update > decode from N={cross} on {a.ranks} ranks" if cross else ""))
    ax1.set(xscale="log", yscale="log", xlabel="ranks R", ylabel="seconds per generation",
            title=f"N={a.scaling_population}, {a.prompts} prompts x {a.tokens} tokens")
    ax2.set(xscale="log", xlabel="population N", ylabel="ES efficiency (decode / total)", ylim=(0, 1.05),
            title=f"R={a.ranks}; dotted: update overtakes decode")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
