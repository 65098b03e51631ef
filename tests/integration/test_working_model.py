"""The working model is the model as HF loads it in that dtype (issue: a
bf16 run used to cast the fp32 module, which also cast RoPE's inv_freq to
bf16 and left config.dtype at float32).

Checked three ways: parameters, buffers, config and requires_grad equal
`from_pretrained(dtype=bf16)`'s; greedy tokens over >= 300 positions (where
rounded RoPE frequencies show) equal; and the same for an exported folder.
The old cast is checked to differ, so the tests can see the fault."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from es_mpi import config
from es_mpi.commands.bench import plain_generate
from es_mpi.commands.export import export
from es_mpi.engine.weights import Weights
from es_mpi.model import load_model, load_tokenizer, prepare
from es_mpi.runs import checkpoint
from es_mpi.tasks import make_task
from test_decode import SMOLLM2, needs_smollm2


def hf_bf16(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()


def assert_same_model(ours, ref):
    assert ours.config.dtype == ref.config.dtype == torch.bfloat16
    a, b = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].requires_grad == b[k].requires_grad and torch.equal(a[k], b[k]), k
    bufs, ref_bufs = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert bufs.keys() == ref_bufs.keys() and bufs
    for k in bufs:
        assert bufs[k].dtype == ref_bufs[k].dtype and torch.equal(bufs[k], ref_bufs[k]), k


def long_prompts(tok, n=2):
    """Countdown prompts (~127 tokens with SmolLM2, ~200 with the tiny tokenizer)."""
    return [e.prompt for e in make_task("countdown", {}).examples("train")[:n]]


def test_tiny_bf16_working_model_is_hf_bf16(cache_dir):
    folder = prepare("builtin:tiny", cache_dir=str(cache_dir))
    ours, ref = load_model(folder, "bf16", "cpu")[0], hf_bf16(folder)
    assert_same_model(ours, ref)
    tok = load_tokenizer(folder)
    texts = long_prompts(tok)
    width = tok(texts, padding=True, return_tensors="pt")["input_ids"].shape[1]
    new = max(1, 300 - width)
    assert plain_generate(ours, tok, texts, new)[0] == plain_generate(ref, tok, texts, new)[0]
    # the old way (fp32 module cast whole) rounds the RoPE buffer: a different model
    old = load_model(folder, "fp32", "cpu")[0].to(torch.bfloat16)
    assert old.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    ids = tok(texts[:1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.equal(old(ids).logits, ref(ids).logits)


@needs_smollm2
def test_smollm2_bf16_working_model_and_its_export_decode_as_hf_bf16(cache_dir, tmp_path):
    folder = prepare(SMOLLM2, cache_dir=str(cache_dir))
    tok = load_tokenizer(folder)
    texts = long_prompts(tok)
    width = tok(texts, padding=True, return_tensors="pt")["input_ids"].shape[1]
    new = 300 - width + 8                     # prompt + completion >= 300 positions
    ref = hf_bf16(folder)
    ours, master = load_model(folder, "bf16", "cpu")
    assert_same_model(ours, ref)
    want = plain_generate(ref, tok, texts, new)[0]
    assert plain_generate(ours, tok, texts, new)[0] == want and width + min(map(len, want)) >= 300

    # an exported checkpoint (the base nudged, so it is not the base) loads as es-mpi's working model
    w = Weights(ours, master=master)
    torch.manual_seed(0)
    for m in w.master:
        m.add_(torch.randn_like(m), alpha=1e-3)
    w.version += 1
    w.restore()
    cfg = config.from_dict({"model": {"path": SMOLLM2, "dtype": "bf16", "cache_dir": str(cache_dir)}})
    ck = tmp_path / "gen-000001.h5"
    checkpoint.write(ck, 1, w.state_dict(), {"t": torch.zeros(()).numpy()},
                     {"config": cfg.to_yaml(), "digest": w.digest(), "seed": 0})
    export(ck, tmp_path / "hf")
    exported = hf_bf16(tmp_path / "hf")
    assert_same_model(ours, exported)
    assert plain_generate(exported, tok, texts, new)[0] == plain_generate(ours, tok, texts, new)[0]


def test_auto_dtype_is_said_recorded_and_resumes(tmp_path, cache_dir, monkeypatch):
    """The start line says what `auto` picked and why; the run records the
    concrete dtype, and resuming with the same `auto` config needs no --force."""
    import re

    from conftest import cli_train
    from es_mpi.runs.runlog import read_log

    monkeypatch.setenv("ES_MPI_CACHE", str(cache_dir))
    args = ["--config", "configs/tiny.yaml", "--set", "model.dtype=auto", "--set", "eval.limit=0",
            "--set", "checkpoint.every=1", "--run-dir", str(tmp_path / "run")]
    code, out, err = cli_train(*args, "--set", "es.generations=1")
    assert code == 0, err
    said = re.search(r"dtype (bf16|fp32) \(auto: ([^)]*)\)", out + err)
    assert said, out + err
    assert f"dtype: {said.group(1)}" in (tmp_path / "run" / "config.yaml").read_text()
    assert f"dtype: {said.group(1)}" in read_log(tmp_path / "run" / "log.h5")["attrs"]["config"]
    code, out, err = cli_train(*args, "--set", "es.generations=2", "--resume")
    assert code == 0 and "resumed at generation 1" in out + err, err
