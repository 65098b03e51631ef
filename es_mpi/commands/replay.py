"""`es-mpi replay`: rebuild the fp32 master after G generations from the base
model and log.h5 alone.

The log holds every member's reward and status, and the noise is a pure
function of (seed, generation, draw), so the update of each generation can be
recomputed without decoding anything: the same `apply_generation_update` the
trainer ran, on the same logged numbers, gives the same bits.  A log of a few
hundred kB thus stands in for every checkpoint of the run.

Cost: G x K x P normals (the update part of training only), no decoding.
Must run where the run's noise is drawn the same way: the log records the
noise fingerprint of the run's devices (noise.fingerprint), and a device that
draws otherwise (another GPU model, a MIG slice, the CPU for a GPU run) is
refused unless --force.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..runs import checkpoint
from ..comm import pick_device, serial
from ..errors import UserError
from ..model import load_model, prepare
from ..engine.noise import (NoiseSource, fingerprint_of, fingerprint_short, fingerprint_text, same_noise,
                            scheme_for, scheme_of)
from ..engine.perturb import make_perturbation
from ..engine.optim import make_optimizer
from ..runs.runlog import read_run
from ..engine.update import apply_generation_update
from ..engine.weights import Weights


def _check_replayable(log: dict, path: Path, generation: int, es) -> None:
    gens = log["gen"]["generation"]
    if generation < 0:
        raise UserError(f"--generation: {generation} must be >= 0")
    if generation > len(gens):
        raise UserError(f"{path}: the log holds {len(gens)} generation(s); cannot replay to {generation}")
    if not np.array_equal(gens[:generation], np.arange(generation)):
        raise UserError(f"{path}: generations are not 0..{generation - 1} in order; cannot replay")
    scheme, mine = scheme_of(log["attrs"]), scheme_for(es)
    if scheme != mine:
        raise UserError(f"{path}: the run drew its noise as {scheme}, this es-mpi draws {mine}; "
                        "its updates cannot be replayed (use the es-mpi version that wrote it)")


def _check_noise(log: dict, path: Path, mine: dict, force: bool) -> list[str]:
    """Refuse (UserError) a log whose noise fingerprint is not what this device
    draws, unless `force`; returns warnings for the caller to print."""
    drawn = fingerprint_of(log["attrs"])
    if drawn is None:
        return [f"{path} records no noise fingerprint (written before es-mpi recorded one): not checked that "
                f"this device draws its noise; this device draws {fingerprint_short(mine)}"]
    if same_noise(drawn, mine):
        return []
    if not force:
        raise UserError(f"{path}: the run drew its noise as {fingerprint_short(drawn)}, this device draws "
                        f"{fingerprint_short(mine)}; its updates cannot be replayed here (replay on the run's "
                        "device type, or pass --force)")
    return [f"--force: replaying a run drawn with noise {fingerprint_short(drawn)} on noise "
            f"{fingerprint_short(mine)}; the replay stops where it departs from the log"]


def replay(run_dir: str | Path, generation: int, out: str | Path, force: bool = False) -> dict:
    """Write the master after `generation` generations to `out` (a checkpoint
    file).  Returns its attrs plus 'generation', 'path' and 'warnings' (lines
    for the caller to print).  `force`: replay even where this device draws
    other noise than the run's (noise fingerprint); the per-generation
    cross-check against the log still holds."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out}: exists; not overwritten (choose another --out)")
    run = read_run(run_dir)
    path, cfg, gen, attrs = run["path"], run["config"], run["gen"], run["attrs"]
    _check_replayable(run, path, generation, cfg.es)
    es = cfg.es
    folder = prepare(cfg.model.path, cfg.model.tiny_seed, cfg.model.cache_dir)
    device = pick_device(cfg.model.device, serial())
    noise = NoiseSource(es.seed, device)
    warnings = _check_noise(run, path, noise.fingerprint(), force)   # before loading the model
    # only the fp32 master is replayed: no working model in another dtype is needed
    model, master = load_model(folder, "fp32", device)
    weights = Weights(model, master=master)
    base_digest = weights.digest()
    if attrs.get("base_model_digest") not in (None, base_digest):
        raise UserError(f"{path}: the base model {cfg.model.path} is not the one this run started from "
                        "(weights digest differs)")
    opt = make_optimizer(es.optimizer, weights.names, weights.shapes, es.adam_beta1, es.adam_beta2, es.adam_eps,
                         device)
    perturbation = make_perturbation(es, model, weights, noise)
    for g in range(generation):
        upd = apply_generation_update(perturbation, opt, es, g, gen["rewards"][g], gen["status"][g])
        # Cheap cross-checks against what training logged: the shaped scores
        # (bitwise, same numpy on the same numbers) and the step's norm (a
        # float sum whose order may follow the thread count, so not bitwise).
        logged = float(gen["update_norm"][g])
        if not np.array_equal(upd.shaped_N, gen["shaped"][g]) or not math.isclose(
                upd.norm, logged, rel_tol=1e-6, abs_tol=1e-12):
            raise UserError(f"{path}: replay departs from the log at generation {g} (update norm {upd.norm:.6g}, "
                            f"logged {logged:.6g}); was the run resumed with --force and a changed config, "
                            "or trained on another device type?")
    out_attrs = {"seed": es.seed, "config": str(attrs.get("config", "")), "digest": weights.digest(),
                 "base_model": cfg.model.path, "base_model_digest": base_digest,
                 "replayed_from": str(path), "noise_fingerprint": fingerprint_text(noise.fingerprint())}
    checkpoint.write(out, generation, weights.state_dict(), opt.state_dict(), out_attrs)
    return {**out_attrs, "generation": generation, "path": out, "warnings": warnings}
