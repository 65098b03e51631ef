"""Launched with mpiexec inside a timeout: rank-count invariance, divergence
detection, and one failing rank ending the whole job.  Launches are costly
(seconds each), so each test launches as few as it can."""
import time

import numpy as np
import pytest

from conftest import final_digest, mpiexec_cmd, run
from es_mpi.runs.runlog import read_log

# Population 7: neither 2 nor 3 divides it.  Threads are fixed at 1 per rank,
# so every member is decoded by the same kernels whatever the rank count.
SMALL = ["--config", "configs/tiny.yaml", "--set", "es.population=7", "--set", "es.antithetic=false",
         "--set", "es.generations=3", "--set", "eval.limit=0", "--set", "checkpoint.every=0",
         "--set", "model.threads=1", "--set", "es.check_every=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    out = {}
    for n in (1, 2, 3):
        d = tmp_path_factory.mktemp(f"ranks{n}") / "run"
        p = run(mpiexec_cmd(n, "train", *SMALL, "--run-dir", str(d)), timeout=240, ES_MPI_CACHE=str(cache_dir))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        out[n] = (final_digest(p.stdout), read_log(d / "log.h5"), p)
    return out


def test_same_final_digest_on_1_2_3_ranks(runs):
    digests = {n: r[0] for n, r in runs.items()}
    assert len(set(digests.values())) == 1, digests


def test_same_rewards_every_generation_on_1_2_3_ranks(runs):
    base = runs[1][1]["gen"]["rewards"]
    assert base.shape == (3, 7) and np.isfinite(base).all()
    for n in (2, 3):
        assert np.array_equal(runs[n][1]["gen"]["rewards"], base)
        assert runs[n][1]["attrs"]["world_size"] == n


def test_only_rank_zero_prints_progress(runs):
    out = runs[3][2].stdout
    assert "[0/3] gen 3/3" in out and "[1/3]" not in out and "[2/3]" not in out


def test_planted_divergence_aborts_all_ranks(tmp_path, cache_dir):
    t0 = time.monotonic()
    p = run(mpiexec_cmd(2, "train", *SMALL, "--run-dir", str(tmp_path / "run")), timeout=60,
            ES_MPI_CACHE=str(cache_dir), ES_MPI_FAULT="diverge@gen=1,rank=1")
    assert p.returncode != 0
    assert time.monotonic() - t0 < 30
    assert "generation 1" in p.stderr and "rank(s) 1 differ" in p.stderr, p.stderr[-2000:]


def test_exception_on_one_rank_ends_the_job(tmp_path, cache_dir):
    t0 = time.monotonic()
    p = run(mpiexec_cmd(2, "train", *SMALL, "--run-dir", str(tmp_path / "run")), timeout=60,
            ES_MPI_CACHE=str(cache_dir), ES_MPI_FAULT="raise@gen=1,rank=1")
    assert p.returncode != 0
    assert time.monotonic() - t0 < 30
    assert "injected fault on rank 1" in p.stderr
