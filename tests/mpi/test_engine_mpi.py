"""Launched with mpiexec inside a timeout: rank-count invariance for both
noise kinds (N = 7 on 1, 2, 3 ranks; N = 2 on 3 ranks, R > N), divergence
detection, and one failing rank ending the whole job.  Launches are costly
(seconds each), so each test launches as few as it can."""
import time

import numpy as np
import pytest

from conftest import cli_train, final_digest, mpiexec_cmd, run
from es_mpi.runs.runlog import read_log

# Population 7: neither 2 nor 3 divides it.  Threads are fixed at 1 per rank,
# so every member is decoded by the same kernels whatever the rank count.
SMALL = ["--config", "configs/tiny.yaml", "--set", "es.population=7", "--set", "es.antithetic=false",
         "--set", "es.generations=3", "--set", "eval.limit=0", "--set", "checkpoint.every=0",
         "--set", "model.threads=1", "--set", "es.check_every=1"]


# Low-rank noise with tiles of 12 rows, so tiles mix members (8 prompts each)
LOWRANK = ["--set", "es.noise=lowrank", "--set", "generation.batch_size=12"]
# R > N: 2 members on 3 ranks, tiles of 4 of the 8 prompts (4 tiles for 3 ranks)
TWO = ["--set", "es.population=2", "--set", "generation.batch_size=4"]
KINDS = {"full": [], "lowrank": LOWRANK}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    out = {}
    for kind, extra in KINDS.items():
        for n in (1, 2, 3):
            d = tmp_path_factory.mktemp(f"{kind}{n}") / "run"
            p = run(mpiexec_cmd(n, "train", *SMALL, *extra, "--run-dir", str(d)), timeout=240,
                    ES_MPI_CACHE=str(cache_dir))
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
            out[kind, n] = (final_digest(p.stdout), read_log(d / "log.h5"), p)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_same_final_digest_on_1_2_3_ranks(runs, kind):
    digests = {n: runs[kind, n][0] for n in (1, 2, 3)}
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("kind", KINDS)
def test_same_rewards_every_generation_on_1_2_3_ranks(runs, kind):
    base = runs[kind, 1][1]["gen"]["rewards"]
    assert base.shape == (3, 7) and np.isfinite(base).all()
    for n in (2, 3):
        assert np.array_equal(runs[kind, n][1]["gen"]["rewards"], base)
        assert runs[kind, n][1]["attrs"]["world_size"] == n


def test_the_noise_kinds_differ(runs):
    assert runs["full", 1][0] != runs["lowrank", 1][0]
    assert runs["lowrank", 1][1]["attrs"]["noise_scheme"].startswith("lowrank-r1-layers+")


@pytest.mark.parametrize("kind", KINDS)
def test_more_ranks_than_members_is_bit_identical_to_one_rank(tmp_path, cache_dir, kind, monkeypatch):
    monkeypatch.setenv("ES_MPI_CACHE", str(cache_dir))
    code, out, err = cli_train(*SMALL, *KINDS[kind], *TWO, "--run-dir", str(tmp_path / "one"))
    assert code == 0, err
    p = run(mpiexec_cmd(3, "train", *SMALL, *KINDS[kind], *TWO, "--run-dir", str(tmp_path / "three")), timeout=240,
            ES_MPI_CACHE=str(cache_dir))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert final_digest(p.stdout) == final_digest(out)
    assert "have no work" not in p.stdout + p.stderr        # 4 tiles: every rank decodes
    logs = read_log(tmp_path / "one" / "log.h5"), read_log(tmp_path / "three" / "log.h5")
    assert np.array_equal(logs[0]["gen"]["rewards"], logs[1]["gen"]["rewards"])


def test_only_rank_zero_prints_progress(runs):
    out = runs["full", 3][2].stdout
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


def test_bf16_with_adam_is_bit_identical_on_1_and_3_ranks(tmp_path, cache_dir, monkeypatch):
    """The working dtype bf16 (rounding in every matmul) and Adam's fp32
    moments: still the same weights whatever the rank count."""
    extra = ["--set", "model.dtype=bf16", "--set", "es.optimizer=adam", "--set", "es.alpha=0.001"]
    monkeypatch.setenv("ES_MPI_CACHE", str(cache_dir))
    code, out, err = cli_train(*SMALL, *extra, "--run-dir", str(tmp_path / "one"))
    assert code == 0, err
    p = run(mpiexec_cmd(3, "train", *SMALL, *extra, "--run-dir", str(tmp_path / "three")), timeout=240,
            ES_MPI_CACHE=str(cache_dir))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "dtype bf16" in out
    assert final_digest(p.stdout) == final_digest(out)
    logs = read_log(tmp_path / "one" / "log.h5"), read_log(tmp_path / "three" / "log.h5")
    assert np.array_equal(logs[0]["gen"]["rewards"], logs[1]["gen"]["rewards"])
    assert logs[0]["gen"]["update_norm"][-1] > 0
