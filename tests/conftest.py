"""Shared fixtures.  Tests build the tiny model into a session-wide cache, so
it is built once per test session (a few seconds)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("es-mpi-cache")
    os.environ["ES_MPI_CACHE"] = str(d)
    return d


@pytest.fixture
def comm():
    """A size-1 communicator: the serial path is the MPI path with one rank."""
    from es_mpi.comm import serial

    return serial()


def mpiexec_cmd(n: int, *args: str) -> list[str]:
    """`mpiexec -n N python -m mpi4py -m es_mpi ARGS` with the venv's Open MPI."""
    mpiexec = VENV_BIN / "mpiexec"
    return [str(mpiexec), "-n", str(n), "--oversubscribe", sys.executable, "-m", "mpi4py", "-m", "es_mpi",
            *args]


def run_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(ROOT),
               TQDM_DISABLE="1")
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float, **env) -> subprocess.CompletedProcess:
    """Run a command with a hard timeout (a hang is a failure, not a stall)."""
    return subprocess.run(cmd, cwd=ROOT, env=run_env(**env), capture_output=True, text=True, timeout=timeout)


def final_digest(stdout: str) -> str:
    lines = [l for l in stdout.splitlines() if l.startswith("final-digest: ")]
    assert lines, f"no final-digest line in:\n{stdout[-3000:]}"
    return lines[-1].split(": ", 1)[1].strip()


def cli_train(*args: str):
    """`es-mpi train ARGS` in this process (rank 0 of 1): (exit code, stdout, stderr).
    Restores torch's thread count, which the trainer sets."""
    import torch
    from click.testing import CliRunner

    from es_mpi.cli import main

    threads = torch.get_num_threads()
    try:
        r = CliRunner().invoke(main, ["train", *args], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    return r.exit_code, r.stdout, r.stderr
