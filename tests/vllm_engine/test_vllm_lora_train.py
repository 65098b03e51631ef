"""`es-mpi train` with es.noise: lowrank on generation.backend: vllm (one LoRA
adapter per member, decode.vllm_lora) on builtin:tiny, launched with
mpiexec inside a timeout: the same final digest on 1 and 3 ranks (N = 7, tiles that mix
members), and as the hf backend's hooks; N = 2 on 3 ranks equals 1 rank;
bad low-rank settings are one-line errors on every rank.  Four launches in
all (an engine starts in ~5-10 s per rank).  Skipped when vLLM does not
import."""
from __future__ import annotations

import pytest

try:
    import vllm  # noqa: F401
    from vllm import LLM  # noqa: F401
except Exception as e:
    pytest.skip(f"vllm does not import: {type(e).__name__}: {e}"[:200], allow_module_level=True)

from conftest import cli_train, final_digest, mpiexec_cmd, run

# 7 members (neither 1 nor 3 divides it), 12-row tiles over 8 prompts: tiles mix members
SMALL = ["--config", "configs/tiny.yaml", "--set", "es.population=7", "--set", "es.antithetic=false",
         "--set", "es.generations=3", "--set", "eval.limit=0", "--set", "checkpoint.every=0",
         "--set", "model.threads=1", "--set", "es.check_every=1", "--set", "es.noise=lowrank",
         "--set", "generation.batch_size=12"]
TWO = ["--set", "es.population=2", "--set", "generation.batch_size=4"]   # R > N: 4 tiles for 3 ranks
VLLM = ["--set", "generation.backend=vllm"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    out = {}
    for name, n, extra in (("n7", 1, []), ("n7", 3, []), ("n2", 1, TWO), ("n2", 3, TWO)):
        d = tmp_path_factory.mktemp(f"lora-{name}-{n}") / "run"
        p = run(mpiexec_cmd(n, "train", *SMALL, *VLLM, *extra, "--run-dir", str(d)), timeout=300,
                ES_MPI_CACHE=str(cache_dir))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert "decoder vllm" in p.stdout
        out[name, n] = final_digest(p.stdout)
        out[name, n, "dir"] = d
    return out


def test_lowrank_on_vllm_gives_the_same_digest_on_1_and_3_ranks(runs):
    assert runs["n7", 1] == runs["n7", 3]


def test_lowrank_on_vllm_gives_the_hf_backends_digest(runs, tmp_path):
    """Adapters and hooks decode the same tokens, the rewards are the same, and
    the update (the same code on the fp32 master) gives the same digest."""
    code, out, err = cli_train(*SMALL, "--set", "generation.backend=hf", "--run-dir", str(tmp_path / "hf"))
    assert code == 0, out[-2000:] + err[-2000:]
    assert final_digest(out) == runs["n7", 1]


def test_two_members_on_three_ranks_equal_one_rank(runs):
    assert runs["n2", 3] == runs["n2", 1]


@pytest.mark.parametrize("extra,message", [
    (["--set", "es.lowrank_scope=all"], "es.lowrank_scope: all (embeddings, LM head, norms, biases) has no LoRA "
                                        "equivalent in vLLM"),
    (["--set", "es.rank=600"], "es.rank: 600 is above vLLM's largest LoRA rank (512)"),
])
def test_bad_lowrank_settings_are_one_line_errors(extra, message, cache_dir, tmp_path):
    code, out, err = cli_train(*SMALL, *VLLM, *extra, "--run-dir", str(tmp_path / "bad"))
    assert code == 2
    lines = [l for l in (out + err).splitlines() if message in l]
    assert len(lines) == 1 and "Traceback" not in out + err


def test_bench_reports_lowrank_on_vllm_against_pure_vllm_inference(tmp_path, cache_dir):
    """`es-mpi bench` with low-rank noise on vllm: ES efficiency against the
    same engine decoding the base weights without adapters, and the adapters'
    build-and-register time per generation."""
    import json
    import sys

    js = tmp_path / "b.json"
    p = run([sys.executable, "-m", "es_mpi", "bench", "--config", "configs/tiny.yaml", *VLLM,
             "--set", "es.noise=lowrank", "--set", "es.population=4", "--set", "generation.batch_size=32",
             "--json", str(js)], timeout=300, ES_MPI_CACHE=str(cache_dir))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads(js.read_text())
    assert res["backend"] == "vllm" and res["config"]["es"]["noise"] == "lowrank"
    assert 0 < res["es_efficiency"] < 10 and res["adapter_register_s_per_gen"] > 0
    assert "LoRA adapters built + registered" in p.stdout


def test_lowrank_on_vllm_replays_and_resumes_to_the_same_digest(runs, tmp_path, cache_dir):
    """Replay from the log (no engine: the updates from the logged rewards)
    and a resume after 2 of 3 generations both give the 3-generation digest."""
    import sys

    import h5py

    out = tmp_path / "r.h5"
    p = run([sys.executable, "-m", "es_mpi", "replay", str(runs["n7", 1, "dir"]), "--generation", "3", "--out",
             str(out)], timeout=120, ES_MPI_CACHE=str(cache_dir))
    assert p.returncode == 0, p.stderr[-2000:]
    with h5py.File(out, "r") as f:
        assert f.attrs["digest"] == runs["n7", 1]
    d = tmp_path / "resumed"
    for extra in (["--set", "es.generations=2"], ["--resume"]):
        p = run(mpiexec_cmd(1, "train", *SMALL, *VLLM, *extra, "--run-dir", str(d)), timeout=300,
                ES_MPI_CACHE=str(cache_dir))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "resumed at generation 2" in p.stdout
    assert final_digest(p.stdout) == runs["n7", 1]
