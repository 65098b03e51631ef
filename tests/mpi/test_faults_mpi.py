"""Faults and recovery.  Three mpiexec launches, where MPI is the property under
test (a rank killed from outside; stop signals delivered to mpiexec or to one
rank); everything else runs in-process on a size-1 communicator, which is the
same code path with one rank.

Every run uses the user task tasks_for_tests:FlakyTask (the toy task whose reward
misbehaves on demand) so that the faulty runs and the reference run share one
trajectory.  A run that was killed or stopped and then resumed must end with
the reference's final digest: the digest does not depend on the rank count, so
the resumed segment runs in-process.

Open MPI's mpiexec (5.0.x) forwards SIGUSR1/SIGUSR2 to the ranks, but on
SIGTERM (or SIGINT) it sends SIGTERM to the ranks and SIGKILL about 0.3 s
later, and it refuses to forward SIGTERM (`--mca ess_base_forward_signals
SIGTERM` is rejected).  So a graceful stop under mpiexec is SIGUSR1 to
mpiexec; SIGTERM works when it reaches the ranks themselves, as Slurm and srun
deliver it (tested here by signalling one rank: the stop flag travels in the
generation's Allgather, so every rank stops after the same generation).
"""
from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, cli_train, final_digest, mpiexec_cmd, run_env
from es_mpi.runs import checkpoint
from es_mpi import config
from es_mpi.comm import serial
from es_mpi.model import weights_digest
from es_mpi.runs.runlog import read_log
from es_mpi.scoring import NONFINITE, OK, RAISED, TIMEOUT

TESTS = Path(__file__).resolve().parent.parent
PYTHONPATH = f"{ROOT}{os.pathsep}{TESTS}"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

N, B, G = 4, 4, 6
TASK = "tasks_for_tests:FlakyTask"
BASE = [f"es.population={N}", "es.antithetic=false", f"es.prompts_per_generation={B}", f"es.generations={G}",
        "eval.limit=0", "checkpoint.every=2", "checkpoint.keep=10", "model.threads=1", "es.check_every=2",
        f"task.name={TASK}"]


def _args(*sets: str) -> list[str]:
    out = ["--config", str(ROOT / "configs" / "tiny.yaml")]
    for s in (*BASE, *sets):
        out += ["--set", s]
    return out


def flaky(faults: dict, generations=None, population=N) -> list[str]:
    """--set values that make FlakyTask misbehave (see tests/tasks_for_tests.py)."""
    opts = {"population": population, "prompts": B, "faults": faults}
    if generations is not None:
        opts["generations"] = list(generations)
    return [f"task.options={opts!r}".replace("'", '"')]




def train_ok(run_dir: Path, *sets: str, resume: bool = False) -> tuple[str, str]:
    code, out, err = cli_train(*_args(*sets), "--run-dir", str(run_dir), *(["--resume"] if resume else []))
    assert code == 0, out[-2000:] + err[-2000:]
    return final_digest(out), out


def ckpt_digest(path: Path) -> str:
    ck = checkpoint.load(path)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in ck["attrs"]["names"]]
    recomputed = weights_digest([torch.from_numpy(np.asarray(ck["weights"][n])) for n in names])
    assert recomputed == ck["attrs"]["digest"], f"{path}: stored digest does not match its weights"
    return recomputed


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("es-mpi: error")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The uninterrupted run, in-process: final digest and checkpoint digests."""
    d = tmp_path_factory.mktemp("reference") / "run"
    digest, _ = train_ok(d)
    return {"digest": digest, "dir": d,
            "ckpts": {g: ckpt_digest(p) for g, p in checkpoint.list_complete(d)}}


# ------------------------------------------------------------------ mpiexec launches
def _launch(run_dir: Path, out: Path, *extra: str, **env) -> subprocess.Popen:
    cmd = mpiexec_cmd(2, "train", *_args(*extra), "--run-dir", str(run_dir))
    fh = open(out, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=run_env(PYTHONPATH=PYTHONPATH, **env), stdout=fh,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, out: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    text = out.read_text() if out is not None and out.exists() else ""
    raise AssertionError(f"timed out waiting for {what} (rc={proc.poll() if proc else None}):\n{text[-3000:]}")


def rank_pids(run_dir: Path) -> dict[int, int]:
    """{MPI rank: pid} of the es-mpi processes training into run_dir (from /proc)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            if str(run_dir).encode() not in cmd or b"es_mpi" not in cmd or b"mpi4py" not in cmd:
                continue
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        rank = env.get(b"OMPI_COMM_WORLD_RANK")
        if rank is not None and cmd[0] != b"" and b"mpiexec" not in cmd[0]:
            found[int(rank)] = int(d.name)
    return found


def _cleanup(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _resume_in_process_matches(run_dir: Path, reference: dict, stopped_at: int) -> None:
    digest, out = train_ok(run_dir, resume=True)
    assert f"resumed at generation {stopped_at}" in out, out[-2000:]
    assert digest == reference["digest"]
    log = read_log(run_dir / "log.h5")
    assert list(log["gen"]["generation"]) == list(range(G))        # no generation repeated or skipped


def test_sigkill_of_one_rank_ends_the_job_and_the_run_resumes_exactly(tmp_path, reference):
    d, out = tmp_path / "run", tmp_path / "out.txt"
    # rank 1 stops in generation 2 (0-based, after its update); rank 0 goes on
    # (the checkpoint of generation 2 is written), enters generation 3 and waits
    # in its Allgather.
    proc = _launch(d, out, ES_MPI_FAULT="sleep@gen=2,rank=1")
    try:
        ck = checkpoint.path_for(d, 2)
        _wait_for(lambda: ck.exists() and "gen 3/6" in out.read_text(), 120, "generation 3", proc, out)
        pids = rank_pids(d)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"job still running 30 s after SIGKILL of rank 1:\n{out.read_text()[-3000:]}")
        assert time.monotonic() - t0 < 30
        assert rc != 0, out.read_text()[-3000:]
        assert not rank_pids(d), "a rank outlived the job"
    finally:
        _cleanup(proc)
    assert checkpoint.latest(d) == ck
    assert ckpt_digest(ck) == reference["ckpts"][2]
    # rank 0 was killed with log.h5 open for (SWMR) writing; resume must cope with that
    _resume_in_process_matches(d, reference, 2)


def _stop_and_resume(tmp_path, reference, send) -> str:
    d, out = tmp_path / "run", tmp_path / "out.txt"
    # 0.1 s per reward call: a generation lasts ~1 s, so the signal lands mid-run
    proc = _launch(d, out, ES_MPI_TEST_REWARD_DELAY="0.1")
    try:
        _wait_for(lambda: "gen 1/6" in out.read_text(), 120, "generation 1", proc, out)
        send(proc, d)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 60 s after the stop signal:\n{out.read_text()[-3000:]}")
    finally:
        _cleanup(proc)
    text = out.read_text()
    assert rc == 75, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    line = [l for l in text.splitlines() if "stop signal: checkpoint at generation" in l]
    assert len(line) == 1, text[-3000:]
    stopped = int(line[0].split("generation ")[1].split(" ")[0].rstrip(";"))
    assert 1 <= stopped < G, line
    assert text.count(f"gen-{stopped:06d}.h5") == 1, "the stop checkpoint was written twice"
    ck = checkpoint.latest(d)
    assert ck == checkpoint.path_for(d, stopped)
    assert ckpt_digest(ck) == final_digest(text)
    assert len(read_log(d / "log.h5")["gen"]["generation"]) == stopped
    _resume_in_process_matches(d, reference, stopped)
    return text


def test_sigusr1_to_mpiexec_checkpoints_exits_75_and_resumes_exactly(tmp_path, reference):
    _stop_and_resume(tmp_path, reference, lambda proc, d: os.kill(proc.pid, signal.SIGUSR1))


def test_sigterm_to_one_rank_stops_every_rank_after_the_generation(tmp_path, reference):
    def send(proc, d):
        pids = rank_pids(d)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGTERM)        # the writer, rank 0, hears of it through the Allgather

    _stop_and_resume(tmp_path, reference, send)


# ------------------------------------------------------------------ in-process: rewards
def test_members_whose_reward_raises_or_is_not_finite_are_left_out(tmp_path, cache_dir):
    n = 6
    sets = [f"es.population={n}", "es.generations=2",
            *flaky({"1": "raise", "3": "nan", "4": "inf", "5": "ninf"}, generations=[1], population=n)]
    digest, out = train_ok(tmp_path / "run", *sets)
    log = read_log(tmp_path / "run" / "log.h5")["gen"]
    assert list(log["n_invalid"]) == [0, 4]
    st = log["status"][1]
    assert list(st) == [OK, RAISED, OK, NONFINITE, NONFINITE, NONFINITE]
    assert list(log["valid"][1]) == [1, 0, 1, 0, 0, 0]
    r = log["rewards"][1]
    assert np.isnan(r[[1, 3, 4, 5]]).all() and np.isfinite(r[[0, 2]]).all()
    # left out: the shaped scores are the z-scores of the valid members alone
    rv = r[[0, 2]]
    assert np.allclose(log["shaped"][1][[0, 2]], (rv - rv.mean()) / (rv.std() + 1e-8))
    assert (log["shaped"][1][[1, 3, 4, 5]] == 0).all()
    assert log["update_norm"][1] > 0 and log["reward_mean"][1] == pytest.approx(rv.mean())
    assert "gen 2/2" in out and "invalid 4" in out


def test_generation_with_every_member_invalid_makes_no_update(tmp_path, cache_dir):
    d = tmp_path / "run"
    digest, out = train_ok(d, "es.generations=3", "checkpoint.every=1", *flaky({"*": "nan"}, generations=[1]))
    ck = {g: ckpt_digest(p) for g, p in checkpoint.list_complete(d)}
    assert sorted(ck) == [1, 2, 3]
    assert ck[1] == ck[2], "weights changed in a generation without valid members"
    assert ck[2] != ck[3] and digest == ck[3]
    log = read_log(d / "log.h5")["gen"]
    assert list(log["n_invalid"]) == [0, N, 0] and log["update_norm"][1] == 0 and log["update_norm"][2] > 0
    gen2 = [l for l in out.splitlines() if "gen 2/3" in l]
    assert len(gen2) == 1 and "no update" in gen2[0] and f"invalid {N}" in gen2[0], out


def test_reward_that_hangs_times_out_and_the_run_goes_on(tmp_path, cache_dir):
    t0 = time.monotonic()
    train_ok(tmp_path / "run", "es.generations=2", "task.reward_timeout=0.3",
             *flaky({"0": "sleep", "2": "spin"}, generations=[0]))
    assert time.monotonic() - t0 < 30
    log = read_log(tmp_path / "run" / "log.h5")["gen"]
    assert list(log["status"][0]) == [TIMEOUT, OK, TIMEOUT, OK]
    assert list(log["n_invalid"]) == [2, 0] and log["update_norm"][0] > 0


# ------------------------------------------------------------------ in-process: refusals
def test_nonfinite_update_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, reference, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("ES_MPI_FAULT", "nonfinite@gen=3")
    code, out, err = cli_train(*_args(), "--run-dir", str(d))
    assert code == 3, out[-2000:] + err[-2000:]
    line = one_error_line(err)
    assert "generation 3" in line and "non-finite update" in line, line
    assert "final-digest" not in out and "gen 3/6" in out and "gen 4/6" not in out
    assert [g for g, _ in checkpoint.list_complete(d)] == [2]
    assert checkpoint.latest(d) == checkpoint.path_for(d, 2)
    assert ckpt_digest(checkpoint.path_for(d, 2)) == reference["ckpts"][2]
    assert not [p for p in (d / "checkpoints").iterdir() if p.name.startswith(".")]


def _fsize_limited(limit: int):
    """RLIMIT_FSIZE for this process (writes past `limit` bytes fail with EFBIG;
    Python ignores SIGXFSZ).  Unlike permissions, it binds root too, and unlike a
    small tmpfs it needs no mount privilege."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    return soft, hard


def _after_write_failure(d: Path, reference: dict) -> None:
    assert checkpoint.latest(d) == checkpoint.path_for(d, 2)
    assert ckpt_digest(checkpoint.path_for(d, 2)) == reference["ckpts"][2]
    assert not [p for p in (d / "checkpoints").iterdir() if p.name.startswith(".")], "temporary file left"
    # and the run resumes from that checkpoint to the reference's end
    digest, _ = train_ok(d, resume=True)
    assert digest == reference["digest"]


# A full disk, as root: RLIMIT_FSIZE makes a write past the limit fail with EFBIG
# (Python ignores SIGXFSZ).  Permissions do not bind root and a small tmpfs needs
# mount privileges; the limit needs neither.  The test task sets it from inside
# generation 2 (0-based), after the checkpoint of generation 2 has been written.
FSIZE_AT = 2 * N * B


def test_checkpoint_write_failure_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, reference,
                                                                                 monkeypatch):
    d = tmp_path / "run"
    # checkpoints are ~0.5 MB, the log < 0.2 MB: the checkpoint of generation 4 fails
    monkeypatch.setenv("ES_MPI_TEST_FSIZE", f"{FSIZE_AT}:200000")
    saved = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        code, out, err = cli_train(*_args(), "--run-dir", str(d))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, saved)
    assert code == 2, out[-2000:] + err[-2000:]
    line = one_error_line(err)
    assert "gen-000004.h5: checkpoint write failed (File too large)" in line and "intact" in line, line
    assert "gen 4/6" in out and "gen 5/6" not in out
    monkeypatch.delenv("ES_MPI_TEST_FSIZE")
    _after_write_failure(d, reference)


def test_log_write_failure_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, reference):
    # A subprocess: after a failed write HDF5 may crash when the file is closed,
    # so es-mpi leaves the file open and ends with os._exit (not in pytest's process).
    d = tmp_path / "run"
    cmd = [sys.executable, "-m", "es_mpi", "train", *_args(), "--run-dir", str(d)]
    p = subprocess.run(cmd, cwd=ROOT, env=run_env(PYTHONPATH=PYTHONPATH, ES_MPI_TEST_FSIZE=f"{FSIZE_AT}:1"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    line = one_error_line(p.stderr)
    assert "log.h5: log write failed (File too large)" in line and "intact" in line, line
    # the row of generation 3 is written before its progress line
    assert "gen 2/6" in p.stdout and "gen 3/6" not in p.stdout
    _after_write_failure(d, reference)


def test_unwritable_run_dir_is_one_line(tmp_path, cache_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out, err = cli_train(*_args(), "--run-dir", str(blocker / "run"))
    assert code == 2
    assert str(blocker) in one_error_line(err)
