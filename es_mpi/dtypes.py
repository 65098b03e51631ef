"""Choosing the working dtype (`model.dtype: auto`).

The fastest dtype depends on the machine: on a CPU with native bf16 matrix
instructions (AVX512-BF16 or AMX) bf16 decodes about 2x faster than fp32; on
one without, bf16 matmuls are emulated and fp32 was measured 2x faster.  So
`auto` asks the processor, and where its flags say nothing it times both
(a few milliseconds).  Rank 0 decides and broadcasts, so every rank works in
the same dtype even on a mixed cluster.
"""
from __future__ import annotations

import time

import torch

from .host import cpu_flags

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# bf16 must beat fp32 by this factor in the probe to be chosen (timing noise margin)
PROBE_MARGIN = 1.2


def probe_seconds(dtype: torch.dtype, rows: int = 32, dim: int = 1024, reps: int = 10) -> float:
    """Best-of-3 time of `reps` (rows x dim) @ (dim x dim) products: the shape
    of a decode step's projections."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=g).to(dtype)
    w = torch.randn(dim, dim, generator=g).to(dtype)
    torch.nn.functional.linear(x, w)  # first call: kernel selection
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return best


def choose(pref: str, device: str, flags: set[str] | None = None) -> tuple[str, str]:
    """(dtype name, why) for model.dtype `pref` on `device`."""
    if pref != "auto":
        return pref, "as configured"
    if device.startswith("cuda"):
        # including_emulation=False: pre-Ampere cards "support" bf16 only by
        # emulation, several times slower than fp16 there
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", "auto: CUDA device with bf16"
        return "fp16", "auto: CUDA device without bf16"
    flags = cpu_flags() if flags is None else flags
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if native:
        return "bf16", f"auto: CPU has {'+'.join(native)}"
    t32, t16 = probe_seconds(torch.float32), probe_seconds(torch.bfloat16)
    if t32 / t16 >= PROBE_MARGIN:
        return "bf16", f"auto: no native bf16 flag, but bf16 matmul timed {t32 / t16:.2f}x faster than fp32"
    return "fp32", f"auto: no native bf16 on this CPU (bf16 matmul timed {t32 / t16:.2f}x fp32's speed)"
