"""The HDF5 run log (`RUN_DIR/log.h5`): writer (rank 0 only) and readers (tools/).

Layout (schema 1), G generations so far, N members, B prompts per generation:

  /gen/generation           (G,)   int64   dimension scale of every /gen dataset
  /gen/rewards              (G, N) float64 member reward (mean over the prompt batch; NaN if invalid)
  /gen/status               (G, N) int8    0 ok, 1 reward raised, 2 non-finite, 3 reward timed out
  /gen/valid                (G, N) int8    1 if the member entered the update
  /gen/shaped               (G, N) float64 shaped score z (0 for invalid members)
  /gen/correct              (G, N) float64 fraction of prompts the task counts correct
  /gen/prompts              (G, B) int64   training-prompt indices of the batch
  /gen/reward_mean|std|min|max (G,) float64 over valid members
  /gen/n_invalid            (G,)   int32
  /gen/update_norm          (G,)   float64 L2 norm of the applied step (0 if none)
  /gen/t_materialise|t_decode|t_reward|t_exchange|t_update|t_digest|t_total (G,) float64 seconds (rank 0)
  /members/noise_index      (N,)   int64   noise draw of each member: noise key = (es.seed, generation, index)
  /members/noise_sign       (N,)   int8    +1 / -1 (antithetic)
  /eval/generation, mean_reward, accuracy, ci95, n_prompts   (E,) periodic held-out evaluation

Attributes on /: schema_version, es_mpi_version, config (YAML text), noise_scheme
(noise.scheme_for of its config; absent in es-mpi 0.1 logs), noise_fingerprint (JSON,
noise.fingerprint: what the ranks' device draws for a fixed key; absent in older logs;
a resumed run records its own segment's), base_model, base_model_digest,
world_size, start_time, hosts, population, prompts_per_generation.

Written in SWMR mode and flushed every generation, so a crash loses at most the
generation in flight and tools can read a run while it is written.
Every dataset carries a Fletcher-32 checksum, so damaged data is a read error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from .. import __version__, config as config_mod
from ..errors import UserError

SCHEMA_VERSION = 1
KIND = "es-mpi-log"
TIMINGS = ("t_materialise", "t_decode", "t_reward", "t_exchange", "t_update", "t_digest", "t_total")
# name -> (dtype, per-generation shape given N, B)
GEN_FIELDS: dict[str, tuple[Any, str]] = {
    "rewards": (np.float64, "N"), "status": (np.int8, "N"), "valid": (np.int8, "N"),
    "shaped": (np.float64, "N"), "correct": (np.float64, "N"), "prompts": (np.int64, "B"),
    "reward_mean": (np.float64, ""), "reward_std": (np.float64, ""), "reward_min": (np.float64, ""),
    "reward_max": (np.float64, ""), "n_invalid": (np.int32, ""), "update_norm": (np.float64, ""),
    **{t: (np.float64, "") for t in TIMINGS},
}
EVAL_FIELDS = {"mean_reward": np.float64, "accuracy": np.float64, "ci95": np.float64, "n_prompts": np.int64}
# HDF5 checksums its metadata but not data chunks: Fletcher-32 on every
# dataset makes a flipped byte in the rewards a read error, not a silent
# wrong number that `es-mpi replay` would then build weights from.
CHECKSUM = {"fletcher32": True}


def _fail(path, msg) -> UserError:
    return UserError(f"{path}: {msg}")


def _h5open(p: Path, mode: str, swmr: bool) -> h5py.File:
    if mode != "r":
        return h5py.File(p, mode, libver="latest")
    if swmr:
        # A SWMR reader retries a failed metadata read with doubling sleeps
        # (hours in all), so a truncated or corrupted file would hang it: open
        # plainly first, and use SWMR only for a file marked open for writing.
        try:
            return h5py.File(p, "r")
        except OSError as e:
            if "open for write" not in str(e):
                raise
    return h5py.File(p, "r", swmr=swmr)


def open_h5(path: str | Path, kind: str, mode: str = "r", swmr: bool = False) -> h5py.File:
    """Open an es-mpi HDF5 file and check that it is one, of a schema we read.
    Truncated, corrupted, foreign or newer files give a one-line UserError."""
    p = Path(path)
    if not p.is_file():
        raise _fail(p, "file not found")
    try:
        f = _h5open(p, mode, swmr)
    except OSError as e:
        # h5py: "Unable to synchronously open file (truncated file: eof = ...)";
        # the reason is the part in parentheses.
        msg = str(e).splitlines()[0] if str(e) else ""
        why = msg[msg.find("(") + 1:msg.rfind(")")] if "(" in msg else msg
        raise _fail(p, f"not a readable HDF5 file (truncated or corrupted?): {why or 'unreadable'}") from None
    try:
        found = f.attrs.get("kind")
        found = found.decode() if isinstance(found, bytes) else found
        if found != kind:
            raise _fail(p, f"not an {kind} file (kind attribute is {found!r})")
        ver = int(f.attrs.get("schema_version", -1))
        if ver > SCHEMA_VERSION:
            raise _fail(p, f"schema version {ver} is newer than this es-mpi reads ({SCHEMA_VERSION}); upgrade es-mpi")
        if ver < 1:
            raise _fail(p, f"invalid schema version {ver}")
    except UserError:
        f.close()
        raise
    except Exception as e:  # corrupted metadata
        f.close()
        raise _fail(p, f"corrupted HDF5 metadata ({e.__class__.__name__})") from None
    return f


class RunLogWriter:
    """Appends one row per generation.  Rank 0 only."""

    def __init__(self, path: str | Path, population: int, prompts: int, attrs: Mapping[str, Any] | None = None,
                 noise_index=None, noise_sign=None, resume_at: int | None = None):
        self.path = Path(path)
        self.N, self.B = population, prompts
        if resume_at is None:
            self._create(attrs or {}, noise_index, noise_sign)
        else:
            self._reopen(resume_at, attrs or {})
        self.f.swmr_mode = True  # from here on: appends only, readers may attach

    def _create(self, attrs, noise_index, noise_sign):
        tmp = self.path.with_name(self.path.name + ".tmp")
        f = h5py.File(tmp, "w", libver="latest")
        f.attrs["kind"] = KIND
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["es_mpi_version"] = __version__
        for k, v in attrs.items():
            f.attrs[k] = v
        g = f.create_group("gen")
        scale = g.create_dataset("generation", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(256,),
                                 **CHECKSUM)
        scale.make_scale("generation")
        for name, (dt, dims) in GEN_FIELDS.items():
            width = {"N": self.N, "B": self.B, "": None}[dims]
            shape, maxshape = ((0, width), (None, width)) if width else ((0,), (None,))
            chunks = (64, width) if width else (256,)
            ds = g.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dt, chunks=chunks, **CHECKSUM)
            ds.dims[0].attach_scale(scale)
        m = f.create_group("members")
        m.create_dataset("noise_index", data=np.asarray(noise_index, dtype=np.int64), **CHECKSUM)
        m.create_dataset("noise_sign", data=np.asarray(noise_sign, dtype=np.int8), **CHECKSUM)
        e = f.create_group("eval")
        escale = e.create_dataset("generation", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(64,),
                                  **CHECKSUM)
        escale.make_scale("generation")
        for name, dt in EVAL_FIELDS.items():
            ds = e.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(64,), **CHECKSUM)
            ds.dims[0].attach_scale(escale)
        f.close()
        os.replace(tmp, self.path)
        self.f = h5py.File(self.path, "r+", libver="latest")

    def _reopen(self, generations_done: int, attrs):
        """Resume: drop generations the checkpoint does not cover (the crash lost
        them), so the log never repeats or skips a generation."""
        self.f = open_h5(self.path, KIND, "r+")
        for k, v in attrs.items():
            self.f.attrs[k] = v
        g = self.f["gen"]
        keep = int(np.searchsorted(g["generation"][:], generations_done))
        for ds in g.values():
            ds.resize(keep, axis=0)
        e = self.f["eval"]
        keep_e = int(np.searchsorted(e["generation"][:], generations_done + 1))
        for ds in e.values():
            ds.resize(keep_e, axis=0)
        self.f.flush()

    @staticmethod
    def _append(group, row: Mapping[str, Any], names) -> None:
        n = group["generation"].shape[0]
        for name in names:
            ds = group[name]
            ds.resize(n + 1, axis=0)
            ds[n] = row[name]

    def append_generation(self, row: Mapping[str, Any]) -> None:
        self._append(self.f["gen"], row, ("generation",) + tuple(GEN_FIELDS))
        self.f.flush()

    def append_eval(self, row: Mapping[str, Any]) -> None:
        self._append(self.f["eval"], row, ("generation",) + tuple(EVAL_FIELDS))
        self.f.flush()

    def close(self) -> None:
        if getattr(self, "f", None) is not None:
            self.f.close()
            self.f = None


def read_log(path: str | Path) -> dict[str, Any]:
    """Everything in a log as numpy arrays: {'attrs', 'gen': {...}, 'eval': {...},
    'members': {...}}.  Safe on a log that is still being written (SWMR read)."""
    f = open_h5(path, KIND, "r", swmr=True)
    try:
        out: dict[str, Any] = {"attrs": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}}
        for grp in ("gen", "eval", "members"):
            g = f[grp]
            for ds in g.values():
                ds.refresh()
            # Arrays may be appended unevenly mid-write: cut to the common length.
            arrays = {k: ds[()] for k, ds in g.items()}
            if grp != "members":
                n = min(len(a) for a in arrays.values())
                arrays = {k: a[:n] for k, a in arrays.items()}
            out[grp] = arrays
        return out
    except Exception as e:  # h5py raises OSError, RuntimeError, KeyError... on damaged files
        why = (str(e).splitlines() or [""])[0]
        raise _fail(path, f"corrupted run log ({e.__class__.__name__}: {why})") from None
    finally:
        f.close()


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """A run directory for tools: read_log(RUN_DIR/log.h5) plus 'config' (the
    parsed Config from the log's config text), 'run_dir' and 'path'.  A folder
    that is not a run is a one-line UserError."""
    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(f"{d}: not a run directory (no such folder)")
    path = d / "log.h5"
    if not path.is_file():
        raise UserError(f"{d}: not an es-mpi run (no log.h5)")
    log = read_log(path)
    cfg = config_mod.loads(str(log["attrs"].get("config", "")), f"{path} (config attribute)")
    return {**log, "config": cfg, "run_dir": d, "path": path}


def rebuild_log(path: Path, generations_done: int) -> None:
    """Rewrite a run log that HDF5 will not open for writing, from what a
    read-only (SWMR) open still sees: the rows of generations < generations_done
    and the evaluations up to it.  Written beside it, then renamed over it."""
    old = read_log(path)                      # a one-line UserError if even that fails
    gen, ev, members = old["gen"], old["eval"], old["members"]
    n_members = int(members["noise_index"].shape[0])
    width = int(gen["prompts"].shape[1]) if gen["prompts"].ndim == 2 else 0
    attrs = {k: v for k, v in old["attrs"].items() if k not in ("kind", "schema_version")}
    tmp = path.with_name(path.name + ".rebuild")
    w = RunLogWriter(tmp, n_members, width, attrs, members["noise_index"], members["noise_sign"])
    try:
        for i, g in enumerate(gen["generation"]):
            if g >= generations_done:
                break
            w.append_generation({k: (gen[k][i] if k in gen else 0) for k in ("generation", *GEN_FIELDS)})
        for i, g in enumerate(ev["generation"]):
            if g <= generations_done:
                w.append_eval({k: (ev[k][i] if k in ev else 0) for k in ("generation", *EVAL_FIELDS)})
    finally:
        w.close()
    os.replace(tmp, path)
