"""`es-mpi bench`: ES against pure inference, measured in one run.

One invocation, same model, prompts, decode settings and members per rank:
  (a) pure inference: each rank decodes its members' prompt batch with the
      unperturbed model, no ES;
  (b) full ES generations through the trainer's own `step` (materialise,
      decode, score, Allgather, update, digest check).
ES efficiency = time(a) / time(b) per generation (the limit is 1.0).  Timings
are wall seconds on rank 0, whose generation time includes waiting for the
slowest rank in the Allgather; (a) takes the slowest rank's time.

Also: noise throughput against a copy of the same size (memory bandwidth),
peak RSS per rank in each phase (sampled every 5 ms), decode against a plain
`model.generate` on the same batch, tokens saved by stop strings, and with
--compare-ranks the same generations on one rank (parallel efficiency, and a
check that the weights come out bit-identical).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .comm import Comm, serial
from .generation import _greedy_config, decode, format_prompts
from .noise import prompt_batch
from .trainer import Trainer

PHASES = ("t_materialise", "t_decode", "t_reward", "t_exchange", "t_update", "t_digest")


class PeakRSS:
    """Peak resident set size over a phase, sampled from /proc/self/statm."""

    def __init__(self, period: float = 0.005):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.period)

    def __enter__(self):
        self.peak = self._rss()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def _timed(fn, *args, **kw):
    """(result, wall seconds of one call)."""
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def noise_throughput(trainer: Trainer) -> dict:
    """One full draw of noise (P normals) vs a copy of P floats."""
    w = trainer.weights
    _, t_noise = _timed(w.draw, trainer.noise, 0, 0)
    src = torch.cat([m.view(-1) for m in w.master])
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch outside the timing
    _, t_copy = _timed(dst.copy_, src)
    n = w.n_params
    return {"normals_per_s": n / t_noise, "copy_bytes_per_s": 2 * 4 * n / t_copy,
            "noise_bytes_over_copy_bandwidth": (4 * n / t_noise) / (2 * 4 * n / t_copy)}


def allgather_latency(trainer: Trainer, comm: Comm, calls: int = 20) -> float:
    """The exchange's own cost: the trainer's Allgather (same buffer size),
    each call after a barrier so no rank waits for another; the median of
    `calls`.  The trainer's t_exchange also holds the wait for the slowest
    rank, which is load imbalance, not communication."""
    buf = np.zeros(1 + 3 * trainer.slot)
    times = []
    for _ in range(calls):
        comm.barrier()
        times.append(_timed(comm.allgather_floats, buf)[1])
    return float(np.median(times))


def decode_vs_generate(trainer: Trainer, texts: list[str]) -> dict:
    """Our decode (stop strings, EOS cut) vs a plain greedy model.generate, same batch."""
    cfg, model, tok = trainer.cfg, trainer.model, trainer.tok
    mnt = cfg.generation.max_new_tokens
    # one call each: phases (a) and (b) have already decoded this very batch, so
    # the one-off warm-up of a new batch shape is paid (a full-workload decode
    # is ~3 min here, so a best-of-2 would add minutes)
    ours, t_ours = _timed(decode, model, tok, texts, mnt, trainer.task.stop_strings, cfg.generation.batch_size)
    if trainer.task.stop_strings:
        nostop, t_nostop = _timed(decode, model, tok, texts, mnt, (), cfg.generation.batch_size)
    else:  # the same decode again would only cost time (minutes on the full bench workload)
        nostop, t_nostop = ours, t_ours
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(trainer.device)
    with torch.no_grad():
        _, t_plain = _timed(model.generate, **enc, generation_config=_greedy_config(model, tok, mnt))
    return {"decode_s": t_ours, "plain_generate_s": t_plain, "decode_over_plain": t_plain / t_ours,
            "tokens_with_stop": sum(c.n_tokens for c in ours),
            "tokens_without_stop": sum(c.n_tokens for c in nostop),
            "decode_no_stop_s": t_nostop}


def pure_inference(trainer: Trainer, gen: int) -> float:
    """(a): this rank's members' decodes with the unperturbed model."""
    es = trainer.cfg.es
    idx = prompt_batch(es.seed, gen, len(trainer.train_set), es.prompts_per_generation)
    texts = format_prompts(trainer.tok, [trainer.train_set[i].prompt for i in idx], trainer.chat)
    trainer.weights.restore()
    t0 = time.perf_counter()
    for _ in trainer.members:
        decode(trainer.model, trainer.tok, texts, trainer.cfg.generation.max_new_tokens,
               trainer.task.stop_strings, trainer.cfg.generation.batch_size)
    return time.perf_counter() - t0


def run_bench(cfg, comm: Comm, generations: int = 1, compare_ranks: bool = False) -> dict:
    tmp = comm.bcast_json(tempfile.mkdtemp(prefix="es-mpi-bench-") if comm.is_root else None)
    try:
        trainer = Trainer(cfg, comm, Path(tmp) / "run")
        trainer.begin()
        res = {"config": cfg.to_dict(), "ranks": comm.size, "threads_per_rank": trainer.threads,
               "n_params": trainer.weights.n_params, "members_per_rank": len(trainer.members),
               "generations": generations}
        master_bytes = 4 * trainer.weights.n_params
        t_a, t_b, phases, tokens = [], [], {p: 0.0 for p in PHASES}, 0.0
        cuda = torch.device(trainer.device).type == "cuda"
        gpu_peak = []
        with PeakRSS() as peak_a:
            if cuda:
                torch.cuda.reset_peak_memory_stats(trainer.device)
            for g in range(generations):
                mine = pure_inference(trainer, g)
                t_a.append(float(comm.allgather_floats(np.array([mine]))[:, 0].max()))
            if cuda:
                gpu_peak.append(torch.cuda.max_memory_allocated(trainer.device))
        with PeakRSS() as peak_b:
            if cuda:
                torch.cuda.reset_peak_memory_stats(trainer.device)
            for g in range(generations):
                trainer.step(g)
                t_b.append(trainer.last_times["t_total"])
                tokens += trainer.last_times["tokens"]
                for p in PHASES:
                    phases[p] += trainer.last_times[p] / generations
            if cuda:
                gpu_peak.append(torch.cuda.max_memory_allocated(trainer.device))
        total_b = float(np.mean(t_b))
        res.update({
            "time_inference_s": float(np.mean(t_a)), "time_es_s": total_b,
            "es_efficiency": float(np.mean(t_a)) / total_b,
            "breakdown_s": phases, "breakdown_share": {p: v / total_b for p, v in phases.items()},
            "noise": noise_throughput(trainer),
            "allgather_latency_s": allgather_latency(trainer, comm),
            "decode_tokens_per_s": tokens / (phases["t_decode"] * generations) if phases["t_decode"] else 0.0,
        })
        if gpu_peak:
            res["gpu_peak_bytes_inference"], res["gpu_peak_bytes_es"] = gpu_peak
        peaks = comm.allgather_floats(np.array([peak_a.peak, peak_b.peak]))
        res["peak_rss_inference_bytes"] = peaks[:, 0].tolist()  # includes the resident master
        res["peak_rss_es_bytes"] = peaks[:, 1].tolist()
        res["master_bytes"] = master_bytes
        res["peak_es_over_inference_plus_master"] = float(np.max(peaks[:, 1] / peaks[:, 0]))
        digest_r = trainer.weights.digest()
        if comm.is_root:
            es = cfg.es
            idx = prompt_batch(es.seed, 0, len(trainer.train_set), es.prompts_per_generation)
            texts = format_prompts(trainer.tok, [trainer.train_set[i].prompt for i in idx], trainer.chat)
            res["decode"] = decode_vs_generate(trainer, texts)
        trainer.out.close()
        if compare_ranks and comm.size > 1:
            if comm.is_root:
                one = Trainer(cfg, serial(), Path(tmp) / "run1")
                one.begin()
                t1 = []
                for g in range(generations):
                    one.step(g)
                    t1.append(one.last_times["t_total"])
                one.out.close()
                res["time_es_1rank_s"] = float(np.mean(t1))
                res["parallel_efficiency"] = res["time_es_1rank_s"] / (comm.size * total_b)
                res["same_weights_1_vs_R_ranks"] = one.weights.digest() == digest_r
            comm.barrier()
        return res
    finally:
        comm.barrier()
        if comm.is_root:
            shutil.rmtree(tmp, ignore_errors=True)


def format_table(res: dict) -> str:
    b, sh = res["breakdown_s"], res["breakdown_share"]
    gib = 1024 ** 3
    rows = [
        ("ranks x threads", f"{res['ranks']} x {res['threads_per_rank']}"),
        ("parameters", f"{res['n_params']:,}"),
        ("members per rank", str(res["members_per_rank"])),
        ("(a) pure inference s/gen", f"{res['time_inference_s']:.3f}"),
        ("(b) ES s/gen", f"{res['time_es_s']:.3f}"),
        ("ES efficiency (a)/(b)", f"{res['es_efficiency']:.3f}"),
    ]
    label = {"t_exchange": "exchange (incl. wait for slowest rank)"}
    rows += [(f"  {label.get(p, p[2:])}", f"{b[p]:.3f} s  {100 * sh[p]:6.2f} %") for p in PHASES]
    lat = res["allgather_latency_s"]
    rows += [("Allgather alone (same buffer)", f"{1e3 * lat:.3f} ms  {100 * lat / res['time_es_s']:.2g} %")]
    if b["t_update"] == 0:
        rows += [("  WARNING", "no update was timed: every shaped score was 0 (choose a task with varied rewards)")]
    n = res["noise"]
    rows += [("decode tokens/s (ES phase, rank 0)", f"{res['decode_tokens_per_s']:.1f}")]
    if "gpu_peak_bytes_es" in res:
        rows += [("GPU peak inference / ES", f"{res['gpu_peak_bytes_inference'] / gib:.2f} / "
                                             f"{res['gpu_peak_bytes_es'] / gib:.2f} GiB")]
    rows += [("noise normals/s", f"{n['normals_per_s'] / 1e6:.1f} M/s"),
             ("copy bandwidth", f"{n['copy_bytes_per_s'] / 1e9:.2f} GB/s"),
             ("noise bytes / copy bandwidth", f"{n['noise_bytes_over_copy_bandwidth']:.3f}"),
             ("peak RSS inference (max rank)", f"{max(res['peak_rss_inference_bytes']) / gib:.3f} GiB"),
             ("peak RSS ES (max rank)", f"{max(res['peak_rss_es_bytes']) / gib:.3f} GiB"),
             ("fp32 master", f"{res['master_bytes'] / gib:.3f} GiB"),
             ("peak ES / (inference + master)", f"{res['peak_es_over_inference_plus_master']:.3f}")]
    if "decode" in res:
        d = res["decode"]
        rows += [("decode s (ours, one batch)", f"{d['decode_s']:.3f}"),
                 ("plain model.generate s", f"{d['plain_generate_s']:.3f}"),
                 ("decode speed vs plain", f"{d['decode_over_plain']:.3f}x"),
                 ("tokens with / without stop strings", f"{d['tokens_with_stop']} / {d['tokens_without_stop']}")]
    if "parallel_efficiency" in res:
        rows += [("1-rank ES s/gen", f"{res['time_es_1rank_s']:.3f}"),
                 ("parallel efficiency", f"{res['parallel_efficiency']:.3f}"),
                 ("1-rank weights == R-rank weights", str(res["same_weights_1_vs_R_ranks"]))]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def write_json(path: str, res: dict) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, path)


__all__ = ["run_bench", "format_table", "write_json"]
