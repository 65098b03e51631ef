"""Everything rank 0 writes, in one place: the run directory, config.yaml,
log.h5, checkpoints and progress lines.  On other ranks every method is a
no-op, so the trainer calls them unconditionally.

RUN_DIR/
  config.yaml        the resolved config
  log.h5             the run log (runlog.py)
  checkpoints/       gen-000100.h5 ... (checkpoint.py)
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from . import checkpoint
from .comm import Comm
from .errors import UserError
from .runlog import RunLogWriter

log = logging.getLogger("es_mpi")


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
        self.log_writer = RunLogWriter(self.run_dir / "log.h5", population, prompts, attrs,
                                       noise_index, noise_sign, resume_at)

    def generation(self, row: Mapping[str, Any]) -> None:
        if self.log_writer is not None:
            try:
                self.log_writer.append_generation(row)
            except OSError as e:
                raise UserError(f"{self.run_dir / 'log.h5'}: log write failed ({e}); "
                                "the last checkpoint is intact") from None

    def evaluation(self, row: Mapping[str, Any]) -> None:
        if self.log_writer is not None:
            self.log_writer.append_eval(row)

    def checkpoint(self, generation: int, weights, optimizer, attrs, keep: int) -> Path | None:
        if not self.root:
            return None
        path = checkpoint.save(self.run_dir, generation, weights, optimizer, attrs)
        checkpoint.prune(self.run_dir, keep)
        return path

    def info(self, msg: str, *args) -> None:
        log.info(msg, *args)

    def line(self, text: str) -> None:
        """A bare line on stdout (e.g. `final-digest: ...`), rank 0 only."""
        if self.root:
            print(text, flush=True)

    def close(self) -> None:
        if self.log_writer is not None:
            self.log_writer.close()
            self.log_writer = None
