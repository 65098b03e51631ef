"""Attention for the decoder: grouped-query attention without copying keys
and values to every query head, on every device.

Why: transformers' "sdpa" path repeats K and V to all query heads
(`repeat_kv`) whenever it hands torch's kernel a mask, as the decoder always
does, in every layer of every step: 7x the cache traffic for Qwen2.5-7B
(28 query heads, 4 kv heads).  On CPU its kernel was also slow: 1.0 ms per
layer for one bf16 decode step of 32 rows x 9 heads over 160 positions here,
0.24 ms for the two matmuls below (a SmolLM2 step spent a third of its time
in attention).

* Single-token steps, every device: q k^T and p v as two batched matmuls
  over the contiguous cache of cache.RowLayer, the G query heads of a kv
  head stacked as G rows of one matmul (a view, no copy).
* Multi-token forwards (the prefill), `prefill_gqa(device type)`: on CPU
  torch SDPA with `enable_gqa=True` (no copy; bit-identical, and faster: 7.0
  vs 26.5 ms fp32, 3.7 vs 5.0 ms bf16, for a SmolLM2-shaped 32-row prefill
  layer here).  On CUDA torch's kernels that take a mask do not take grouped
  queries, and SDPA would fall back to its math kernel, which copies K/V
  anyway and materialises the scores; so there the prefill keeps
  transformers' sdpa: one K/V copy per layer per batch, never per step.
Registered with transformers' AttentionInterface (with the sdpa mask
builder), so the models' own attention modules call it.

Maths of a step: q k^T in the working dtype, scaled and softmaxed in fp32 (as
HF's eager attention does), cast back for p v.  Masked scores get the most
negative fp32, not -inf, so a row with every key masked yields finite values
instead of NaN (which 0 * NaN would spread).
"""
from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "es_mpi_decode"
_NEG = torch.finfo(torch.float32).min


def prefill_gqa(device_type: str) -> bool:
    """Whether multi-token forwards on `device_type` run torch SDPA with
    grouped queries (True) or transformers' sdpa (False, which repeats K/V
    when there is a mask): see the module docstring."""
    return device_type == "cpu"


def uses_decode_attention(attn_implementation: str) -> bool:
    """Whether the decoder swaps a model's attention for `decode_attention`:
    wherever it would run transformers' "sdpa", on every device (others,
    eager or flash-attention, are left as they are)."""
    return attn_implementation == "sdpa"


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, H, q, D); key/value (B, Hkv, t, D); attention_mask bool
    (B, 1, q, t), True = attend, or None (causal).  Returns ((B, q, H, D), None)."""
    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool:
        if prefill_gqa(query.device.type) and _plain(query, key, attention_mask, kwargs):
            return _sdpa_gqa(module, query, key, value, attention_mask, scaling, dropout, kwargs.get("is_causal"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, h, _, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    g = h // hkv
    scale = scaling if scaling is not None else d ** -0.5
    s = torch.matmul(query.reshape(b, hkv, g, d), key.transpose(-1, -2)).float()   # (B, Hkv, G, t)
    s.mul_(scale).masked_fill_(~attention_mask, _NEG)
    p = torch.softmax(s, dim=-1).to(value.dtype)
    out = torch.matmul(p, value)                                                    # (B, Hkv, G, D)
    return out.view(b, 1, h, d), None


def _plain(query, key, attention_mask, kwargs) -> bool:
    """A forward _sdpa_gqa computes as transformers' sdpa would: a boolean or
    no mask (then causal over as many keys as queries), no position bias."""
    if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return False
    if attention_mask is None:
        return key.shape[2] == query.shape[2]
    return attention_mask.dtype == torch.bool


def _sdpa_gqa(module, query, key, value, attention_mask, scaling, dropout, is_causal):
    """torch SDPA over the kv heads as they are (enable_gqa): no repeat_kv."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    # attribute lookup at call time, so tests can patch torch's SDPA
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def decode_attention_for(model):
    """Run `model` with decode_attention (where uses_decode_attention says)."""
    cfg = model.config
    if not uses_decode_attention(cfg._attn_implementation):
        yield
        return
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = "sdpa"
