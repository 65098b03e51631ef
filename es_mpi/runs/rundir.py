"""Everything rank 0 writes, in one place: the run directory, config.yaml,
log.h5, checkpoints and progress lines.  On other ranks every method is a
no-op, so the trainer calls them unconditionally.

RUN_DIR/
  config.yaml        the resolved config
  log.h5             the run log (runlog.py)
  checkpoints/       gen-000100.h5 ... (checkpoint.py)
"""
from __future__ import annotations

import io
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

from . import checkpoint
from ..comm import Comm
from ..errors import UserError
from .runlog import RunLogWriter, rebuild_log

log = logging.getLogger("es_mpi")

# A generation's log row is a few kB; below this much free space the run
# stops cleanly before HDF5 hits the full disk (see LogWriteFailed).
LOG_MIN_FREE = 8 << 20


class LogWriteFailed(UserError):
    """log.h5 could not be written.  HDF5 (2.0) left with a failed write can
    crash while closing the file, also at interpreter exit, so the file is not
    closed and `es-mpi train` ends with os._exit after its one-line message."""
    hard_exit = True


def io_reason(e: BaseException) -> str:
    """A one-line reason from an OSError or an h5py error (whose text spans lines)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    m = re.search(r"error message = '([^']+)'", str(e))
    if m:
        return m.group(1)
    return (str(e).splitlines() or [e.__class__.__name__])[0].strip()


def setup_logging(comm: Comm, level: int = logging.INFO) -> None:
    """INFO on rank 0, WARNING elsewhere, rank/size in every line (Slurm logs
    interleave ranks)."""
    handler = logging.StreamHandler(sys.stdout if comm.is_root else sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [{comm.rank}/{comm.size}] %(message)s",
                                           datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("es_mpi")
    root.handlers[:] = [handler]
    root.setLevel(level if comm.is_root else logging.WARNING)
    root.propagate = False


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to start over an existing run (nothing is overwritten) and to
    resume where there is no run.  Pure checks: safe on every rank."""
    has_log = (run_dir / "log.h5").exists()
    if resume:
        if not has_log:
            raise UserError(f"{run_dir}: --resume but there is no run here (no log.h5)")
        if checkpoint.latest(run_dir) is None:
            found = checkpoint.list_complete(run_dir)
            if found:  # say why the newest one cannot be used
                try:
                    checkpoint.load(found[-1][1])
                except UserError as e:
                    raise UserError(f"--resume: no usable checkpoint in {run_dir / 'checkpoints'}; "
                                    f"newest: {e}") from None
            raise UserError(f"{run_dir}: --resume but no complete checkpoint in {run_dir / 'checkpoints'}")
    elif has_log:
        raise UserError(f"{run_dir}: a run already exists here; pass --resume to continue it "
                        "or choose another --run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a directory")


class RunOutput:
    def __init__(self, comm: Comm, run_dir: Path):
        self.comm = comm
        self.run_dir = Path(run_dir)
        self.root = comm.is_root
        self.log_writer: RunLogWriter | None = None
        self.broken = False

    def start(self, config_text: str, population: int, prompts: int, attrs: Mapping[str, Any],
              noise_index, noise_sign, resume_at: int | None) -> None:
        if not self.root:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_at is None:
                tmp = self.run_dir / ".config.yaml.tmp"
                tmp.write_text(config_text)
                os.replace(tmp, self.run_dir / "config.yaml")
        except OSError as e:
            raise UserError(f"{self.run_dir}: cannot write run directory ({e.strerror})") from None
        path = self.run_dir / "log.h5"
        try:
            try:
                self.log_writer = RunLogWriter(path, population, prompts, attrs, noise_index, noise_sign,
                                               resume_at)
            except UserError:
                if resume_at is None:
                    raise
                # A writer that was killed leaves HDF5's "open for writing" mark in
                # the file, and HDF5 then refuses to open it for writing again.
                rebuild_log(path, resume_at)
                log.warning("%s: the run log was not closed (killed run?); rebuilt it from what it holds", path)
                self.log_writer = RunLogWriter(path, population, prompts, attrs, noise_index, noise_sign,
                                               resume_at)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: cannot write the run log ({io_reason(e)})") from None

    def _append(self, what: str, row: Mapping[str, Any]) -> None:
        if self.log_writer is None:
            return
        path = self.run_dir / "log.h5"
        try:
            free = shutil.disk_usage(self.run_dir).free
        except OSError:
            free = LOG_MIN_FREE
        if free < LOG_MIN_FREE:
            raise UserError(f"{path}: disk full ({free >> 10} kB free in {self.run_dir}); "
                            "the last checkpoint is intact")
        # When a write fails, h5py also prints a traceback for each handle it
        # frees on the way out: held back here, passed on if the write succeeds.
        stderr, sys.stderr = sys.stderr, io.StringIO()
        try:
            (self.log_writer.append_generation if what == "gen" else self.log_writer.append_eval)(row)
        except (OSError, RuntimeError, ValueError) as e:
            self.broken = True
            self._wreck = (self.log_writer, e)  # keep every h5py handle alive: freeing one tries to close it
            raise LogWriteFailed(f"{path}: log write failed ({io_reason(e)}); "
                                 "the last checkpoint is intact") from None
        finally:
            held, sys.stderr = sys.stderr.getvalue(), stderr
        if held:
            sys.stderr.write(held)

    def generation(self, row: Mapping[str, Any]) -> None:
        self._append("gen", row)

    def evaluation(self, row: Mapping[str, Any]) -> None:
        self._append("eval", row)

    def checkpoint(self, generation: int, weights, optimizer, attrs, keep: int) -> Path | None:
        """Write a checkpoint (rank 0).  `weights`, `optimizer` and `attrs` may
        be callables that build them: they are then called on rank 0 only, so
        no other rank copies the master (4 bytes per parameter) or the
        optimiser's state (8 more with Adam) to the host, or hashes it."""
        if not self.root:
            return None
        weights, optimizer, attrs = (x() if callable(x) else x for x in (weights, optimizer, attrs))
        path = checkpoint.save(self.run_dir, generation, weights, optimizer, attrs)
        try:
            checkpoint.prune(self.run_dir, keep)
        except OSError as e:
            log.warning("%s: could not delete old checkpoints (%s)", self.run_dir / "checkpoints", e.strerror)
        return path

    def info(self, msg: str, *args) -> None:
        log.info(msg, *args)

    def warning(self, msg: str, *args) -> None:
        """A warning about the whole job: printed once, by rank 0."""
        if self.root:
            log.warning(msg, *args)

    def line(self, text: str) -> None:
        """A bare line on stdout (e.g. `final-digest: ...`), rank 0 only."""
        if self.root:
            print(text, flush=True)

    def close(self) -> None:
        w, self.log_writer = self.log_writer, None
        if w is None or self.broken:  # a broken HDF5 file is left alone (see LogWriteFailed)
            return
        try:
            w.close()
        except (OSError, RuntimeError) as e:
            self.broken = True
            self._wreck = (w, e)
            raise LogWriteFailed(f"{self.run_dir / 'log.h5'}: log write failed on close ({io_reason(e)}); "
                                 "the last checkpoint is intact") from None

