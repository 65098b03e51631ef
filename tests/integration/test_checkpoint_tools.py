"""Replay, export, info and the tools/ scripts on a real tiny run (serial,
in-process), plus what happens to damaged files: every bad log or checkpoint
is a one-line error naming the file, a checkpoint write killed with SIGKILL
leaves the previous one in charge, and the log is readable while it grows."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT, run_env
from es_mpi.runs import checkpoint
from es_mpi import config
from es_mpi.cli import main
from es_mpi.errors import UserError
from es_mpi.decode import decode, format_prompts
from es_mpi.engine.weights import Weights
from es_mpi.model import load_model, load_tokenizer
from es_mpi.runs.runlog import read_log
from es_mpi.trainer import Trainer

TINY = ["es.generations=4", "checkpoint.every=2", "eval.every=2", "eval.limit=8", "eval.subset=3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    """4 generations, checkpoints after 2 and 4, held-out after 0, 2 (a subset of 3 prompts), 4."""
    from es_mpi.comm import serial

    d = tmp_path_factory.mktemp("tools") / "run"
    trainer = Trainer(config.load("configs/tiny.yaml", TINY), serial(), d)
    assert trainer.run() == 0
    return d, trainer


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def one_line_error(exc_or_text, path):
    text = str(exc_or_text).strip()
    assert "\n" not in text and str(path) in text, text
    return text


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- replay -----------------------------------------------------------------
@pytest.mark.parametrize("gen", [2, 4])
def test_replay_is_bitwise_the_checkpoint(tiny_run, tmp_path, gen):
    run_dir, _ = tiny_run
    out = tmp_path / f"replay-{gen}.h5"
    code, stdout, stderr = cli("replay", run_dir, "--generation", gen, "--out", out)
    assert code == 0, stderr
    rep, ck = checkpoint.load(out), checkpoint.load(checkpoint.path_for(run_dir, gen))
    assert rep["attrs"]["digest"] == ck["attrs"]["digest"] and rep["attrs"]["generation"] == gen
    assert list(rep["weights"]) == list(ck["weights"])
    for name, arr in ck["weights"].items():
        assert rep["weights"][name].dtype == arr.dtype and np.array_equal(rep["weights"][name], arr), name
    assert rep["optimizer"].keys() == ck["optimizer"].keys()
    assert all(np.array_equal(rep["optimizer"][k], v) for k, v in ck["optimizer"].items())
    if gen == 4:  # a replayed file is a checkpoint like any other
        code, _, err = cli("export", out, "--out", tmp_path / "hf")
        assert code == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), err


def test_replay_refuses_bad_requests(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    code, _, err = cli("replay", run_dir, "--generation", 5, "--out", tmp_path / "x.h5")
    assert code == 2 and "holds 4 generation(s)" in one_line_error(err, run_dir / "log.h5")
    (tmp_path / "taken.h5").write_text("")
    code, _, err = cli("replay", run_dir, "--generation", 1, "--out", tmp_path / "taken.h5")
    assert code == 2 and "not overwritten" in one_line_error(err, tmp_path / "taken.h5")


def test_replay_refuses_a_run_with_another_noise_scheme(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    with h5py.File(old / "log.h5", "r+") as f:   # as es-mpi 0.1 wrote it
        del f.attrs["noise_scheme"]
    code, _, err = cli("replay", old, "--generation", 1, "--out", tmp_path / "x.h5")
    assert code == 2 and "drew its noise as blake2b-tensor" in one_line_error(err, old / "log.h5")
    assert not (tmp_path / "x.h5").exists()


# -- export -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_export_loads_offline_and_decodes_like_the_master(tiny_run, tmp_path, monkeypatch, dtype):
    import huggingface_hub.constants
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    run_dir, trainer = tiny_run
    out = tmp_path / "hf"
    code, _, err = cli("export", checkpoint.path_for(run_dir, 4), "--out", out,
                       *(["--dtype", dtype] if dtype else []))
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    want = torch.bfloat16 if dtype == "bf16" else torch.float32  # default: the run's model.dtype (fp32)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert next(model.parameters()).dtype == want  # config.json records the dtype
    # The trained master (the trainer's weights after generation 4) as es-mpi's
    # working model in that dtype: the base as HF loads it, weights cast(master).
    ref_model, base = load_model(trainer.folder, dtype or "fp32", "cpu")
    Weights(ref_model, master=base).load_state_dict(trainer.weights.state_dict())
    tok = load_tokenizer(out)
    texts = format_prompts(tok, [e.prompt for e in trainer.heldout_set[:6]], trainer.chat)
    got = decode(model, tok, texts, 12, trainer.task.stop_strings)
    ref = decode(ref_model, trainer.tok, texts, 12, trainer.task.stop_strings)
    assert got == ref and any(c.n_tokens for c in ref)


def test_export_refuses_a_non_empty_out(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = cli("export", run_dir, "--out", tmp_path)
    assert code == 2 and "not overwritten" in one_line_error(err, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# -- info and tools ---------------------------------------------------------
def test_info_summarises_the_run(tiny_run):
    run_dir, _ = tiny_run
    code, out, err = cli("info", run_dir)
    assert code == 0, err
    assert "builtin:tiny" in out and "toy" in out and "1 rank(s)" in out
    assert "es.generations=4" in out and "checkpoint.every=2" in out
    assert "4 done" in out and "held-out" in out and "gen-000004.h5" in out
    ev = read_log(run_dir / "log.h5")["eval"]
    assert list(ev["generation"]) == [0, 2, 4] and list(ev["n_prompts"]) == [8, 3, 8]
    acc = [line for line in out.splitlines() if "accuracy first" in line][0]
    assert f"first {ev['accuracy'][0]:.3f} (n=8)" in acc and f"last {ev['accuracy'][-1]:.3f} (n=8)" in acc
    size_line = [line for line in out.splitlines() if line.startswith("size")][0]
    assert "log.h5" in size_line and "checkpoint" in size_line


def test_tools_write_png_and_csv(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    assert load_tool("plot_run").main([str(run_dir), "--out", str(tmp_path / "run.png")]) == 0
    assert load_tool("compare_runs").main([str(run_dir), str(run_dir), "--out", str(tmp_path / "cmp.png")]) == 0
    for png in ("run.png", "cmp.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert load_tool("summarize_run").main([str(run_dir), "--csv", str(tmp_path / "s.csv")]) == 0
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0].startswith("name,model,task,world_size,generations") and len(rows) == 2
    assert rows[1].startswith("run,builtin:tiny,toy,1,4,")
    assert "builtin:tiny" in capsys.readouterr().out


@pytest.mark.parametrize("tool", ["plot_run", "compare_runs", "summarize_run"])
def test_tools_refuse_a_folder_that_is_not_a_run(tmp_path, capsys, tool):
    args = [str(tmp_path)] + (["--out", str(tmp_path / "x.png")] if tool == "compare_runs" else [])
    assert load_tool(tool).main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "not an es-mpi run" in one_line_error(err, tmp_path)


# -- damaged files ----------------------------------------------------------
def _truncate(p):
    os.truncate(p, p.stat().st_size // 2)


def _superblock(p):
    with open(p, "r+b") as f:  # just past the signature: version, sizes, addresses, checksum
        f.seek(8)
        f.write(b"\xff" * 32)


def _first_data(p):
    """Overwrite bytes inside the first dataset's data (a chunk for the log)."""
    with h5py.File(p, "r") as f:
        ds = f["gen/rewards"] if "gen" in f else f["weights"][list(f["weights"])[0]]
        off = ds.id.get_chunk_info(0).byte_offset if ds.chunks else ds.id.get_offset()
    with open(p, "r+b") as f:
        f.seek(off + 8)
        f.write(b"\x5a" * 16)


def _newer(p):
    with h5py.File(p, "r+") as f:
        f.attrs["schema_version"] = 99


def _foreign(p):
    p.unlink()
    with h5py.File(p, "w") as f:
        f["x"] = np.arange(3)


DAMAGE = {"truncated": (_truncate, "truncated"), "superblock": (_superblock, "not a readable HDF5"),
          "data": (_first_data, None), "newer": (_newer, "newer"), "foreign": (_foreign, "not an es-mpi")}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_log_is_a_one_line_error(tiny_run, tmp_path, how):
    run_dir, _ = tiny_run
    p = tmp_path / "log.h5"
    shutil.copy(run_dir / "log.h5", p)
    damage, words = DAMAGE[how]
    damage(p)
    with pytest.raises(UserError) as ei:
        read_log(p)
    msg = one_line_error(ei.value, p)
    assert words is None or words in msg, msg
    code, _, err = cli("info", tmp_path)  # the CLI says the same in one line, exit 2
    assert code == 2 and err.startswith("es-mpi: error: ") and one_line_error(err, p)


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_checkpoint_is_a_one_line_error(tiny_run, tmp_path, how):
    run_dir, _ = tiny_run
    p = tmp_path / "gen-000004.h5"
    shutil.copy(checkpoint.path_for(run_dir, 4), p)
    damage, words = DAMAGE[how]
    damage(p)
    if how == "data":  # raw weights are not HDF5-checksummed: the weights digest catches it
        code, _, err = cli("export", p, "--out", tmp_path / "hf")
        assert code == 2 and "digest mismatch" in one_line_error(err, p)
        return
    with pytest.raises(UserError) as ei:
        checkpoint.load(p)
    msg = one_line_error(ei.value, p)
    assert words is None or words in msg, msg


def test_a_checkpoints_config_alone_is_read_and_a_missing_one_is_one_line(tiny_run, tmp_path):
    """checkpoint.config_text (what a --resume with generation.vllm_mode: auto
    reads before the model loads): the config the run was written with, or a
    one-line error naming the file."""
    run_dir, trainer = tiny_run
    assert config.loads(checkpoint.config_text(checkpoint.path_for(run_dir, 4))) == trainer.cfg
    p = tmp_path / "gen-000004.h5"
    shutil.copy(checkpoint.path_for(run_dir, 4), p)
    with h5py.File(p, "a") as f:
        del f.attrs["config"]
    with pytest.raises(UserError) as ei:
        checkpoint.config_text(p)
    assert "no config attribute" in one_line_error(ei.value, p)


def test_latest_skips_a_damaged_newest_checkpoint(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    _truncate(checkpoint.path_for(d, 4))
    assert checkpoint.latest(d) == checkpoint.path_for(d, 2)


# Writes a ~256 MB checkpoint for generation 6 into RUN_DIR: slow enough to be
# killed in the middle.
SLOW_SAVE = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from es_mpi.runs import checkpoint
weights = {f"w{i}": np.full(1 << 20, i, dtype=np.float32) for i in range(64)}
checkpoint.save(sys.argv[1], 6, weights, {"t": np.array(1)}, {"digest": "none"})
"""


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    ckdir = d / "checkpoints"
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(d), str(ROOT)], env=run_env())
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 60 and child.poll() is None:
            tmps = [p for p in ckdir.iterdir() if ".tmp" in p.name]
            if tmps and tmps[0].stat().st_size > 0:  # the write has begun
                os.kill(child.pid, signal.SIGKILL)
                break
            time.sleep(0.001)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    assert not checkpoint.path_for(d, 6).exists()
    assert checkpoint.latest(d) == checkpoint.path_for(d, 4)
    # ... and training resumes from it.
    from es_mpi.comm import serial

    cfg = config.load("configs/tiny.yaml", [*TINY, "es.generations=5", "eval.limit=0"])
    trainer = Trainer(cfg, serial(), d, resume=True)
    assert trainer.start_gen == 4
    assert trainer.run() == 0
    assert list(read_log(d / "log.h5")["gen"]["generation"]) == [0, 1, 2, 3, 4]


# -- reading a live run -----------------------------------------------------
def test_log_and_tools_read_a_run_while_it_is_written(tmp_path, cache_dir, capsys):
    d = tmp_path / "live"
    out = tmp_path / "train.out"
    cmd = [sys.executable, "-m", "es_mpi", "train", "--config", "configs/tiny.yaml", "--set", "es.generations=4",
           "--set", "eval.limit=0", "--set", "checkpoint.every=0", "--run-dir", str(d)]
    with open(out, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(ES_MPI_CACHE=str(cache_dir)), stdout=fh,
                                stderr=subprocess.STDOUT)
    seen, t0 = [], time.monotonic()
    summarize = load_tool("summarize_run")
    try:
        # Attach only once the writer is in SWMR mode (after its first
        # generation line): HDF5 lets a reader's lock block a writer's open.
        while "gen 1/" not in out.read_text() and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.1)
        while proc.poll() is None and time.monotonic() - t0 < 120:
            seen.append(len(read_log(d / "log.h5")["gen"]["generation"]))
            if len(seen) == 1:
                assert summarize.main([str(d)]) == 0
                code, info_out, err = cli("info", d)
                assert code == 0 and "done of 4" in info_out, err
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, out.read_text()[-2000:]
    assert seen == sorted(seen) and seen[0] < 4 and len(set(seen)) >= 2, seen
    assert len(read_log(d / "log.h5")["gen"]["generation"]) == 4


def test_compare_evals_pairs_prompts_by_id(tmp_path, capsys):
    def write(name, rows):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)

    before = write("a.jsonl", [{"index": i, "id": f"q{i}", "completion": "x", "reward": float(i), "correct": i % 2 == 0,
                                "length": 10.0} for i in range(4)])
    after = write("b.jsonl", [{"index": i, "id": f"q{i}", "completion": "y", "reward": float(i) + d, "correct": True,
                               "length": 5.0} for i, d in zip(range(3, -1, -1), (1, 3, 1, 3))])
    tool = load_tool("compare_evals")
    assert tool.main([before, after]) == 0
    out = capsys.readouterr().out
    # ids pair q3 with q3 etc. whatever the line order: reward changes 3, 1, 3, 1 -> mean +2
    res = tool.paired(tool.read_eval(before), tool.read_eval(after))
    assert res["reward"][2] == 2.0 and res["correct"][:3] == (0.5, 1.0, 0.5) and res["length"][2] == -5.0
    assert abs(res["reward"][3] - 1.96 * np.std([3, 1, 3, 1], ddof=1) / 2) < 1e-12
    assert "4 prompts in both" in out and "change +2.0000" in out
    bad = write("bad.jsonl", ["not json"])
    assert tool.main([before, bad]) == 2
    assert "bad.jsonl:1: not an es-mpi eval line" in one_line_error(capsys.readouterr().err, tmp_path)
