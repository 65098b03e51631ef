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
  its completions' lengths, not rows x the longest.  The host knows who
  finished, so it builds the row indices once and sends them in one
  non-blocking copy that every layer shares: a compaction reads nothing back
  from the device (it used to cost 3 + L syncs, one `nonzero` per layer).
* **No per-step growth.**  The cache and the attention mask are allocated
  once; each step writes one position in place.  The step's only host sync
  is the one that reads the new tokens to decide who finished.
* **Attention.**  decode.attention on every device: grouped-query attention
  without copying K/V to every query head (see there).
* **Finite logits, loudly.**  A left-padded row's pad positions see no key
  of their own prompt; where the prefix is short they would see none at all,
  and CUDA's SDPA kernels can return NaN for such a fully masked query.  The
  NaN reaches the pad keys/values of the next layer and, through 0 * NaN,
  the real rows: argmax then picks garbage while rewards stay finite.  So the
  prefill's mask lets every pad query see itself (no row is fully masked; a
  real query never sees a pad key, so its numbers are unchanged), and every
  greedy choice checks its logit: NaN anywhere in a row is that row's argmax,
  so a non-finite chosen logit flags it, marked as token -1 in the step's
  one host read, and the batch raises RunAborted naming the tile.  Cost:
  three (rows,)-sized ops per step, no extra sync.
* **The cache is ours, checked.**  A transformers release that ignores the
  cache keyword (compat.py) would leave our cache empty and decode from its
  own: after the prefill the cache must hold the whole prompt width (one int
  comparison), else the batch stops with the version and the tested range.

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

from ..errors import RunAborted
from . import compat
from .attention import decode_attention_for
from .compat import CACHE_KW
from .cache import row_cache, select_rows, step_span, whole_span
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
                 stats: dict | None = None, tile: str | None = None) -> list[Completion]:
    """Greedy-decode `texts` (formatted prompts) as one batch.
    `leave=False` keeps finished rows computing (as HF generate does), and
    `ignore_eos=True` decodes every row to max_new_tokens: both for measuring.
    `stats`, if given, gets "row_steps" (rows x decode steps computed, the
    prefill's first token included) and "shared_prefix" (tokens) added.
    `tile` labels the batch in errors (RunAborted on non-finite logits)."""
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
    # the prefill's own mask, (b, 1, s, width): causal over the row's real positions, and every
    # query sees itself, so a pad query is never fully masked (a real query sees itself anyway)
    q_at = torch.arange(lp, width, device=device)[:, None]
    k_at = torch.arange(width, device=device)[None, :]
    mask_prefill = (mask[:, None, None, :width] & (k_at <= q_at)) | (k_at == q_at)

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
        out = model(input_ids=suffix, attention_mask=mask_prefill, position_ids=suffix_pos, **{CACHE_KW: cache},
                    use_cache=True, logits_to_keep=1)
        del mask_prefill
        _check_cache_holds(cache, width)
        whole_span(cache)
        nxt = _argmax(out.logits, banned)
        row_steps = b
        mask4 = mask[:, None, None, :]
        active = [True] * b                       # leave=False: finished rows stay, inactive
        for step in range(1, max_new_tokens + 1):
            toks = nxt.tolist()                   # the step's one host sync
            if min(toks) < 0:
                _non_finite(tile, [slots[j] for j, t in enumerate(toks) if t < 0], step)
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
                    keep, dst, src = _compact(len(slots), done)
                    slots = [slots[j] for j in keep]
                    n, m = len(keep), len(dst)
                    idx = _to_device(keep + dst + src + slots, device)   # one copy, no sync
                    keep_t, slots_t = idx[:n], idx[n + 2 * m:]
                    if m:
                        select_rows(cache, idx[n + m:n + 2 * m], idx[n:n + m])
                    nxt, next_pos = nxt[keep_t], next_pos[keep_t]
                    mask[:n] = mask[keep_t]
                    rows.set(slots_t)
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
    (ties go to the lowest id either way); -1 for a row whose chosen logit is
    not finite (argmax picks a NaN wherever a row has one, so this catches NaN
    anywhere in the row, and +inf or an all -inf row)."""
    x = logits[:, -1].float()
    if banned is not None:
        x[:, banned] = -torch.inf
    best = x.argmax(-1)
    ok = x.gather(-1, best[:, None]).squeeze(-1).isfinite()
    return best.where(ok, -1)


def _check_cache_holds(cache, width: int) -> None:
    """After the prefill our cache must hold the prompt, `width` positions."""
    got = cache.get_seq_length()
    if got != width:
        raise RunAborted(f"decode: the model did not fill the decoder's KV cache ({got} of {width} prompt "
                         f"positions): transformers {compat.VERSION} ignored the '{CACHE_KW}' keyword; "
                         f"es-mpi supports transformers {compat.range_text()}")


def _non_finite(tile: str | None, rows: list[int], step: int) -> None:
    where = f"tile {tile}" if tile is not None else "a decode batch"
    raise RunAborted(f"decode: non-finite logits in {where} (batch rows {rows[:8]}, step {step}): "
                     f"the model or its attention kernel returned NaN/inf")


def _compact(live: int, done: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(keep, dst, src): the slots to keep, in their new order, and the moves
    that make it (slot dst[j] gets the row in slot src[j]).  Live rows stay in
    place and the last live rows move into the holes, so only those are copied."""
    dead = set(done)
    n = live - len(dead)
    holes = [j for j in range(n) if j in dead]
    movers = [j for j in range(n, live) if j not in dead]
    keep = list(range(n))
    for h, m in zip(holes, movers):
        keep[h] = m
    return keep, holes, movers          # as many holes below n as live rows above it


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A long tensor of `values` on `device`, copied without waiting for the
    device: from pinned memory, non-blocking, on CUDA (a blocking copy from
    pageable memory synchronises the stream, as a read back would)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _completion(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> Completion:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    text, _ = cut_at_stop(text, stop_strings)
    return Completion(text, len(ids), tuple(ids))
