"""`es-mpi eval` sharded over 2 ranks (one mpiexec launch) writes the same
per-prompt JSONL as the same evaluation on 1 rank (run in-process)."""
import json

import torch

from conftest import mpiexec_cmd, run
from es_mpi import config
from es_mpi.comm import serial
from es_mpi.commands.evaluate import run_eval

LIMIT = 10


def _rows(path):
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]


def test_eval_on_2_ranks_equals_1_rank(tmp_path, cache_dir):
    one = tmp_path / "r1.jsonl"
    cfg = config.load("configs/tiny.yaml")
    threads = torch.get_num_threads()
    try:
        res = run_eval(cfg, serial(), "heldout", LIMIT, str(one), None)   # threads: 1, as on each rank
    finally:
        torch.set_num_threads(threads)

    two = tmp_path / "r2.jsonl"
    p = run(mpiexec_cmd(2, "eval", "--config", "configs/tiny.yaml", "--limit", str(LIMIT), "--out", str(two)),
            timeout=180, ES_MPI_CACHE=str(cache_dir))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]

    r1, r2 = _rows(one), _rows(two)
    assert [r["index"] for r in r1] == list(range(LIMIT)) and len(r2) == LIMIT
    assert [r["id"] for r in r2] == [r["id"] for r in r1]
    # the per-prompt results, prompt by prompt, are the same whatever the rank count
    assert [(r["completion"], r["reward"]) for r in r2] == [(r["completion"], r["reward"]) for r in r1]
    assert r2 == r1
    assert res["rows"] == r1
    assert all(isinstance(r["completion"], str) and r["n_tokens"] >= 1 for r in r1)
    # the summary line comes once, from rank 0
    log = p.stdout + p.stderr
    assert log.count("eval heldout split of toy: mean reward") == 1, log[-2000:]
    assert f"n={LIMIT}" in log
