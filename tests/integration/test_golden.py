"""The golden digest: the final weights of a fixed tiny run are pinned.

A change to the noise, the shaping, the update, the decoder's tokens or the
prompt batches changes them, and this test fails.  It runs under the newest
transformers (`make test`) and under the declared floor (`make test-floor`),
so it also shows that both releases train to the same bits.

To re-pin on purpose (a deliberate change of the trajectory, which also
changes `noise_scheme` or the version in the README): run
`.venv/bin/es-mpi train <GOLDEN args> --run-dir /tmp/g` and copy its
`final-digest:` line here, saying why in the commit message.
"""
from __future__ import annotations

from conftest import cli_train, final_digest

# tiny Llama, fp32, 1 thread, N = 7, 3 generations, full-rank noise
GOLDEN = ["--config", "configs/tiny.yaml", "--set", "es.population=7", "--set", "es.antithetic=false",
          "--set", "es.generations=3", "--set", "eval.limit=0", "--set", "checkpoint.every=0",
          "--set", "model.threads=1", "--set", "es.check_every=1"]
GOLDEN_DIGEST = "3d534cca135e43d7e7da46b7e656b554de8a6220bb4e879d1f499282960ca598"
# the same with low-rank noise, r = 1, tiles that mix members
GOLDEN_LOWRANK = GOLDEN + ["--set", "es.noise=lowrank", "--set", "generation.batch_size=12"]
GOLDEN_LOWRANK_DIGEST = "66d3b0b918cca12a70f14516f946a551b47895e048316340ba90709fbe4dd847"


def test_golden_final_digest_full_rank(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("ES_MPI_CACHE", str(cache_dir))
    code, out, err = cli_train(*GOLDEN, "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    assert final_digest(out) == GOLDEN_DIGEST, "the trajectory changed: see this file's docstring to re-pin"


def test_golden_final_digest_low_rank(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("ES_MPI_CACHE", str(cache_dir))
    code, out, err = cli_train(*GOLDEN_LOWRANK, "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    assert final_digest(out) == GOLDEN_LOWRANK_DIGEST, "the trajectory changed: see this file's docstring to re-pin"
