"""Attention for single-token decode steps on CPU: grouped-query attention
as two batched matmuls over contiguous keys/values.

Why: transformers' "sdpa" (torch's CPU flash kernel) took 1.0 ms per layer
for one bf16 decode step of 32 rows x 9 heads over 160 positions here; these
two matmuls over the contiguous cache of cache.RowLayer took 0.24 ms.  A
SmolLM2 decode step spent a third of its time in attention.  Multi-token
forwards (the prefill) go to transformers' sdpa unchanged, where the kernel
is not slower.  Registered with transformers' AttentionInterface (with the
sdpa mask builder), so the models' own attention modules call it.

Maths: q k^T in the working dtype, scaled and softmaxed in fp32 (as HF's
eager attention does), cast back for p v.  Masked scores get the most
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


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, H, 1, D); key/value (B, Hkv, t, D); attention_mask bool
    (B, 1, 1, t), True = attend.  Returns ((B, 1, H, D), None)."""
    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool:
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


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def decode_attention_for(model):
    """Run `model` with decode_attention on CPU (elsewhere: as it is)."""
    cfg = model.config
    if next(model.parameters()).device.type != "cpu" or cfg._attn_implementation != "sdpa":
        yield
        return
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = "sdpa"
