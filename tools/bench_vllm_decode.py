"""Decode speed of generation.backend vllm against hf on one tile, start-up and
prefill taken out: the cost of N_LONG new tokens minus the cost of N_SHORT,
every row decoding to the limit (EOS ignored).

    python tools/bench_vllm_decode.py --config configs/smollm2-135m_countdown.yaml \\
        --rows 128 --threads 1 [--backends hf,vllm,vllm-compiled] [--short 8 --long 64]

Prints one line per backend: engine start, seconds for each length, and
tokens/s of the difference (rows x (long - short) / (t_long - t_short)).
`vllm` is the eager engine, `vllm-compiled` the compiled one
(generation.vllm_mode), both in this process, so one run gives both ratios.
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
    from es_mpi.trainer import load_task, setup_model

    torch.set_num_threads(a.threads)
    cfg = config_mod.load(a.config, ["model.dtype=fp32", f"model.threads={a.threads}", *a.set])
    comm = serial()
    task, train, _ = load_task(cfg)
    # backend hf at set-up: the HF model is loaded in full, so both backends can run in this process
    ld = setup_model(config_mod.with_value(cfg, "generation.backend", "hf"), comm)
    cfg, folder, model, tok, device, weights = ld.cfg, ld.folder, ld.model, ld.tok, ld.device, ld.weights
    ex = [train[i % len(train)] for i in range(a.rows)]
    texts = format_prompts(tok, [e.prompt for e in ex], task.chat_template)
    out = {}
    for name in a.backends.split(","):
        t0 = time.perf_counter()
        if name in ("vllm", "vllm-compiled"):
            from es_mpi.decode.vllm_backend import VLLMBackend
            mode = "compiled" if name == "vllm-compiled" else "eager"
            be = VLLMBackend.open(config_mod.with_value(cfg, "generation.vllm_mode", mode), folder, model, tok,
                                  device, comm, weights)
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
            for m in range(a.writes):   # hf: into the HF model; vllm: from the master into the engine
                t0 = time.perf_counter()
                if name != "hf":
                    be.write_member(weights, noise, 0, member_noise(m, False), 0.001)
                else:
                    weights.materialise(noise, 0, member_noise(m, False), 0.001)
                tw.append(time.perf_counter() - t0)
            weights.restore()
            be.sync_base(weights)
            print(name, "member write s (t_materialise)", [round(x, 3) for x in tw])
        tps = a.rows * (a.long - a.short) / (times[a.long] - times[a.short])
        out[name] = dict(open_s=round(t_open, 2), t_short=round(times[a.short], 2), t_long=round(times[a.long], 2),
                         tokens_per_s=round(tps, 1))
        print(name, json.dumps(out[name]), flush=True)
    for name in ("vllm", "vllm-compiled"):
        if "hf" in out and name in out:
            print(f"{name}/hf decode speed ratio: {out[name]['tokens_per_s'] / out['hf']['tokens_per_s']:.3f}")
    if "vllm" in out and "vllm-compiled" in out:
        print(f"compiled/eager decode speed ratio: "
              f"{out['vllm-compiled']['tokens_per_s'] / out['vllm']['tokens_per_s']:.3f}, start-up "
              f"{out['vllm-compiled']['open_s']:.1f} s vs {out['vllm']['open_s']:.1f} s")


if __name__ == "__main__":
    main()
