"""Batched greedy decoding that costs what its tokens cost.

One call decodes one batch (a tile of the generation's work grid): the
model's own forward, our loop around it.

* **Shared prompt prefix.**  A tile's prompts usually share a template (the
  system prompt, the instruction text): the longest common token prefix is
  run once per weight group (one row per ES member in the tile) and its keys
  and values copied to the group's rows.  Rows are laid out
  [prefix | left pads | own suffix]; the attention mask hides the pads and
  position ids skip them, so every row sees exactly its own prompt.  Saves
  that share of the prefill (23 % of a Countdown prompt, 57 % of a chat-
  template conciseness question with SmolLM2).
* **Rows leave.**  A row that emits EOS or completes a stop string leaves the
  batch and its KV cache (cache.RowLayer.select), so a batch costs the sum of
  its completions' lengths, not rows x the longest.
* **No per-step growth.**  The cache and the attention mask are allocated
  once; each step writes one position in place.  The step's only host sync
  is the one that reads the new tokens to decide who finished.
* **Attention.**  On CPU, single-token steps use decode.attention (two
  batched matmuls over the contiguous cache: 4x faster than torch's CPU SDPA
  kernel here); the prefill, and every forward on GPU, use the model's own.

What the forward computes for a row depends only on the rows of its batch,
never on other batches, so a tile decodes to the same tokens on any rank.

Listener: `rows` (optional) is told which tile rows occupy the batch slots
whenever that changes (`rows.set(row_ids)`), and says which rows share
weights (`rows.groups`, one id per tile row, or None for all alike); the
low-rank perturbation uses it to give each row its member's noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .attention import decode_attention_for
from .compat import CACHE_KW
from .cache import row_cache, select_rows, step_span, whole_span, zero_padding
from .stops import StopMatcher, cut_at_stop

# A common prefix shorter than this is not worth a separate forward.
MIN_SHARED_PREFIX = 4


@dataclass(frozen=True)
class Completion:
    text: str                    # decoded text, cut just after the first stop string
    n_tokens: int                # generated tokens that count (up to EOS / stop, inclusive)
    ids: tuple[int, ...] = ()    # those tokens


def eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    return [int(e) for e in eos if e is not None]


def common_prefix(ids: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all rows share, leaving every row at
    least one token of its own (the last prompt token's logits start decoding)."""
    n = min(len(x) for x in ids) - 1
    first = ids[0]
    p = 0
    while p < n and all(x[p] == first[p] for x in ids):
        p += 1
    return p


class _Rows:
    """No listener: every row has the same weights."""
    groups = None

    def set(self, row_ids: torch.Tensor) -> None:
        pass


@torch.no_grad()
def decode_batch(model, tokenizer, texts: Sequence[str], max_new_tokens: int, stop_strings: Sequence[str] = (),
                 rows=None, leave: bool = True, share_prefix: bool = True, ignore_eos: bool = False,
                 stats: dict | None = None) -> list[Completion]:
    """Greedy-decode `texts` (formatted prompts) as one batch.
    `leave=False` keeps finished rows computing (as HF generate does), and
    `ignore_eos=True` decodes every row to max_new_tokens: both for measuring.
    `stats`, if given, gets "row_steps" (rows x decode steps computed, the
    prefill's first token included) and "shared_prefix" (tokens) added."""
    if not texts:
        return []
    device = next(model.parameters()).device
    rows = rows or _Rows()
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    b = len(ids)
    groups = rows.groups
    lp = common_prefix(ids) if share_prefix else 0
    if lp < MIN_SHARED_PREFIX or (b == 1 and groups is None):
        lp = 0
    suffix_len = [len(x) - lp for x in ids]
    s = max(suffix_len)
    width = lp + s
    max_len = width + max_new_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # [prefix | pads | suffix] per row; mask over every position a row may attend to
    suffix = torch.full((b, s), pad, dtype=torch.long)
    mask = torch.zeros(b, max_len, dtype=torch.bool)   # generated positions turn True as they fill
    mask[:, :lp] = True
    for i, x in enumerate(ids):
        n = suffix_len[i]
        suffix[i, s - n:] = torch.tensor(x[lp:], dtype=torch.long)
        mask[i, width - n:width] = True
    pos = mask[:, :width].long().cumsum(-1) - 1
    suffix_pos = pos[:, lp:].clamp(min=0)
    next_pos = pos[:, -1] + 1                    # (b,) position of the first new token
    suffix, mask, suffix_pos, next_pos = (t.to(device) for t in (suffix, mask, suffix_pos, next_pos))


    cache = row_cache(model.config.num_hidden_layers, b, max_len)
    eos = eos_ids(model, tokenizer)
    matcher = StopMatcher(tokenizer, [] if ignore_eos else eos, stop_strings)
    # ignore_eos, as HF's min_new_tokens: EOS can never be the argmax
    banned = torch.tensor(eos, dtype=torch.long, device=device) if ignore_eos and eos else None
    gen: list[list[int]] = [[] for _ in range(b)]
    slots = list(range(b))                        # tile row in each batch slot (host copy)
    with decode_attention_for(model):
        if lp:
            # one row per weight group runs the prefix; its cache rows are copied to the group's rows
            if groups is None:
                first, of_row = torch.zeros(1, dtype=torch.long), torch.zeros(b, dtype=torch.long)
            else:
                g = torch.as_tensor(groups)
                uniq, of_row = torch.unique(g, return_inverse=True)
                first = torch.stack([torch.nonzero(g == u)[0, 0] for u in uniq])
            first, of_row = first.to(device), of_row.to(device)
            rows.set(first)
            k = first.numel()
            prefix = torch.tensor(ids[0][:lp], dtype=torch.long, device=device).expand(k, lp)
            model(input_ids=prefix, position_ids=torch.arange(lp, device=device).expand(k, lp), **{CACHE_KW: cache},
                  use_cache=True, logits_to_keep=1)
            select_rows(cache, of_row)
        rows.set(torch.arange(b, device=device))
        out = model(input_ids=suffix, attention_mask=mask[:, :width], position_ids=suffix_pos, **{CACHE_KW: cache},
                    use_cache=True, logits_to_keep=1)
        zero_padding(cache, mask[:, :width])
        whole_span(cache)
        nxt = _argmax(out.logits, banned)
        row_steps = b
        mask4 = mask[:, None, None, :]
        active = [True] * b                       # leave=False: finished rows stay, inactive
        for step in range(1, max_new_tokens + 1):
            toks = nxt.tolist()                   # the step's one host sync
            done = []
            for j, r in enumerate(slots):
                if active[j]:
                    gen[r].append(toks[j])
                    if matcher.finished(gen[r]):
                        done.append(j)
            if step == max_new_tokens:
                break
            if leave:
                if len(done) == len(slots):
                    break
                if done:
                    keep, moved = _compact(len(slots), done, device)
                    select_rows(cache, keep, moved)
                    kept = keep.tolist()
                    slots = [slots[j] for j in kept]
                    nxt, next_pos = nxt[keep], next_pos[keep]
                    mask[: len(kept)] = mask[keep]
                    rows.set(torch.tensor(slots, dtype=torch.long, device=device))
            else:
                for j in done:
                    active[j] = False
                if not any(active):
                    break
            live = len(slots)
            cur = width + step                    # cache positions once this step's token is in
            mask[:live, cur - 1] = True
            out = model(input_ids=nxt[:, None], attention_mask=mask4[:live, :, :, :step_span(cache, cur)],
                        position_ids=next_pos[:, None], **{CACHE_KW: cache}, use_cache=True)
            nxt = _argmax(out.logits, banned)
            next_pos = next_pos + 1
            row_steps += live
    if stats is not None:
        stats["row_steps"] = stats.get("row_steps", 0) + row_steps
        stats["shared_prefix"] = stats.get("shared_prefix", 0) + lp
    return [_completion(tokenizer, g, stop_strings) for g in gen]


def _argmax(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """Greedy choice from the last position, in fp32 as HF generate takes it
    (ties go to the lowest id either way)."""
    x = logits[:, -1].float()
    if banned is not None:
        x[:, banned] = -torch.inf
    return x.argmax(-1)


def _compact(live: int, done: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots to keep, in their new order: live rows stay in place and the last
    live rows move into the holes, so only those are copied."""
    dead = set(done)
    n = live - len(dead)
    holes = [j for j in range(n) if j in dead]
    movers = [j for j in range(n, live) if j not in dead]
    keep = list(range(n))
    for h, m in zip(holes, movers):
        keep[h] = m
    keep_t = torch.tensor(keep, dtype=torch.long, device=device)
    moved = keep_t != torch.arange(n, device=device)
    return keep_t, moved


def _completion(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> Completion:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    text, _ = cut_at_stop(text, stop_strings)
    return Completion(text, len(ids), tuple(ids))
