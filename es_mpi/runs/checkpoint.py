"""Atomic HDF5 checkpoints: `RUN_DIR/checkpoints/gen-000100.h5`.

Contents (schema 1):
  /weights/<name>     fp32 master, one dataset per parameter, named as in the HF state dict
  /optimizer/<key>    optimizer state (t, m/<name>, v/<name> for Adam)
  attrs: kind, schema_version, es_mpi_version, noise_scheme (noise.scheme_for of its config),
         generation (generations done), seed, config (YAML), digest (SHA-256 of
         the weights, see model.weights_digest), base_model, names (parameter order),
         noise_fingerprint (JSON, noise.fingerprint: what the writer's device draws;
         absent before es-mpi recorded it)

Written as a temporary file in the same folder, fsynced, then renamed, then the
folder fsynced: a checkpoint file either is complete or does not exist under
its final name.  A kill -9 mid-write leaves only a `.tmp-*` file, which
`latest()` ignores.  No pickle: datasets and attributes only.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from .. import __version__
from ..errors import UserError
from .runlog import SCHEMA_VERSION, open_h5

KIND = "es-mpi-checkpoint"
_NAME = re.compile(r"^gen-(\d{6,})\.h5$")


def path_for(run_dir: str | Path, generation: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"gen-{generation:06d}.h5"


def save(run_dir: str | Path, generation: int, weights: Mapping[str, np.ndarray],
         optimizer: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> Path:
    return write(path_for(run_dir, generation), generation, weights, optimizer, attrs)


def write(final: str | Path, generation: int, weights: Mapping[str, np.ndarray],
          optimizer: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> Path:
    """Atomically write a checkpoint file at any path (`es-mpi replay --out`)."""
    # imported here: noise pulls in torch, which the readers of this module
    # (`es-mpi info`) need not load; every writer has it loaded already
    from .. import config as config_mod
    from ..engine.noise import scheme_for

    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{final.parent}: cannot create checkpoint folder ({e.strerror})") from None
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    # The HDF5 file is built in memory, then written with plain file I/O: a
    # full disk, a quota or a file-size limit then fails here with a clean
    # OSError.  HDF5 (2.0) itself, when a write fails under it, can leave the
    # file in a state where closing it crashes the process.  Costs a second
    # copy of the checkpoint in rank 0's memory while it is written.
    image = io.BytesIO()
    try:
        with h5py.File(image, "w") as f:
            f.attrs["kind"] = KIND
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["es_mpi_version"] = __version__
            # whatever wrote the weights drew the noise its config defines
            f.attrs["noise_scheme"] = scheme_for(config_mod.loads(str(attrs.get("config", "")) or "{}").es)
            f.attrs["generation"] = int(generation)
            f.attrs["names"] = list(weights)
            for k, v in attrs.items():
                f.attrs[k] = v
            w = f.create_group("weights")
            for name, arr in weights.items():
                w.create_dataset(name, data=arr)
            o = f.create_group("optimizer")
            for key, arr in optimizer.items():
                o.create_dataset(key, data=arr)
            f.attrs["complete"] = 1  # written last: a file without it is never trusted
        with open(tmp, "wb") as fh, image.getbuffer() as view:
            fh.write(view)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        dfd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        why = e.strerror or str(e).splitlines()[0]
        raise UserError(f"{final}: checkpoint write failed ({why}); "
                        "the previous checkpoint is intact") from None
    finally:
        image.close()
    return final


def list_complete(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(generation, path) of every checkpoint under its final name, oldest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest(run_dir: str | Path) -> Path | None:
    """Newest checkpoint that opens and is marked complete (older ones are
    tried if the newest is damaged)."""
    for _, p in reversed(list_complete(run_dir)):
        try:
            with open_h5(p, KIND) as f:
                if int(f.attrs.get("complete", 0)) == 1:
                    return p
        except UserError:
            continue
    return None


def prune(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns what was removed."""
    items = list_complete(run_dir)
    gone = []
    for _, p in items[: max(0, len(items) - keep)]:
        p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def config_text(path: str | Path) -> str:
    """The run config a checkpoint was written with, read from its attributes
    alone (no weights); a missing one is a one-line UserError naming the file."""
    with open_h5(path, KIND) as f:
        text = f.attrs.get("config")
    if text is None:
        raise UserError(f"{path}: corrupted checkpoint (no config attribute)")
    return text.decode() if isinstance(text, bytes) else str(text)


def load(path: str | Path) -> dict[str, Any]:
    """{'attrs', 'weights': {name: array}, 'optimizer': {key: array}}; every
    problem is a one-line UserError naming the file."""
    with open_h5(path, KIND) as f:
        try:
            if int(f.attrs.get("complete", 0)) != 1:
                raise UserError(f"{path}: incomplete checkpoint (no 'complete' mark)")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["names"]]
            weights = {n: f["weights"][n][()] for n in names}
            opt: dict[str, np.ndarray] = {}
            f["optimizer"].visititems(lambda k, o: opt.__setitem__(k, o[()]) if isinstance(o, h5py.Dataset) else None)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path}: corrupted checkpoint ({e.__class__.__name__}: {e})") from None
    return {"attrs": attrs, "weights": weights, "optimizer": opt}
