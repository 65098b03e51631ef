"""Batched greedy decoding with left padding, EOS and per-sequence stop strings.

The same function serves training, `es-mpi eval` and the bench, so what is
scored is what is evaluated.  A batch stops as soon as every sequence hit EOS
or a stop string (the reference decodes to max-new-tokens regardless).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Completion:
    text: str          # decoded text, cut just after the first stop string
    n_tokens: int      # generated tokens that count (up to EOS / stop, inclusive)


def format_prompts(tokenizer, prompts: Sequence[str], chat: bool) -> list[str]:
    if not chat:
        return list(prompts)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the task asks for a chat template but the tokenizer has none")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    best = -1
    for s in stop_strings:
        j = text.find(s)
        if j >= 0 and (best < 0 or j + len(s) < best):
            best = j + len(s)
    return (text[:best], True) if best >= 0 else (text, False)


def _greedy_config(model, tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                            temperature=None, top_p=None, top_k=None)


@torch.no_grad()
def decode(model, tokenizer, texts: Sequence[str], max_new_tokens: int, stop_strings: Sequence[str] = (),
           batch_size: int = 0) -> list[Completion]:
    """Greedy-decode `texts` (already formatted) in micro-batches."""
    if not texts:
        return []
    bs = batch_size or len(texts)
    gcfg = _greedy_config(model, tokenizer, max_new_tokens)
    gcfg.stop_strings = list(stop_strings) or None
    eos_ids = gcfg.eos_token_id if isinstance(gcfg.eos_token_id, list) else [gcfg.eos_token_id]
    # a finished sequence is padded with pad_token_id (stop string) or ends at EOS
    ends = {e for e in eos_ids if e is not None} | {tokenizer.pad_token_id}
    out: list[Completion] = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), bs):
        chunk = list(texts[start:start + bs])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        # stop strings live in the generation config; generate() needs the tokenizer to match them
        kwargs = {"tokenizer": tokenizer} if stop_strings else {}
        seqs = model.generate(**enc, generation_config=gcfg, **kwargs)
        new = seqs[:, enc["input_ids"].shape[1]:].tolist()
        for ids in new:
            n = len(ids)
            for j, t in enumerate(ids):
                if t in ends:
                    n = j + 1
                    break
            text = tokenizer.decode(ids[:n], skip_special_tokens=True)
            text, _ = cut_at_stop(text, stop_strings)
            out.append(Completion(text, n))
    return out
