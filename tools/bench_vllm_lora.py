"""Low-rank ES decoding, same work three ways (issue 18's CPU figure):

  vllm-lora   vLLM, one rank-r LoRA adapter per member (decode.vllm_lora),
              all rows in one generate call
  vllm-base   the same rows on an engine without LoRA (pure inference)
  hf-hooks    es-mpi's decoder with the low-rank hooks (engine.lowrank)

Each mode runs in its own process (one vLLM engine per process), one after
the other, from one invocation:

  .venv-vllm/bin/python tools/bench_vllm_lora.py MODEL_FOLDER [--members 8 --prompts 16 --tokens 64 --rank 1]

Timed: the decode of the whole tile (best of --repeat, wall and process
CPU time: on a shared, loaded CPU the CPU time is the fairer figure), every
row to --tokens new tokens (EOS ignored); engine start and the adapters' build and
registration are reported apart.  One thread per process."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"Using the numbers {a}, {b} and {c}, write an equation that equals {a + b * c}. Think step by step."
           for a, b, c in [(3, 5, 7), (2, 9, 4), (8, 1, 6), (4, 4, 9), (7, 3, 2), (6, 8, 5), (9, 2, 3), (5, 6, 1),
                           (1, 7, 8), (3, 3, 3), (2, 5, 9), (8, 6, 4), (4, 9, 2), (7, 1, 5), (6, 2, 8), (9, 7, 6)]]


def run_mode(a) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    from es_mpi.decode import decode_batch
    from es_mpi.engine.lowrank import LowRank
    from es_mpi.engine.noise import NoiseSource
    from es_mpi.engine.weights import Weights
    from es_mpi.model import load_model, load_tokenizer

    tok = load_tokenizer(Path(a.folder))
    prompts = (PROMPTS * (a.prompts // len(PROMPTS) + 1))[: a.prompts]
    members = list(range(a.members))
    mem = [m for m in members for _ in prompts]
    texts = [p for _ in members for p in prompts]
    es = SimpleNamespace(sigma=1e-3, rank=a.rank, antithetic=True, lowrank_scope="layers", noise="lowrank")
    out = dict(mode=a.mode, rows=len(texts), tokens=a.tokens, rank=a.rank)
    model, master = load_model(Path(a.folder), "fp32", "cpu")
    weights = Weights(model, master=master)
    lr = LowRank(model, weights, NoiseSource(0), es)
    lr.begin(0, members)
    times, cpu = [], []
    if a.mode == "hf-hooks":
        for _ in range(a.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            comps = decode_batch(model, tok, texts, a.tokens, rows=lr.tile(mem), ignore_eos=True)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out["generated"] = sum(len(c.ids) for c in comps)
    else:
        from vllm import LLM, SamplingParams

        from es_mpi.decode.vllm_lora import MemberAdapters, engine_lora_args, register_lowrank

        lora = engine_lora_args(a.rank, a.members, a.members) if a.mode == "vllm-lora" else {}
        t0 = time.perf_counter()
        llm = LLM(model=a.folder, dtype="float32", enforce_eager=True, tensor_parallel_size=1, seed=0,
                  max_model_len=512, enable_prefix_caching=False, max_num_seqs=len(texts), **lora)
        out["t_engine_start"] = time.perf_counter() - t0
        ids = [{"prompt_token_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
        sp = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True, detokenize=False)
        reqs = None
        if a.mode == "vllm-lora":
            ad = MemberAdapters(llm)
            t0 = time.perf_counter()
            register_lowrank(ad, lr, 0, members)
            out["t_register"] = time.perf_counter() - t0
            reqs = ad.requests(mem)
        for _ in range(a.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            res = llm.generate(ids, sp, lora_request=reqs, use_tqdm=False)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out["generated"] = sum(len(r.outputs[0].token_ids) for r in res)
    out["t_decode"] = min(times)
    out["t_all"] = times
    out["t_cpu"] = min(cpu)              # process CPU time: what a shared, loaded CPU does not inflate
    out["tok_s"] = out["generated"] / out["t_decode"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--mode", default="")
    a = ap.parse_args()
    if a.mode:
        print("RESULT " + json.dumps(run_mode(a)), flush=True)
        return
    res = {}
    for mode in ("vllm-base", "vllm-lora", "hf-hooks"):
        cmd = [sys.executable, __file__, a.folder, "--mode", mode] + [
            f"--{k}={getattr(a, k)}" for k in ("members", "prompts", "tokens", "rank", "repeat")]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            sys.exit(f"{mode} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        res[mode] = json.loads(line[-1][7:])
        print(json.dumps(res[mode]), flush=True)
    for key, what in (("t_decode", "wall"), ("t_cpu", "cpu")):
        b, l, h = res["vllm-base"][key], res["vllm-lora"][key], res["hf-hooks"][key]
        print(f"{what}: rows {res['vllm-lora']['rows']} x {a.tokens} tokens, rank {a.rank}: "
              f"vllm-lora {l:.1f} s, vllm-base {b:.1f} s, hf-hooks {h:.1f} s; "
              f"lora/base throughput {b / l:.2f}, lora/hf-hooks throughput {h / l:.2f}")
    print(f"adapters built+registered in {res['vllm-lora']['t_register']:.3f} s")


if __name__ == "__main__":
    main()
