"""The generation loop.  Reads top to bottom: set-up, then per generation
for each of this rank's tiles of the (member, prompt) grid: materialise ->
decode -> score; then Allgather -> shape -> update -> log.

Per rank and generation, with P parameters, k members among this rank's
tiles and K noise draws in all: k x materialise P + the tiles' decoding +
K x P normals for the update.
"""
from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .runs import checkpoint
from . import config as config_mod, faults
from .clock import Clock
from .comm import Comm, check_devices_unique, default_threads, pick_device
from .signals import catch_stop_signals, clear_stop, ignore_stop_signals, restore_signals, stop_requested
from .errors import RunAborted, UserError
from .memory import Budget, adam_state_device, card_bytes, master_device
from .model import load_model, load_tokenizer, prepare
from .engine.noise import (NoiseSource, fingerprint_of, fingerprint_short, fingerprint_text, member_noise,
                           prompt_batch, ranks_disagree, same_noise, scheme_for, scheme_of)
from .engine.optim import make_optimizer
from .runs.rundir import RunOutput, check_run_dir
from .decode import compat, format_prompts
from .decode.backend import check_early as check_backend_early, open_backend, resolve as resolve_backend
from .scoring import generate_and_score, member_scores, score_one, summarize
from .tasks import TaskDataError, make_task
from .engine.update import apply_generation_update
from .engine.grid import make_grid
from .engine.perturb import make_perturbation
from .engine.weights import Weights

# Exit status after a stop signal: checkpoint written, resume to continue
# (EX_TEMPFAIL; the sbatch script requeues on it).
EXIT_PREEMPTED = 75


def task_options(cfg) -> dict:
    t = cfg.task
    opts = dict(t.options)
    if t.data:
        opts["data"] = t.data
    if t.train_size:
        opts["train_size"] = t.train_size
    if t.heldout_size:
        opts["heldout_size"] = t.heldout_size
    if t.seed:
        opts["seed"] = t.seed
    if t.chat_template != "auto":
        opts["chat_template"] = t.chat_template == "true"
    return opts


def load_task(cfg):
    """The task and its examples, loaded and checked before any model loads."""
    try:
        task = make_task(cfg.task.name, task_options(cfg))
        train = list(task.examples("train"))
        heldout = list(task.examples("heldout"))
    except (TaskDataError, ValueError) as e:
        raise UserError(str(e)) from None
    if not train:
        raise UserError(f"task {cfg.task.name}: no training examples")
    return task, train, heldout


@dataclass
class Loaded:
    """What setup_model returns: the config with model.dtype and
    generation.backend resolved, the model folder, the working model (a
    meta-device skeleton when a vLLM engine holds the working weights), the
    Weights (fp32 master and working), tokenizer, device, and why each choice."""
    cfg: object
    folder: Path
    model: torch.nn.Module
    weights: Weights
    tok: object
    device: str
    dtype_why: str
    backend_why: str
    master_why: str


def master_placement(cfg, folder: Path, device: str) -> tuple[str, str]:
    """Where the fp32 master lives (memory.master_device for es.master), from
    the parameter count of the model's meta-device skeleton: decided before
    anything is loaded.  UserError with the arithmetic if `device` is asked
    for and does not fit."""
    from .model import DTYPES, skeleton

    card = card_bytes(device)
    if card is None:
        return device, "same memory as the working weights"
    n = sum(p.numel() for p in skeleton(folder, cfg.model.dtype).parameters())
    budget = Budget(n, DTYPES[cfg.model.dtype].itemsize, adam=False)
    try:
        return master_device(cfg.es.master, device, budget, card)
    except ValueError as e:
        raise UserError(str(e)) from None


def setup_model(cfg, comm: Comm) -> Loaded:
    """Rank 0 builds/converts the model folder (atomically, into the cache);
    then every rank loads the same bytes.  `model.dtype: auto` is resolved on
    rank 0 and broadcast; `generation.backend: auto` and `es.master: auto` on
    every rank from the same inputs.  With backend vllm the HF model is only
    a skeleton: the engine (opened later, open_backend) holds the working
    weights."""
    from .dtypes import choose

    folder = comm.agree(lambda: str(prepare(cfg.model.path, cfg.model.tiny_seed, cfg.model.cache_dir,
                                            build=comm.is_root)))
    comm.barrier()
    device = comm.agree(lambda: pick_device(cfg.model.device, comm))
    check_devices_unique(device, comm)
    if device.startswith("cpu") and cfg.model.dtype == "fp16":
        raise UserError("model.dtype: fp16 is not supported on CPU (use fp32, bf16 or auto)")
    dtype, why = comm.bcast_json(list(choose(cfg.model.dtype, device)) if comm.is_root else None)
    cfg = config_mod.with_value(cfg, "model.dtype", dtype)
    cfg, backend_why = resolve_backend(cfg, device, comm)
    where, master_why = comm.agree(lambda: master_placement(cfg, Path(folder), device))
    engine = cfg.generation.backend == "vllm"
    model, master = load_model(Path(folder), dtype, device, where, "skeleton" if engine else "model")
    weights = Weights(model, master=master, device=device)
    tok = load_tokenizer(Path(folder))
    return Loaded(cfg, Path(folder), model, weights, tok, device, why, backend_why, master_why)


def keep_saved_mode(cfg, run_dir: Path):
    """On --resume with generation.vllm_mode: auto, the mode the run started
    with (its newest checkpoint's config): auto looks at es.generations,
    which a resume may extend, and compiled and eager kernels may round
    differently, so a run keeps the kernels it started with."""
    path = checkpoint.latest(run_dir)
    if path is None:
        return cfg
    saved = config_mod.loads(checkpoint.config_text(path), f"{path} (config)")
    mode = saved.generation.vllm_mode
    return cfg if mode == "auto" else config_mod.with_value(cfg, "generation.vllm_mode", mode)


def adam_placement(cfg, device: str, weights: Weights) -> tuple[str, str]:
    """Where Adam's moments live (memory.adam_state_device), or UserError."""
    if cfg.es.optimizer != "adam":
        return device, ""
    try:
        return adam_state_device(cfg.es.adam_state, device, Budget.of(weights, adam=True), card_bytes(device))
    except ValueError as e:
        raise UserError(str(e)) from None


def check_noise_agrees(noise: NoiseSource, comm: Comm) -> dict:
    """Every rank's noise fingerprint (noise.fingerprint), gathered once at
    set-up (one small Allgatherv): ranks that draw other noise for the same
    seed (another GPU model, a MIG slice, the CPU) raise the same one-line
    UserError on every rank, naming them.  Returns this rank's fingerprint."""
    mine = noise.fingerprint()
    why = ranks_disagree(comm.allgather_json(mine))
    if why:
        raise UserError(f"ranks draw different noise for the same seed: {why}; run all ranks on one GPU model "
                        "and MIG profile (or all on CPU)")
    return mine


def check_masters_agree(comm: Comm, fingerprint: int, generation: int) -> None:
    """All ranks gather the master's fingerprint (Weights.fingerprint, 8 bytes
    each); a mismatch raises the same RunAborted on every rank, naming the
    generation and the ranks that differ from rank 0."""
    all_f = comm.allgather_bytes(int(fingerprint).to_bytes(8, "little"), 8)
    bad = [r for r, f in enumerate(all_f) if f != all_f[0]]
    if bad:
        raise RunAborted(f"generation {generation}: master weights diverged across ranks: "
                         f"rank(s) {', '.join(map(str, bad))} differ from rank 0")


@dataclass
class GenResult:
    """This rank's rows of the grid (NaN-padded to the longest rank's)."""
    rewards: np.ndarray
    status: np.ndarray
    correct: np.ndarray
    stop: bool


class Trainer:
    def __init__(self, cfg, comm: Comm, run_dir: Path, resume: bool = False, force: bool = False,
                 config_text: str | None = None):
        self.cfg, self.comm, self.run_dir = cfg, comm, Path(run_dir)
        es = cfg.es
        comm.agree(lambda: check_run_dir(self.run_dir, resume))
        self.task, self.train_set, self.heldout_set = comm.agree(lambda: load_task(cfg))
        comm.agree(lambda: check_backend_early(cfg))
        self.chat = self.task.chat_template
        if resume and cfg.generation.vllm_mode == "auto":
            cfg = comm.agree(lambda: keep_saved_mode(cfg, self.run_dir))
        threads = cfg.model.threads or default_threads(comm)
        torch.set_num_threads(threads)
        self.threads = threads
        ld = setup_model(cfg, comm)
        cfg = self.cfg = ld.cfg
        self.folder, self.tok, self.device, self.dtype_reason = ld.folder, ld.tok, ld.device, ld.dtype_why
        self.backend_why, self.master_why = ld.backend_why, ld.master_why
        self.clock = Clock(self.device)   # every phase time waits for the device's queued work
        self.model = model = ld.model
        self.weights = ld.weights
        # SHA-256 of the master is for the records rank 0 writes; other ranks never hash it
        self.base_digest = self.weights.digest() if comm.is_root else None
        self.noise = NoiseSource(es.seed, self.device)
        self.noise_fp = check_noise_agrees(self.noise, comm)
        # one decoder for the life of the process (a vLLM engine is never deleted)
        self.backend = comm.agree(lambda: open_backend(cfg, self.folder, model, self.tok, self.device, comm,
                                                       self.weights))
        self._notes: list[str] = []   # warnings from set-up, printed once the run log is open
        try:
            self.perturb = make_perturbation(es, model, self.weights, self.noise, self.backend)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.adam_where, self.adam_why = comm.agree(lambda: adam_placement(cfg, self.device, self.weights))
        self.opt = make_optimizer(es.optimizer, self.weights.names, self.weights.shapes, es.adam_beta1,
                                  es.adam_beta2, es.adam_eps, self.device, self.adam_where)
        self.grid = make_grid(es.population, es.prompts_per_generation, cfg.generation.batch_size,
                              per_member=self.perturb.kind == "full")
        self.tiles = self.grid.rank_tiles(comm.size, comm.rank)
        self.rows = self.grid.rank_rows(comm.size, comm.rank)
        self.slot = self.grid.max_rank_rows(comm.size)  # the Allgather row length, in grid rows
        if hasattr(self.backend, "check_tile_fits"):   # vllm: the KV cache holds the widest tile, on every rank
            widest = max(t.stop - t.start for t in self.grid.tiles)
            texts = format_prompts(self.tok, [e.prompt for e in self.train_set], self.chat)
            comm.agree(lambda: self.backend.check_tile_fits(texts, widest, cfg.generation.max_new_tokens))
        self.start_gen = 0
        if resume:
            self.start_gen = comm.agree(lambda: self._resume(force))
        self.out = RunOutput(comm, self.run_dir)
        self.config_text = config_text or cfg.to_yaml()
        self._saved_at: int | None = None   # generation of the last checkpoint written

    # -- set-up helpers --------------------------------------------------------
    def _resume(self, force: bool) -> int:
        path = checkpoint.latest(self.run_dir)
        ck = checkpoint.load(path)
        saved = config_mod.loads(ck["attrs"]["config"], f"{path} (config)")
        changed = config_mod.diff(saved, self.cfg, config_mod.TRAJECTORY_FIELDS)
        if changed and not force:
            raise UserError(f"--resume: config differs from the run's in {', '.join(changed)}; "
                            "this changes the trajectory (pass --force to resume anyway)")
        scheme, mine = scheme_of(ck["attrs"]), scheme_for(self.cfg.es)
        if scheme != mine and not force:
            raise UserError(f"--resume: {path} was written with noise scheme {scheme}, this run draws {mine}; "
                            "this changes the trajectory (pass --force to resume anyway)")
        drawn = fingerprint_of(ck["attrs"])
        if drawn is None:
            self._notes.append(f"{path} records no noise fingerprint (written before es-mpi recorded one): "
                               f"not checked that this device draws its noise; this run draws "
                               f"{fingerprint_short(self.noise_fp)}")
        elif not same_noise(drawn, self.noise_fp):
            if not force:
                raise UserError(f"--resume: {path} was drawn with noise {fingerprint_short(drawn)}, this device "
                                f"draws {fingerprint_short(self.noise_fp)}: the same seed gives other noise here "
                                "(pass --force to resume anyway)")
            self._notes.append(f"--force: resuming a run drawn with noise {fingerprint_short(drawn)} on noise "
                               f"{fingerprint_short(self.noise_fp)}; from here its trajectory is another one")
        try:
            self.weights.load_state_dict(ck["weights"])
            self.opt.load_state_dict(ck["optimizer"])
        except (KeyError, ValueError) as e:
            raise UserError(f"{path}: checkpoint does not match the model ({e})") from None
        # SHA-256 on rank 0 only (agree() gives its error to every rank); the
        # other ranks read the same file and the agreement check in begin()
        # proves their masters equal rank 0's.
        if self.comm.is_root and self.weights.digest() != ck["attrs"]["digest"]:
            raise UserError(f"{path}: weights digest mismatch (corrupted checkpoint)")
        return int(ck["attrs"]["generation"])

    def _log_attrs(self) -> dict:
        hosts = sorted(set(self.comm.allgather_json(socket.gethostname())))
        return {"config": self.config_text, "noise_scheme": scheme_for(self.cfg.es),
                "noise_fingerprint": fingerprint_text(self.noise_fp), "base_model": self.cfg.model.path,
                "base_model_digest": self.base_digest, "world_size": self.comm.size,
                "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hosts": ",".join(hosts),
                "population": self.cfg.es.population,
                "prompts_per_generation": self.cfg.es.prompts_per_generation,
                "n_params": self.weights.n_params, "threads_per_rank": self.threads}

    # -- agreement -------------------------------------------------------------
    def check_agreement(self, generation: int) -> float:
        """All ranks compare the master's exact integer fingerprint, computed
        on its device (Weights.fingerprint: no host copy of the weights); a
        mismatch aborts every rank (they all see the same gathered values).
        Costs one pass over the master, one small host copy and an 8-byte
        Allgather."""
        t0 = self.clock()
        check_masters_agree(self.comm, self.weights.fingerprint(), generation)
        return self.clock() - t0

    # -- one generation --------------------------------------------------------
    def evaluate_rows(self, gen: int, batch: list, times: dict) -> GenResult:
        """Decode and score this rank's tiles (full-rank noise: one
        materialisation per member; low-rank: the factors once, then hooks)."""
        grid = self.grid
        rewards, status, correct = (np.full(self.slot, np.nan) for _ in range(3))
        texts = format_prompts(self.tok, [e.prompt for e in batch], self.chat)
        t0 = self.clock()
        if self.rows:
            first, last = grid.member_of(self.rows.start), grid.member_of(self.rows.stop - 1)
            self.perturb.begin(gen, list(range(first, last + 1)))
        times["t_materialise"] += self.clock() - t0
        for tile in self.tiles:
            rows = range(tile.start, tile.stop)
            t0 = self.clock()
            listener = self.perturb.tile([grid.member_of(r) for r in rows])
            t1 = self.clock()
            prompts = [grid.prompt_of(r) for r in rows]
            comps = self.backend.decode([texts[p] for p in prompts], self.cfg.generation.max_new_tokens,
                                        self.task.stop_strings, rows=listener,
                                        tile=f"of grid rows {tile.start}-{tile.stop - 1}, generation {gen}")
            t2 = self.clock()
            for r, p, c in zip(rows, prompts, comps):
                sc = score_one(self.task, batch[p], c.text, self.cfg.task.reward_timeout)
                k = r - self.rows.start
                rewards[k], status[k], correct[k] = sc.reward, sc.status, sc.correct
            times["t_materialise"] += t1 - t0
            times["t_decode"] += t2 - t1
            times["t_reward"] += self.clock() - t2
            times["tokens"] += sum(c.n_tokens for c in comps)
        self.perturb.end()
        return GenResult(rewards, status, correct, stop_requested())

    def exchange(self, local: GenResult) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """The one Allgather of the generation: per rank [stop flag, then
        (reward, status, correct) per grid row it holds]; padding is NaN.
        Rows, not per-member partial sums, cross the wire: a float sum
        regrouped by rank count is not bitwise the same, a mean over the
        gathered rows in prompt order is.  (N x P x 3 floats in all.)"""
        buf = np.concatenate([[1.0 if local.stop else 0.0],
                              np.stack([local.rewards, local.status, local.correct], axis=1).ravel()])
        allb = self.comm.allgather_floats(buf)
        stop = bool(np.any(allb[:, 0] > 0))
        per_rank = allb[:, 1:].reshape(self.comm.size, self.slot, 3)
        grid = self.grid
        rows = np.empty((grid.members * grid.prompts, 3))
        for r in range(self.comm.size):
            mine = grid.rank_rows(self.comm.size, r)
            rows[mine.start:mine.stop] = per_rank[r, :len(mine)]
        rows = rows.reshape(grid.members, grid.prompts, 3)
        N = grid.members
        rew, st, cor = np.empty(N), np.empty(N, dtype=np.int8), np.empty(N)
        for m in range(N):
            rew[m], st[m], cor[m] = member_scores(rows[m, :, 0], rows[m, :, 1], rows[m, :, 2])
        return rew, st, cor, stop

    def heldout_eval(self, gen: int, periodic: bool = False) -> dict:
        """Held-out evaluation of the current master, tiles of prompts over ranks.
        The periodic ones between start and end may take only the first
        `eval.subset` prompts: a cheap curve, with the full set at both ends."""
        ev = self.cfg.eval
        examples = self.heldout_set[:min(ev.subset or ev.limit, ev.limit) if periodic else ev.limit]
        self.backend.sync_base(self.weights)
        res = generate_and_score(self.backend, self.tok, self.task, examples, self.cfg, self.comm, self.chat)
        scored = [sc for _, _, sc in res]
        summ = summarize([s.reward for s in scored], [s.correct for s in scored])
        comp_means = {}
        for k in (scored[0].components if scored else {}):
            comp_means[k] = float(np.mean([s.components.get(k, math.nan) for s in scored]))
        self.out.evaluation({"generation": gen, **summ})
        extra = " ".join(f"{k} {v:.3f}" for k, v in comp_means.items())
        self.out.info("heldout gen %d: reward %.4f ± %.4f (95%% CI) accuracy %.3f n=%d %s", gen,
                      summ["mean_reward"], summ["ci95"], summ["accuracy"], summ["n_prompts"], extra)
        return {**summ, **comp_means}

    def step(self, gen: int) -> bool:
        """Run generation `gen` (0-based); returns True if a stop was requested."""
        cfg, es = self.cfg, self.cfg.es
        times = dict.fromkeys(("t_materialise", "t_decode", "t_reward", "t_exchange", "t_update", "t_digest",
                               "tokens"), 0.0)
        t_start = self.clock()
        idx = prompt_batch(es.seed, gen, len(self.train_set), es.prompts_per_generation)
        batch = [self.train_set[i] for i in idx]
        local = self.evaluate_rows(gen, batch, times)
        t0 = self.clock()
        rewards, status, correct, stop = self.exchange(local)
        times["t_exchange"] = self.clock() - t0
        tamper = None
        if faults.active("nonfinite", gen, self.comm.rank):
            tamper = lambda p: p.__class__(p.coeffs_K, p.n_valid, math.inf, math.inf)  # noqa: E731
        t0 = self.clock()
        # Shared with `es-mpi replay`, which re-runs it from the logged rewards.
        upd = apply_generation_update(self.perturb, self.opt, es, gen, rewards, status, tamper)
        times["t_update"] = self.clock() - t0
        valid, z, plan, norm = upd.valid_N, upd.shaped_N, upd.plan, upd.norm
        self.last_update_ran = not plan.empty
        faults.after_update(self.weights, gen, self.comm.rank)
        done = gen + 1
        if es.check_every and done % es.check_every == 0:
            times["t_digest"] = self.check_agreement(gen)
        times["t_total"] = self.clock() - t_start
        rv = rewards[valid]
        stats = (rv.mean(), rv.std(), rv.min(), rv.max()) if rv.size else (math.nan,) * 4
        n_invalid = int((~valid).sum())
        self.out.generation({"generation": gen, "rewards": rewards, "status": status, "valid": valid,
                             "shaped": z, "correct": correct, "prompts": idx, "reward_mean": stats[0],
                             "reward_std": stats[1], "reward_min": stats[2], "reward_max": stats[3],
                             "n_invalid": n_invalid, "update_norm": norm, **times})
        self.last_times = times
        note = "" if n_invalid == 0 else f" invalid {n_invalid}"
        if plan.empty:
            note += " | no valid members: no update" if plan.n_valid == 0 else " | zero update"
        self.out.info("gen %d/%d | reward mean %.4f min %.4f max %.4f | correct %.3f%s | "
                      "eval %.1fs update %.1fs total %.1fs", done, es.generations, stats[0], stats[2], stats[3],
                      float(np.nanmean(correct)), note, times["t_materialise"] + times["t_decode"],
                      times["t_update"], times["t_total"])
        ev = cfg.eval
        if ev.limit and ev.every and done % ev.every == 0 and done < es.generations:
            self.heldout_eval(done, periodic=True)
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < es.generations:
            self.save(done)
        return stop

    def save(self, generations_done: int) -> None:
        """Checkpoint (rank 0 writes).  The state dicts and the SHA-256 are
        built by the writer only: passed as callables, which RunOutput calls on
        rank 0 (other ranks would copy the master and Adam's moments to the host
        for nothing: 30 GB, plus 61 GB with Adam, per rank at 7B)."""
        def attrs():
            return {"seed": self.cfg.es.seed, "config": self.config_text, "digest": self.weights.digest(),
                    "base_model": self.cfg.model.path, "base_model_digest": self.base_digest,
                    "noise_fingerprint": fingerprint_text(self.noise_fp)}

        path = self.out.checkpoint(generations_done, self.weights.state_dict, self.opt.state_dict, attrs,
                                   self.cfg.checkpoint.keep)
        self._saved_at = generations_done
        if path is not None:
            self.out.info("checkpoint %s", path)

    # -- the run ---------------------------------------------------------------
    def begin(self) -> None:
        """Open the run log, install the stop-signal handlers, check agreement."""
        cfg, es = self.cfg, self.cfg.es
        mn = [member_noise(m, es.antithetic) for m in range(es.population)]
        attrs = self._log_attrs()
        self.out.start(self.config_text, es.population, es.prompts_per_generation, attrs,
                       [x.index for x in mn], [x.sign for x in mn], self.start_gen if self.start_gen else None)
        self._prev_signals = catch_stop_signals()
        self.out.info("es-mpi: %s on %s | %d params | N=%d sigma=%g alpha=%g | %d rank(s) x %d thread(s) on %s%s",
                      cfg.task.name, cfg.model.path, self.weights.n_params, es.population, es.sigma, es.alpha,
                      self.comm.size, self.threads, self.device,
                      f" | resumed at generation {self.start_gen}" if self.start_gen else "")
        self.out.info("dtype %s (%s) | grid %d members x %d prompts in %d tiles of <= %d rows",
                      cfg.model.dtype, self.dtype_reason, self.grid.members, self.grid.prompts, len(self.grid.tiles),
                      max(t.stop - t.start for t in self.grid.tiles))
        self.out.info("decoder %s (%s) | %s", cfg.generation.backend, self.backend_why, self.backend.describe())
        self.out.info("fp32 master: %s", self.master_why)
        if self.adam_why:
            self.out.info("adam state: %s", self.adam_why)
        self.out.info("noise %s", fingerprint_short(self.noise_fp))
        for note in self._notes:
            self.out.warning("%s", note)
        if not compat.supported():
            self.out.warning("transformers %s is outside the tested range %s (setup.cfg)", compat.VERSION,
                             compat.range_text())
        idle = [r for r in range(self.comm.size) if not self.grid.rank_tiles(self.comm.size, r)]
        if idle:
            self.out.warning("%d of %d ranks have no work: %d tiles for %d ranks (a smaller generation.batch_size "
                             "cuts more tiles)", len(idle), self.comm.size, len(self.grid.tiles), self.comm.size)
        self.check_agreement(self.start_gen)

    def run(self) -> int:
        cfg, es = self.cfg, self.cfg.es
        self.begin()
        first = self.start_gen == 0
        if cfg.eval.limit and first:
            self.heldout_eval(0)
        stopped = False
        t_run = self.clock()
        gen = self.start_gen
        try:
            while gen < es.generations:
                stop = self.step(gen)
                gen += 1
                if stop and gen < es.generations:
                    stopped = True
                    break
            self.check_agreement(gen)
            if cfg.eval.limit and not stopped and gen > self.start_gen:
                self.heldout_eval(gen)
            if self._saved_at != gen:  # not twice when a stop follows a periodic checkpoint
                self.save(gen)
        finally:
            self.out.close()
            restore_signals(getattr(self, "_prev_signals", {}))
        digest = self.weights.digest() if self.comm.is_root else None   # SHA-256: rank 0 prints it
        elapsed = self.clock() - t_run
        if stopped:
            self.out.info("stop signal: checkpoint at generation %d written; resume with --resume "
                          "(%.1fs this segment)", gen, elapsed)
        else:
            self.out.info("done: %d generations in %.1fs (%d this segment) on %d rank(s)", es.generations,
                          elapsed, gen - self.start_gen, self.comm.size)
        self.out.line(f"final-digest: {digest}")
        clear_stop()
        # No rank leaves before rank 0 has written the checkpoint and closed the
        # log: mpiexec kills the whole job as soon as one rank exits non-zero (75).
        self.comm.barrier()
        if stopped:
            ignore_stop_signals()
        return EXIT_PREEMPTED if stopped else 0
