"""Command line: argument parsing only; the work lives in the modules it calls.

Errors: a UserError (bad input) prints one line `es-mpi: error: ...` (rank 0,
or the rank that saw it) and exits 2 on every rank; a RunAborted (divergence,
non-finite update) exits 3.  An error that only one rank sees after set-up
aborts the whole MPI job, so no rank is left waiting in a collective.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import RunAborted, UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _fail(comm, exc: Exception, collective: bool) -> None:
    code = getattr(exc, "exit_code", 1)
    if collective or comm is None or comm.size == 1:
        if comm is None or comm.is_root or not collective:
            click.echo(f"es-mpi: error: {exc}", err=True)
        sys.exit(code)
    click.echo(f"es-mpi: error (rank {comm.rank}): {exc}", err=True)
    comm.abort(code)


def _run(fn, comm_box: list):
    """Run a command body, mapping known errors to one-line messages.
    comm_box[1] says whether the failure is known to be collective (all ranks)."""
    try:
        return fn()
    except (UserError, RunAborted) as e:
        comm = comm_box[0] if comm_box else None
        _fail(comm, e, comm_box[1] if len(comm_box) > 1 else True)


def _default_config() -> Path | None:
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="es-mpi")
def main():
    """Fine-tune language models with evolution strategies over MPI.

    Launch on R ranks with:  mpiexec -n R python -m mpi4py -m es_mpi COMMAND ...
    """


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (default: configs/demo.yaml, SmolLM2-135M on conciseness).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config key.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: runs/<config name>-<time>).")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its newest checkpoint.")
@click.option("--force", is_flag=True, help="With --resume: accept trajectory-changing config changes.")
def train(config_path, overrides, run_dir, resume, force):
    """Run ES training (on every rank of the MPI job)."""
    from . import comm as comm_mod
    from . import config as config_mod
    from .rundir import setup_logging

    comm = comm_mod.init()
    setup_logging(comm)
    box = [comm, True]

    def body():
        path = config_path or _default_config()
        if resume and run_dir is None:
            raise UserError("--resume needs --run-dir")
        if resume and config_path is None and (Path(run_dir) / "config.yaml").is_file():
            path = Path(run_dir) / "config.yaml"
        cfg = comm.agree(lambda: config_mod.load(path, overrides))
        rd = run_dir
        if rd is None:
            stem = Path(path).stem if path else "run"
            rd = comm.bcast_json(os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"))
        from .trainer import Trainer

        trainer = Trainer(cfg, comm, Path(rd), resume=resume, force=force)
        box[1] = False  # from here an error may be seen by one rank only
        return trainer.run()

    code = _run(body, box)
    sys.exit(code or 0)


@main.command()
@click.option("--task", "task_name", required=True, help="Task name or package.module:Class.")
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL: the task's fields plus `response`.")
@click.option("--output", "output_path", default="-", type=click.Path(dir_okay=False, allow_dash=True),
              help="Output JSONL (default: stdout).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Task option.")
def score(task_name, input_path, output_path, options):
    """Score responses with a task's reward (no model, no MPI)."""
    from .score import score_file

    def body():
        score_file(task_name, input_path, output_path, options)

    _run(body, [None, True])


if __name__ == "__main__":  # pragma: no cover
    main()
