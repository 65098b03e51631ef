"""Guards of the greedy decoder for the devices it has not run on (issue 16),
all on CPU:

* finite logits: an SDPA that writes NaN into fully masked query rows (as
  CUDA kernels can) changes no token, and a non-finite logit stops the batch
  with an error naming the tile;
* grouped-query attention without `repeat_kv`, decode steps and prefill, and
  the per-device choice of kernels;
* a row compaction reads nothing back from the device, whatever the depth;
* after the prefill our KV cache holds the prompt, and a transformers that
  drops the cache keyword fails loudly.
"""
from __future__ import annotations

import contextlib
import re
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import es_mpi.decode.attention as attention
import es_mpi.decode.greedy as greedy
from es_mpi.decode import compat, decode, decode_batch
from es_mpi.errors import RunAborted
from es_mpi.model import load_model, load_tokenizer, prepare

# no common prefix (the first words differ), lengths from 1 to 13 tokens
RAGGED = ["7", "paris blue sky and the", "what is the sum of seven and eight and the number 42 next",
          "count vowels", "the answer is"]
SHARED = [f"the answer is count vowels aeiou sum of {w}" for w in ("7", "seven and eight", "paris", "42 42")]


@pytest.fixture(scope="module")
def folder(cache_dir):
    return prepare("builtin:tiny", cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def tiny(folder):
    return load_model(folder, "fp32", "cpu")[0], load_tokenizer(folder)


def tiny_with_layers(folder, n_layers: int):
    """The tiny Llama's shape (GQA: 2 query heads, 1 kv head) with `n_layers` layers, random weights."""
    cfg = AutoConfig.from_pretrained(str(folder))
    cfg.num_hidden_layers = n_layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tokens(comps):
    return [c.ids for c in comps]


# -- finite logits -------------------------------------------------------------

def nan_for_fully_masked_rows(monkeypatch):
    """Patch torch's SDPA (which transformers' sdpa and decode.attention both
    call) to write NaN where a query row has no key to attend to, as CUDA's
    kernels have been seen to.  Returns a list that counts the rows hit."""
    real = torch.nn.functional.scaled_dot_product_attention
    hit = []

    def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        out = real(query, key, value, attn_mask, *args, **kwargs)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            empty = ~attn_mask.any(-1, keepdim=True)                 # (B, 1, q, 1)
            if bool(empty.any()):
                hit.append(int(empty.sum()))
                out = out.masked_fill(empty.expand_as(out), float("nan"))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    return hit


@pytest.mark.parametrize("prefill_gqa", [True, False], ids=["prefill-gqa", "prefill-hf-sdpa"])
def test_nan_from_fully_masked_rows_changes_no_token(tiny, monkeypatch, prefill_gqa):
    """Prompts of different lengths, no shared prefix: their left pads see no
    real key in the prefill.  With an SDPA that returns NaN for a fully masked
    query, decoded together they must equal each decoded alone (and the
    unpatched batch).  Both prefill routes: torch SDPA with grouped queries
    (CPU) and transformers' sdpa (CUDA)."""
    model, tok = tiny
    monkeypatch.setattr(attention, "prefill_gqa", lambda device_type: prefill_gqa)
    clean = decode_batch(model, tok, RAGGED, 16)
    alone = [decode_batch(model, tok, [t], 16)[0] for t in RAGGED]
    nan_for_fully_masked_rows(monkeypatch)
    together = decode_batch(model, tok, RAGGED, 16)
    assert tokens(together) == tokens(clean)
    assert tokens(together) == tokens(alone)


def test_the_prefill_mask_leaves_no_query_without_a_key(tiny, monkeypatch):
    model, tok = tiny
    hit = nan_for_fully_masked_rows(monkeypatch)
    decode_batch(model, tok, RAGGED, 4)
    decode_batch(model, tok, SHARED, 4)
    assert hit == []


def test_non_finite_logits_stop_the_batch_naming_the_tile(tiny):
    """NaN in one row's logits at the third forward: RunAborted, naming the
    tile and the row, not a garbage token."""
    model, tok = tiny
    calls = []

    def poison(mod, args, out):
        calls.append(1)
        if len(calls) == 3:
            out[2].fill_(float("nan"))
        return out

    h = model.lm_head.register_forward_hook(poison)
    try:
        with pytest.raises(RunAborted, match=r"non-finite logits in tile 7 .*batch rows \[2\]"):
            decode(model, tok, RAGGED, 8, ignore_eos=True, tile="7")
        calls.clear()
        with pytest.raises(RunAborted, match=r"non-finite logits in a decode batch"):
            decode_batch(model, tok, RAGGED, 8, ignore_eos=True)
    finally:
        h.remove()


def test_argmax_flags_nan_anywhere_and_infinite_choices():
    x = torch.zeros(4, 1, 6)
    x[0, 0, 3] = 1.0
    x[1, 0, 5] = float("nan")            # not the largest value, still caught
    x[2, 0, 1] = float("inf")
    x[3, 0, :] = -float("inf")
    assert greedy._argmax(x, None).tolist() == [3, -1, -1, -1]
    x[3, 0, 2] = 0.5                      # -inf elsewhere is fine (as banned tokens are)
    assert greedy._argmax(x, None).tolist()[3] == 2


# -- GQA without repeat_kv -----------------------------------------------------

def forbid_repeat_kv(monkeypatch):
    def no_repeat(*args, **kwargs):
        raise AssertionError("repeat_kv called: K/V copied to every query head")

    import transformers.integrations.sdpa_attention as hf_sdpa
    monkeypatch.setattr(hf_sdpa, "repeat_kv", no_repeat)
    for name, mod in list(sys.modules.items()):
        # vars(), not hasattr: a lazy transformers module would import its submodules
        if name.startswith("transformers.models.") and "repeat_kv" in vars(mod):
            monkeypatch.setattr(mod, "repeat_kv", no_repeat)


def test_gqa_model_decodes_without_repeat_kv(tiny, monkeypatch):
    """The tiny Llama has 2 query heads on 1 kv head.  With repeat_kv
    forbidden, ragged prompts (masked prefill) and prompts sharing a prefix
    (the causal prefix forward) decode to the tokens they decoded before."""
    model, tok = tiny
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    before = [tokens(decode_batch(model, tok, t, 12)) for t in (RAGGED, SHARED)]
    forbid_repeat_kv(monkeypatch)
    st: dict = {}
    after = [tokens(decode_batch(model, tok, t, 12, stats=st)) for t in (RAGGED, SHARED)]
    assert st["shared_prefix"] >= 8
    assert after == before


def test_decode_attention_on_every_device_and_the_prefill_choice():
    """Decode steps use decode_attention wherever the model uses "sdpa", GPU
    included; the prefill uses torch SDPA with grouped queries on CPU only
    (CUDA's masked kernels take no grouped queries)."""
    assert attention.uses_decode_attention("sdpa")
    assert not attention.uses_decode_attention("eager")
    assert attention.prefill_gqa("cpu")
    assert not attention.prefill_gqa("cuda")

    class OnMeta(torch.nn.Module):     # a model whose parameters are not on the CPU
        def __init__(self, impl):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(2, device="meta"))
            self.config = type("Cfg", (), {"_attn_implementation": impl})()

    m = OnMeta("sdpa")
    with attention.decode_attention_for(m):
        assert m.config._attn_implementation == attention.NAME
    assert m.config._attn_implementation == "sdpa"
    m = OnMeta("eager")
    with attention.decode_attention_for(m):
        assert m.config._attn_implementation == "eager"


# -- host syncs of a compaction ------------------------------------------------

@contextlib.contextmanager
def counting_host_reads(monkeypatch):
    """Count calls of the functions that read a tensor back to the host (on a
    GPU each is a device-to-host sync)."""
    n = [0]

    def counted(f):
        def g(*a, **k):
            n[0] += 1
            return f(*a, **k)
        return g

    with monkeypatch.context() as mp:
        for name in ("tolist", "item", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__"):
            mp.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
        mp.setattr(torch, "nonzero", counted(torch.nonzero))
        yield n


class FinishAt:
    """A StopMatcher stand-in: the k-th row seen finishes after LENGTHS[k] tokens."""
    LENGTHS = [3, 9, 5, 12, 3, 7]

    def __init__(self, *args):
        self.at = {}

    def finished(self, gen) -> bool:
        if id(gen) not in self.at:
            self.at[id(gen)] = self.LENGTHS[len(self.at)]
        return len(gen) >= self.at[id(gen)]


@pytest.mark.parametrize("share_prefix", [False, True])
def test_a_compaction_reads_nothing_back_whatever_the_depth(folder, monkeypatch, share_prefix):
    """Six rows finish at five different steps (four compactions).  The host
    reads of a decode with rows leaving equal those with rows staying (one
    per step), at 2 layers and at 6."""
    tok = load_tokenizer(folder)
    monkeypatch.setattr(greedy, "StopMatcher", FinishAt)
    texts = (SHARED + SHARED[:2]) if share_prefix else RAGGED + ["sky"]
    reads = {}
    for layers in (2, 6):
        model = tiny_with_layers(folder, layers)
        for leave in (True, False):
            st: dict = {}
            with counting_host_reads(monkeypatch) as n:
                comps = decode_batch(model, tok, texts, 16, leave=leave, stats=st)
            assert [c.n_tokens for c in comps] == FinishAt.LENGTHS
            assert (st["shared_prefix"] > 0) == share_prefix
            reads[layers, leave] = n[0]
    assert reads[2, True] == reads[2, False] == reads[6, True] == reads[6, False], reads


def test_compact_moves_only_the_last_live_rows_into_holes():
    assert greedy._compact(6, [1, 4]) == ([0, 5, 2, 3], [1], [5])
    assert greedy._compact(5, [0, 1]) == ([3, 4, 2], [0, 1], [3, 4])
    assert greedy._compact(4, [3]) == ([0, 1, 2], [], [])


# -- the cache holds the prompt ------------------------------------------------

@pytest.mark.parametrize("texts", [RAGGED, SHARED], ids=["ragged", "shared-prefix"])
def test_after_the_prefill_our_cache_holds_the_prompt(tiny, monkeypatch, texts):
    model, tok = tiny
    width = max(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])
    seen = []
    real = greedy.whole_span

    def spy(cache):                    # called right after the prefill
        seen.append([layer.get_seq_length() for layer in cache.layers])
        real(cache)

    monkeypatch.setattr(greedy, "whole_span", spy)
    decode_batch(model, tok, texts, 4)
    assert seen == [[width] * model.config.num_hidden_layers]


def test_a_dropped_cache_keyword_fails_loudly(tiny, monkeypatch):
    """A transformers release that takes the cache under another name drops
    ours into **kwargs: the decoder must say so, with the supported range."""
    model, tok = tiny
    monkeypatch.setattr(greedy, "CACHE_KW", "some_other_name")
    expected = r"transformers .*ignored the 'some_other_name'.*" + re.escape(compat.range_text())
    with pytest.raises(RunAborted, match=expected):
        decode_batch(model, tok, RAGGED, 4)
