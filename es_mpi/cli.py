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
        if getattr(exc, "hard_exit", False):
            # e.g. a failed log write: HDF5 may crash while closing that file at
            # interpreter exit, which would turn this clean exit into a segfault.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
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


def _world():
    """MPI communicator with rank-aware logging, for the commands that run on ranks."""
    from . import comm as comm_mod
    from .runs.rundir import setup_logging

    comm = comm_mod.init()
    setup_logging(comm)
    return comm


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
    from .host import tune_allocator

    tune_allocator()


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
    from . import config as config_mod
    from . import signals

    comm = _world()
    prev_signals = signals.catch_stop_signals()  # a stop signal during set-up stops after the first generation
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

    code = None
    try:
        code = _run(body, box)
    finally:
        signals.clear_stop()
        if code != 75:  # after a stop (exit 75) the process keeps ignoring stop signals until it has exited
            signals.restore_signals(prev_signals)
    sys.exit(code or 0)


@main.command("eval")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (default: configs/demo.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config key.")
@click.option("--checkpoint", "ckpt", type=click.Path(dir_okay=False), default=None,
              help="Score these weights (an es-mpi checkpoint) instead of the base model.")
@click.option("--model", "model_path", default=None, help="Score this model instead (sets model.path).")
@click.option("--split", default="heldout", show_default=True, help="heldout or train.")
@click.option("--limit", default=0, type=click.IntRange(min=0), help="First N prompts only (0: all).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Per-prompt JSONL.")
def eval_cmd(config_path, overrides, ckpt, model_path, split, limit, out_path):
    """Greedy-decode and score a task split, sharded over the MPI ranks."""
    from . import config as config_mod

    comm = _world()
    box = [comm, True]

    def body():
        sets = list(overrides) + ([f"model.path={model_path}"] if model_path else [])
        cfg = comm.agree(lambda: config_mod.load(config_path or _default_config(), sets))
        from .commands.evaluate import run_eval

        run_eval(cfg, comm, split, limit, out_path, ckpt)

    _run(body, box)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (default: configs/demo.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config key.")
@click.option("--generations", default=1, type=click.IntRange(min=1), show_default=True,
              help="Generations timed in each phase.")
@click.option("--compare-ranks", is_flag=True, help="Also run the same generations on one rank.")
@click.option("--baseline", type=click.Choice(["paper"]), default=None,
              help="Also run the ES paper's per-member loop on the same work (generations per hour).")
@click.option("--update-n", "update_n", default="", metavar="N,N,...",
              help="Also time one update at each of these populations (same noise kind).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write figures here.")
def bench(config_path, overrides, generations, compare_ranks, baseline, update_n, json_path):
    """ES generations against pure inference on the same work (run on 1+ ranks)."""
    from . import config as config_mod

    comm = _world()
    box = [comm, True]

    def body():
        cfg = comm.agree(lambda: config_mod.load(config_path or _default_config(), overrides))
        from .commands.bench import format_table, run_bench, write_json

        try:
            pops = [int(x) for x in update_n.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--update-n {update_n!r}: expected populations like 8,32,128") from None
        if any(n < 1 for n in pops):
            raise UserError(f"--update-n {update_n!r}: populations must be >= 1")
        res = run_bench(cfg, comm, generations, compare_ranks, baseline or "", pops)
        if comm.is_root:
            click.echo(format_table(res))
            if json_path:
                write_json(json_path, res)

    _run(body, box)


@main.command()
@click.option("--task", "task_name", required=True, help="Task name or package.module:Class.")
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL: the task's fields plus `response`.")
@click.option("--output", "output_path", default="-", type=click.Path(dir_okay=False, allow_dash=True),
              help="Output JSONL (default: stdout).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Task option.")
def score(task_name, input_path, output_path, options):
    """Score responses with a task's reward (no model, no MPI)."""
    from .commands.score import score_file

    def body():
        score_file(task_name, input_path, output_path, options)

    _run(body, [None, True])


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--generation", "-g", required=True, type=int, help="Generations done (0: the base model).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint file to write (not overwritten).")
@click.option("--force", is_flag=True,
              help="Replay even where this device draws other noise than the run's (noise fingerprint).")
def replay(run_dir, generation, out_path, force):
    """Rebuild the weights after G generations from the base model and log.h5 (serial, no checkpoint)."""
    from .commands.replay import replay as do_replay

    def body():
        res = do_replay(run_dir, generation, out_path, force)
        for w in res["warnings"]:
            click.echo(f"es-mpi: warning: {w}", err=True)
        click.echo(f"replayed {res['generation']} generation(s) -> {res['path']} (digest {res['digest']})")

    _run(body, [None, True])


@main.command()
@click.argument("ckpt", metavar="CHECKPOINT", type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path(), help="Folder to create (must not exist).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Weights dtype (default: the run's model.dtype).")
def export(ckpt, out_path, dtype):
    """Write a checkpoint (or a run dir's newest) as a Hugging Face model folder."""
    from .commands.export import export as do_export

    def body():
        res = do_export(ckpt, out_path, dtype)
        click.echo(f"exported generation {res['generation']} as {res['dtype']} -> {res['path']}")

    _run(body, [None, True])


@main.command()
@click.argument("run_dir", type=click.Path())
def info(run_dir):
    """Summarise a run from its log (also while it is being written)."""
    from .commands.info import info_lines

    def body():
        click.echo("\n".join(info_lines(run_dir)))

    _run(body, [None, True])


if __name__ == "__main__":  # pragma: no cover
    main()
