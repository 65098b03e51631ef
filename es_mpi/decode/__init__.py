"""Decoding: prompts -> greedy completions.

The same decoder serves training, `es-mpi eval` and the bench, so what is
scored is what is evaluated.  Layers: `prompts` (chat formatting), `stops`
(EOS / stop strings), `cache` (the preallocated KV cache rows can leave),
`attention` (grouped-query attention kernel), `greedy` (the loop).
"""
from __future__ import annotations

from typing import Sequence

from .greedy import Completion, decode_batch, eos_ids
from .prompts import format_prompts, greedy_config
from .stops import cut_at_stop


def decode(model, tokenizer, texts: Sequence[str], max_new_tokens: int, stop_strings: Sequence[str] = (),
           batch_size: int = 0, **kw) -> list[Completion]:
    """Greedy-decode `texts` in batches of `batch_size` rows (0: one batch)."""
    bs = batch_size or len(texts) or 1
    out: list[Completion] = []
    for s in range(0, len(texts), bs):
        out += decode_batch(model, tokenizer, texts[s:s + bs], max_new_tokens, stop_strings, **kw)
    return out


__all__ = ["Completion", "cut_at_stop", "decode", "decode_batch", "eos_ids", "format_prompts", "greedy_config"]
