"""The KV cache of one decode batch: grown in chunks, and able to drop rows.

A transformers `Cache` made of our `RowLayer`s, so the models' own attention
code writes and reads it unchanged.  HF's DynamicCache grows by `torch.cat`
every step (9 % of decode time in the issue's profile); its StaticCache
attends over its whole preallocated length every step.  A RowLayer holds
(rows, kv heads, capacity, head dim) and grows its capacity CHUNK positions at
a time (one copy per CHUNK steps), writing each step's keys and values in
place.

Decode steps (after `whole_span(cache)`) read the whole capacity, `keys[:n]`:
a contiguous tensor (unfilled positions are masked by the decoder), because the batched matmuls
of decode.attention run 2.5-4x faster on contiguous keys/values than on a
strided view (0.24 vs 0.63-0.92 ms per layer here).  Cost: on average CHUNK/2
masked positions per step.  Before that (the prefill, a one-token prompt
included) a forward gets the filled part only, as HF's mask for it expects.

`select(src, dst)` moves rows: the decoder calls it when rows finish, so
finished rows stop costing attention and matmul work.  Rows that keep their
slot are not copied; only rows moved into a freed slot are (the decoder moves
the last live rows into the holes), so a finished row costs one row's cache
copy, not the whole batch's.  The indices come built by the host, one pair
for all layers: select reads nothing back from the device.

Pad positions of the prompt hold whatever the prefill computed there: finite
(greedy.py's prefill mask lets a pad query see itself) and masked by every
later step, where a masked weight is exactly 0.  They used to be zeroed after
the prefill because a fully masked pad query could leave NaN there (0 * NaN
is NaN); with no fully masked query that pass is gone, and a NaN from
anywhere else reaches the logits, which the decoder checks.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

CHUNK = 64


class RowLayer(DynamicLayer):
    """One layer's keys/values, (rows, heads, capacity, head_dim), filled up to `length`."""

    def __init__(self, rows: int, max_len: int):
        super().__init__()
        self.rows, self.max_len, self.length, self.capacity = rows, max_len, 0, 0
        self.whole = False   # return the whole capacity (decode steps) or the filled part

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._kshape = (key_states.shape[1], key_states.shape[-1])
        self._vshape = (value_states.shape[1], value_states.shape[-1])
        self.dtype = key_states.dtype
        self.is_initialized = True

    def span(self, need: int) -> int:
        """The capacity once `need` positions are filled."""
        return self.capacity if need <= self.capacity else min(self.max_len, -(-need // CHUNK) * CHUNK)

    def _grow(self, need: int) -> None:
        cap = self.span(need)
        # zeros, not empty: unfilled positions are read (masked) by single-token steps,
        # and a masked 0 times uninitialised memory that happens to be NaN is NaN
        keys = torch.zeros(self.rows, self._kshape[0], cap, self._kshape[1], dtype=self.dtype, device=self.device)
        values = torch.zeros(self.rows, self._vshape[0], cap, self._vshape[1], dtype=self.dtype, device=self.device)
        if self.length:
            keys[:, :, :self.length] = self.keys[:, :, :self.length]
            values[:, :, :self.length] = self.values[:, :, :self.length]
        self.keys, self.values, self.capacity = keys, values, cap

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = key_states.shape[0], key_states.shape[-2]
        end = self.length + q
        if end > self.max_len:
            raise RuntimeError(f"decode cache overflow: {end} > {self.max_len} positions")
        if end > self.capacity:
            self._grow(end)
        self.keys[:n, :, self.length:end] = key_states
        self.values[:n, :, self.length:end] = value_states
        self.length = end
        if self.whole:
            return self.keys[:n], self.values[:n]
        return self.keys[:n, :, :end], self.values[:n, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.max_len

    def select(self, src: torch.Tensor, dst: torch.Tensor | None = None) -> None:
        """Row dst[j] becomes old row src[j] (dst None: row j becomes old row
        src[j], for every j < len(src)).  Long index tensors on the cache's
        device; no host sync."""
        if not self.is_initialized or self.length == 0:
            return
        t = self.length
        if dst is None:
            n = src.numel()
            self.keys[:n, :, :t] = self.keys[src, :, :t]
            self.values[:n, :, :t] = self.values[src, :, :t]
        else:
            self.keys[dst, :, :t] = self.keys[src, :, :t]
            self.values[dst, :, :t] = self.values[src, :, :t]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select(indices)


def row_cache(n_layers: int, rows: int, max_len: int) -> Cache:
    return Cache(layers=[RowLayer(rows, max_len) for _ in range(n_layers)])


def whole_span(cache: Cache) -> None:
    """From now on forwards attend over the whole capacity (the decoder masks it)."""
    for layer in cache.layers:
        layer.whole = True


def step_span(cache: Cache, need: int) -> int:
    """Positions a single-token step that fills `need` positions attends over
    (the width of the mask the decoder passes)."""
    return cache.layers[0].span(need)


def select_rows(cache: Cache, src: torch.Tensor, dst: torch.Tensor | None = None) -> None:
    """RowLayer.select on every layer, with the same index tensors."""
    for layer in cache.layers:
        layer.select(src, dst)
