#!/usr/bin/env python3
"""Predict seconds per ES generation at scale from unit costs measured by `es-mpi bench`.

    tools/scale_model.py BENCH.json [LOWRANK_BENCH.json] [--out scale.png] [--prompts B]
                         [--tokens L] [--population N] [--antithetic] [--ranks R]

Give one bench JSON per noise kind (es.noise full and lowrank, same machine);
each is plotted, full-rank solid and low-rank dashed.  The model, per rank and
generation (the (member, prompt) grid deals N*B rows to R ranks in balanced
slices, so every rank does the same work and this is the generation time):

    rows     = ceil(N * B / R)                  decode rows per rank
    m        = max(1, ceil(N / R))              members whose rows a rank holds
    K        = N/2 if antithetic else N         noise draws in the update
    full:    t_mat = m * P / r_mat              materialise each member (P normals + cast)
             t_upd = K * P / r_upd              regenerate K draws of P normals, accumulate
    lowrank: t_mat = m * P / r_mat              draw the thin factors (no weight copy; tiny)
             t_upd = K * P / r_upd              K rank-r products into the master (r_upd is
                                                then a memory-bandwidth rate, no normals)
    t_dec    = rows * L / tps(P)                greedy decoding, tps(P) = tps0 * P0 / P
    t_x      = x0 * max(1, log2 R) / max(1, log2 R0)   Allgather (tree latency)
    T        = t_mat + t_dec + t_upd + t_x;   ES efficiency = pure inference / T

pure inference = rows * L / tps_inf(P), the same rows decoded by the unperturbed
model in one batch (the bench's phase (a)).  For low-rank, tps0 already carries
the hooks' extra thin products, measured at the bench's batch.

Unit costs from each bench JSON (measured at P0 parameters on R0 ranks):
    r_mat = members_per_rank * P0 / t_materialise
    r_upd = K0 * P0 / t_update   (update_forced_s when the bench's updates were empty)
    tps0  = decode_tokens_per_s,  tps_inf = tps0 * t_decode / time_inference_s,
    x0    = allgather_latency_s
Decode throughput is assumed inversely proportional to the parameter count
(memory traffic and FLOPs per token both scale with P) and independent of the
batch, which understates low-rank on a GPU, where its larger combined batch
raises throughput.  Use bench JSONs from the hardware you plan for
(tools/gpu_check.sh on a GPU): CPU unit costs say nothing about a GPU.  The
full-rank N x P update is the term that grows with the population on every
rank; the plot marks where it overtakes decoding.
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
    t_upd = bench.get("update_forced_s") or b["t_update"]
    if not t_upd or not bench.get("decode_tokens_per_s") or not b["t_decode"]:
        raise ValueError("bench JSON lacks update/decode timings")
    # low-rank: drawing factors can round to 0 s at a small shape; cap the rate, not divide by 0
    r_mat = bench["members_per_rank"] * P0 / max(b["t_materialise"], 1e-6)
    return {"kind": cfg["es"].get("noise", "full"), "P0": P0, "R0": bench["ranks"], "r_mat": r_mat,
            "r_upd": K0 * P0 / t_upd, "tps0": bench["decode_tokens_per_s"],
            "tps_inf": bench["decode_tokens_per_s"] * b["t_decode"] / bench["time_inference_s"],
            "x0": bench.get("allgather_latency_s", b["t_exchange"])}


def predict(u: dict, P: float, N: int, R: int, B: int, L: int, antithetic: bool) -> dict:
    rows = math.ceil(N * B / R)
    m = max(1, math.ceil(N / R))
    K = N // 2 if antithetic else N
    t_mat = m * P / u["r_mat"]
    t_dec = rows * L / (u["tps0"] * u["P0"] / P)
    t_inf = rows * L / (u["tps_inf"] * u["P0"] / P)
    t_upd = K * P / u["r_upd"]
    t_x = u["x0"] * max(1.0, math.log2(R)) / max(1.0, math.log2(max(u["R0"], 1)))
    total = t_mat + t_dec + t_upd + t_x
    return {"materialise": t_mat, "decode": t_dec, "update": t_upd, "allgather": t_x, "total": total,
            "efficiency": t_inf / total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json", nargs="+", help="one bench JSON per noise kind (full, lowrank)")
    ap.add_argument("--out", default="scale_model.png")
    ap.add_argument("--population", type=int, default=30)
    ap.add_argument("--antithetic", action="store_true")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ranks", type=int, default=32, help="rank count of the efficiency-vs-N panel")
    ap.add_argument("--scaling-population", type=int, default=256,
                    help="population of the seconds-vs-R panel (R runs from 1 to this, at most 256)")
    a = ap.parse_args(argv)
    units = []
    for path in a.bench_json:
        try:
            with open(path) as f:
                units.append(unit_costs(json.load(f)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"scale_model: {path}: not a usable es-mpi bench JSON ({e})", file=sys.stderr)
            return 2
    if len({u["kind"] for u in units}) != len(units):
        print(f"scale_model: {', '.join(a.bench_json)}: give at most one bench JSON per noise kind",
              file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [2 ** i for i in range(9)]            # 1 .. 256
    pops = [8, 16, 32, 64, 128, 256, 512, 1024]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    print(f"{'noise':>7} {'model':>6} {'R':>4} {'N':>5} {'s/gen':>10} {'decode':>9} {'update':>9} {'eff':>6}")
    for u in units:
        style = "-" if u["kind"] == "full" else "--"
        for i, (name, P) in enumerate(SIZES.items()):
            color, label = f"C{i}", f"{name} {u['kind']}"
            ts = [predict(u, P, a.scaling_population, R, a.prompts, a.tokens, a.antithetic)
                  for R in ranks if R <= a.scaling_population]
            ax1.plot(ranks[:len(ts)], [t["total"] for t in ts], style, color=color, marker="o", ms=3, label=label)
            effs = [predict(u, P, N, a.ranks, a.prompts, a.tokens, a.antithetic) for N in pops]
            ax2.plot(pops, [t["efficiency"] for t in effs], style, color=color, marker="o", ms=3, label=label)
            cross = next((N for N, t in zip(pops, effs) if t["update"] > t["decode"]), None)
            if cross:
                ax2.axvline(cross, ls=":", lw=0.8, color=color)
            R = a.ranks
            t = predict(u, P, a.population, R, a.prompts, a.tokens, a.antithetic)
            print(f"{u['kind']:>7} {name:>6} {R:>4} {a.population:>5} {t['total']:>10.1f} "
                  f"{t['decode']:>9.1f} {t['update']:>9.1f} {t['efficiency']:>6.3f}"
                  + (f"   update > decode from N={cross} on {a.ranks} ranks" if cross else ""))
    ax1.set(xscale="log", yscale="log", xlabel="ranks R", ylabel="seconds per generation",
            title=f"N={a.scaling_population}, {a.prompts} prompts x {a.tokens} tokens")
    ax2.set(xscale="log", xlabel="population N", ylabel="ES efficiency (decode / total)", ylim=(0, 1.05),
            title=f"R={a.ranks}; dotted: update overtakes decode")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
