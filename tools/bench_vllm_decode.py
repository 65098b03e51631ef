"""Decode speed of generation.backend vllm against hf on one tile, start-up and
prefill taken out: the cost of N_LONG new tokens minus the cost of N_SHORT,
every row decoding to the limit (EOS ignored).

    python tools/bench_vllm_decode.py --config configs/smollm2-135m_countdown.yaml \\
        --rows 128 --threads 1 [--backends hf,vllm] [--short 8 --long 64]

Prints one line per backend: seconds for each length, and tokens/s of the
difference (rows x (long - short) / (t_long - t_short)).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2-135m_countdown.yaml")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=64)
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--writes", type=int, default=0, help="also time this many member writes (t_materialise)")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()

    import torch

    from es_mpi import config as config_mod
    from es_mpi.comm import serial
    from es_mpi.decode import format_prompts
    from es_mpi.decode.backend import HFBackend
    from es_mpi.engine.weights import Weights
    from es_mpi.trainer import load_task, setup_model

    torch.set_num_threads(a.threads)
    cfg = config_mod.load(a.config, ["model.dtype=fp32", f"model.threads={a.threads}", *a.set])
    comm = serial()
    task, train, _ = load_task(cfg)
    cfg, folder, model, master, tok, device, _ = setup_model(cfg, comm)
    weights = Weights(model, master=master)
    ex = [train[i % len(train)] for i in range(a.rows)]
    texts = format_prompts(tok, [e.prompt for e in ex], task.chat_template)
    out = {}
    for name in a.backends.split(","):
        t0 = time.perf_counter()
        if name == "vllm":
            from es_mpi.decode.vllm_backend import VLLMBackend
            be = VLLMBackend.open(cfg, folder, model, tok, device, comm, weights)
        else:
            be = HFBackend(model, tok)
        t_open = time.perf_counter() - t0
        be.decode(texts[:4], 4, ignore_eos=True)       # warm-up
        times = {}
        for n in (a.short, a.long):
            t0 = time.perf_counter()
            comps = be.decode(texts, n, ignore_eos=True)
            times[n] = time.perf_counter() - t0
            assert all(c.n_tokens == n for c in comps), [c.n_tokens for c in comps][:8]
        if a.writes:
            from es_mpi.engine.noise import NoiseSource, member_noise
            noise, tw = NoiseSource(0, device), []
            for m in range(a.writes):
                t0 = time.perf_counter()
                weights.materialise(noise, 0, member_noise(m, False), 0.001)
                t1 = time.perf_counter()
                be.write_working(weights)
                tw.append((t1 - t0, time.perf_counter() - t1))
            weights.restore()
            be.sync_base(weights)
            print(name, "materialise s", [round(x, 3) for x, _ in tw], "engine write s", [round(y, 3) for _, y in tw])
        tps = a.rows * (a.long - a.short) / (times[a.long] - times[a.short])
        out[name] = dict(open_s=round(t_open, 2), t_short=round(times[a.short], 2), t_long=round(times[a.long], 2),
                         tokens_per_s=round(tps, 1))
        print(name, json.dumps(out[name]), flush=True)
    if "hf" in out and "vllm" in out:
        print(f"vllm/hf decode speed ratio: {out['vllm']['tokens_per_s'] / out['hf']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
