"""Decode speed of generation.backend vllm against hf on one tile, start-up and
prefill taken out: the cost of N_LONG new tokens minus the cost of N_SHORT,
every row decoding to the limit (EOS ignored).

    python tools/bench_vllm_decode.py --config configs/smollm2-135m_countdown.yaml \\
        --rows 128 --threads 1 [--backends hf,vllm,vllm-compiled] [--short 8 --long 64] [--repeat 3]

Every backend is opened in this process (`vllm` is the eager engine,
`vllm-compiled` the compiled one: generation.vllm_mode; `plain` is what a
user would otherwise run, a plain greedy HF `model.generate` of the whole
tile on the model loaded straight by `from_pretrained`), then timed in
rounds, the backends in turn in each round.  Prints per round and backend the
seconds for each length and tokens/s of the difference (rows x (long -
short) / (t_long - t_short)), then per backend its start-up and median, and
the median of the per-round ratios (vllm/hf, vllm-compiled/hf,
vllm-compiled/vllm, and each against plain).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class PlainGenerate:
    """The baseline a user would run: HF `model.generate`, one batch, greedy."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    def decode(self, texts, max_new_tokens, ignore_eos=False):
        from types import SimpleNamespace

        from es_mpi.commands.bench import plain_generate

        ids, _ = plain_generate(self.model, self.tok, list(texts), max_new_tokens, ignore_eos=ignore_eos)
        return [SimpleNamespace(n_tokens=len(x)) for x in ids]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2-135m_countdown.yaml")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=64)
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--writes", type=int, default=0, help="also time this many member writes (t_materialise)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of timings, the backends in turn in each")
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
    names = a.backends.split(",")
    bes, opened = {}, {}
    for name in names:   # every engine opened first: the timings below interleave them
        t0 = time.perf_counter()
        if name in ("vllm", "vllm-compiled"):
            from es_mpi.decode.vllm_backend import VLLMBackend
            mode = "compiled" if name == "vllm-compiled" else "eager"
            bes[name] = VLLMBackend.open(config_mod.with_value(cfg, "generation.vllm_mode", mode), folder, model,
                                         tok, device, comm, weights)
        elif name == "plain":
            from es_mpi.model import load_straight
            bes[name] = PlainGenerate(load_straight(folder, cfg.model.dtype, device, weights.master), tok)
        else:
            bes[name] = HFBackend(model, tok)
        opened[name] = time.perf_counter() - t0
        bes[name].decode(texts[:4], 4, ignore_eos=True)       # warm-up
    # Round r times every backend once, in turn: a slow spell of this shared
    # machine hits all of them in the same round, and the median of the
    # per-round ratios is the figure (one run's ratio moved 0.89-1.24 here).
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.repeat):
        for name in names:
            times = {}
            for n in (a.short, a.long):
                t0 = time.perf_counter()
                comps = bes[name].decode(texts, n, ignore_eos=True)
                times[n] = time.perf_counter() - t0
                assert all(c.n_tokens == n for c in comps), [c.n_tokens for c in comps][:8]
            rates[name].append(a.rows * (a.long - a.short) / (times[a.long] - times[a.short]))
            print(f"round {r + 1} {name}: {times[a.short]:.2f} s / {times[a.long]:.2f} s -> "
                  f"{rates[name][-1]:.1f} tokens/s", flush=True)
    if a.writes:
        from es_mpi.engine.noise import NoiseSource, member_noise
        noise = NoiseSource(0, device)
        for name in (n for n in names if n != "plain"):   # plain generate has no members
            tw = []
            for m in range(a.writes):   # hf: into the HF model; vllm: from the master into the engine
                t0 = time.perf_counter()
                if name != "hf":
                    bes[name].write_member(weights, noise, 0, member_noise(m, False), 0.001)
                else:
                    weights.materialise(noise, 0, member_noise(m, False), 0.001)
                tw.append(time.perf_counter() - t0)
            weights.restore()
            bes[name].sync_base(weights)
            print(name, "member write s (t_materialise)", [round(x, 3) for x in tw])
    med = statistics.median
    for name in names:
        print(name, json.dumps(dict(open_s=round(opened[name], 2), tokens_per_s=[round(x, 1) for x in rates[name]],
                                    median_tokens_per_s=round(med(rates[name]), 1))), flush=True)
    pairs = ([(n, "hf") for n in ("vllm", "vllm-compiled")] + [("vllm-compiled", "vllm")]
             + [(n, "plain") for n in ("hf", "vllm", "vllm-compiled")])
    for x, y in pairs:
        if x in rates and y in rates:
            per_round = [u / v for u, v in zip(rates[x], rates[y])]
            print(f"{x}/{y} decode speed ratio: median {med(per_round):.3f} over {len(per_round)} rounds "
                  f"({', '.join(f'{q:.3f}' for q in per_round)}); start-up {opened[x]:.1f} s vs {opened[y]:.1f} s")


if __name__ == "__main__":
    main()
