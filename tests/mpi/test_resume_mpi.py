"""Resume equivalence: 2 generations, then --resume to 4, on any rank counts,
ends bit-identical to an uninterrupted 4-generation run, with the same
per-generation rewards and a log that neither repeats nor skips a generation.

Launches are costly (~10-30 s each on two cores), so: one uninterrupted run on
2 ranks; 1->2 resumes a serial in-process first half on 2 ranks; 2->3 resumes
the uninterrupted run's own generation-2 checkpoint (what a 2-rank run that
died after generation 2 leaves: its log rows 2-3 are dropped on resume) on
3 ranks; 1->1 and the config checks run in-process."""
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import final_digest, mpiexec_cmd, run
from es_mpi.runs import checkpoint
from es_mpi import config
from es_mpi.cli import main
from es_mpi.comm import serial
from es_mpi.runs.runlog import read_log
from es_mpi.trainer import Trainer

# checkpoint.every, eval and threads are not trajectory fields; es.generations neither.
COMMON = ["eval.limit=0", "checkpoint.every=2", "model.threads=1"]
FIRST, SECOND = [*COMMON, "es.generations=2"], [*COMMON, "es.generations=4"]


def sets(items):
    return [a for s in items for a in ("--set", s)]


def train_cmd(n, run_dir, items, *extra):
    return mpiexec_cmd(n, "train", "--config", "configs/tiny.yaml", *sets(items), "--run-dir", str(run_dir), *extra)


def serial_run(run_dir, items, resume=False):
    trainer = Trainer(config.load("configs/tiny.yaml", items), serial(), run_dir, resume=resume)
    assert trainer.run() == 0
    return trainer.weights.digest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("resume")
    env = {"ES_MPI_CACHE": str(cache_dir)}
    out = {}
    p = run(train_cmd(2, root / "straight", SECOND), timeout=240, **env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out["straight"] = final_digest(p.stdout)

    serial_run(root / "half-1rank", FIRST)  # generations 0-1 on one rank, in-process
    for name in ("1to2", "1to1", "seed"):
        shutil.copytree(root / "half-1rank", root / name)
    p = run(train_cmd(2, root / "1to2", SECOND, "--resume"), timeout=240, **env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "resumed at generation 2" in p.stdout
    out["1to2"] = final_digest(p.stdout)

    shutil.copytree(root / "straight", root / "2to3")
    checkpoint.path_for(root / "2to3", 4).unlink()  # as if the 2-rank run died after generation 2
    p = run(train_cmd(3, root / "2to3", SECOND, "--resume"), timeout=240, **env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out["2to3"] = final_digest(p.stdout)

    out["1to1"] = serial_run(root / "1to1", SECOND, resume=True)
    return root, out


@pytest.mark.parametrize("name", ["1to2", "2to3", "1to1"])
def test_resumed_run_equals_the_uninterrupted_one(runs, name):
    root, digests = runs
    assert digests[name] == digests["straight"]
    straight, resumed = read_log(root / "straight" / "log.h5"), read_log(root / name / "log.h5")
    assert list(resumed["gen"]["generation"]) == [0, 1, 2, 3]
    assert np.array_equal(resumed["gen"]["rewards"], straight["gen"]["rewards"])
    assert np.array_equal(resumed["gen"]["status"], straight["gen"]["status"])
    assert checkpoint.load(checkpoint.latest(root / name))["attrs"]["digest"] == digests["straight"]


def test_resume_with_another_seed_needs_force(runs):
    root, _ = runs
    args = ["train", "--config", "configs/tiny.yaml", *sets([*COMMON, "es.generations=3", "es.seed=2"]),
            "--run-dir", str(root / "seed"), "--resume"]
    try:
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, res.output
        err = res.stderr.strip()
        assert "\n" not in err and "es.seed" in err and "--force" in err, err
        assert checkpoint.latest(root / "seed") == checkpoint.path_for(root / "seed", 2)  # nothing written

        res = CliRunner().invoke(main, [*args, "--force"])
        assert res.exit_code == 0, res.output
        assert list(read_log(root / "seed" / "log.h5")["gen"]["generation"]) == [0, 1, 2]
    finally:
        logging.getLogger("es_mpi").handlers.clear()  # its handler wrote to CliRunner's closed stream


def test_lowrank_resume_1_to_2_ranks_and_replay_are_exact(tmp_path, cache_dir, monkeypatch):
    """Low-rank noise, tiles of 12 rows (they mix members): two generations on
    one rank, then --resume to four on two ranks, equals four on one rank; the
    log replays bitwise to the final checkpoint."""
    monkeypatch.setenv("ES_MPI_CACHE", str(cache_dir))
    low = ["es.noise=lowrank", "es.rank=2", "generation.batch_size=12"]
    want = serial_run(tmp_path / "straight", [*SECOND, *low])
    serial_run(tmp_path / "resumed", [*FIRST, *low])
    p = run(train_cmd(2, tmp_path / "resumed", [*SECOND, *low], "--resume"), timeout=240,
            ES_MPI_CACHE=str(cache_dir))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert final_digest(p.stdout) == want
    straight, resumed = read_log(tmp_path / "straight" / "log.h5"), read_log(tmp_path / "resumed" / "log.h5")
    assert np.array_equal(resumed["gen"]["rewards"], straight["gen"]["rewards"])
    assert resumed["attrs"]["noise_scheme"].startswith("lowrank-r2-layers+")

    res = CliRunner().invoke(main, ["replay", str(tmp_path / "resumed"), "-g", "4", "--out", str(tmp_path / "r.h5")])
    assert res.exit_code == 0, res.output
    rep, ck = checkpoint.load(tmp_path / "r.h5"), checkpoint.load(checkpoint.latest(tmp_path / "resumed"))
    assert rep["attrs"]["digest"] == ck["attrs"]["digest"] == want
    assert all(np.array_equal(rep["weights"][k], v) for k, v in ck["weights"].items())
