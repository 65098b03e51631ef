"""Seed derivation and block-wise noise (pure functions, no MPI, no state).

A member's noise is a pure function of (run seed, generation, noise index,
tensor index, block index): each tensor is cut into blocks of BLOCK elements
(flat, row-major) and each block of each tensor of each member has its own
stream, seeded by a 63-bit hash of that tuple.  So no two tensors and no two
members share noise (the reference code seeds every tensor alike), the noise is
the same whatever the rank count, and any block can be drawn on its own: the
materialise and update passes need scratch of one block, not of the largest
tensor (a 7B model's embedding is 545 M elements, 2.2 GB per fp32 buffer).
Noise is float32 and bit-reproducible on a given device type (CPU here; CUDA
draws a different but equally fixed stream, which also depends on the GPU's SM
count: runs record a noise fingerprint, see noise_id).
"""
from __future__ import annotations

import hashlib
import platform
import struct
from dataclasses import dataclass

import numpy as np
import torch

# the fingerprint's records and comparisons, torch-free for `es-mpi info`
from .noise_id import (FINGERPRINT_ATTR, fingerprint_of, fingerprint_short, fingerprint_text,  # noqa: F401
                       ranks_disagree, same_noise)

_MASK63 = (1 << 63) - 1

# Elements per independently seeded block (16 MB of fp32).  Part of the noise's
# definition: changing it changes every run's noise.  Cost: one reseed (a few
# microseconds, plus a kernel launch on CUDA) per block, i.e. ~2 000 per member
# on an 8B model, far below drawing the block's 4 M normals.
BLOCK = 1 << 22
# Names this definition in run logs and checkpoints, so that resume and replay
# refuse a run whose noise was drawn otherwise.  Files without it come from
# es-mpi 0.1, which drew one stream per whole tensor (LEGACY_SCHEME).
SCHEME = f"blake2b-block{BLOCK}"
LEGACY_SCHEME = "blake2b-tensor"


def scheme_of(attrs) -> str:
    return str(attrs.get("noise_scheme", LEGACY_SCHEME))


def scheme_for(es) -> str:
    """The noise definition an ESConfig draws.  Low-rank factors come from the
    same seed tree under their own domain ("lowrank"); its 1-D tensors (scope
    `all`) use the block noise of SCHEME."""
    if getattr(es, "noise", "full") == "full":
        return SCHEME
    return f"lowrank-r{es.rank}-{es.lowrank_scope}+{SCHEME}"


def blocks(numel: int) -> list[tuple[int, int, int]]:
    """(block index, start, stop) over a flat tensor of `numel` elements."""
    return [(b, s, min(s + BLOCK, numel)) for b, s in enumerate(range(0, numel, BLOCK))]


def derive_seed(*parts: int, domain: str = "noise") -> int:
    """A 63-bit seed from integers, through BLAKE2b: collisions between
    distinct tuples are as unlikely as a 63-bit hash collision (unlike
    `seed + tensor_index`, which collides by construction)."""
    h = hashlib.blake2b(domain.encode() + b"\0" + struct.pack(f"<{len(parts)}q", *parts), digest_size=8)
    return int.from_bytes(h.digest(), "little") & _MASK63


@dataclass(frozen=True)
class MemberNoise:
    """Which noise a member uses: `index` keys the draw, `sign` is +1/-1.
    With antithetic pairs members 2k and 2k+1 share index k with signs +1, -1."""
    index: int
    sign: int


def member_noise(member: int, antithetic: bool) -> MemberNoise:
    if antithetic:
        return MemberNoise(member // 2, 1 if member % 2 == 0 else -1)
    return MemberNoise(member, 1)


class NoiseSource:
    """Regenerates any tensor's noise for (seed, generation, index).

    One torch.Generator is reused and reseeded per block: reseeding costs a
    few microseconds, far below drawing even a small tensor.
    """

    def __init__(self, run_seed: int, device: str | torch.device = "cpu"):
        self.run_seed = int(run_seed)
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)
        self._fingerprint: dict | None = None

    def seed_for(self, generation: int, index: int, tensor: int, block: int) -> int:
        return derive_seed(self.run_seed, generation, index, tensor, block)

    def block(self, generation: int, index: int, tensor: int, block: int, out: torch.Tensor) -> torch.Tensor:
        """Block `block` of a tensor's float32 N(0, 1) noise, written into `out`
        (1-D, the block's length as given by `blocks`)."""
        self._gen.manual_seed(self.seed_for(generation, index, tensor, block))
        return out.normal_(generator=self._gen)

    def factor(self, generation: int, index: int, tensor: int, part: int, rows: int, rank: int) -> torch.Tensor:
        """Low-rank factor `part` (0: A, 1: B) of a matrix's perturbation for
        draw `index`: (rows x rank) float32 N(0, 1), its own stream."""
        self._gen.manual_seed(derive_seed(self.run_seed, generation, index, tensor, part, domain="lowrank"))
        return torch.empty(rows, rank, dtype=torch.float32, device=self.device).normal_(generator=self._gen)

    def tensor(self, generation: int, index: int, tensor: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """A whole tensor's noise of `shape`, block by block (tests and tools;
        the engine draws one block at a time)."""
        out = torch.empty(tuple(shape), dtype=torch.float32, device=self.device)
        flat = out.view(-1)
        for b, s, e in blocks(flat.numel()):
            self.block(generation, index, tensor, b, flat[s:e])
        return out

    def fingerprint(self) -> dict:
        """What this device draws (see `fingerprint`), computed once."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self._gen, self.device)
        return self._fingerprint


# -- noise identity (see noise_id) ---------------------------------------------
# The fingerprint's key: fixed, independent of the run seed (a run resumed
# with another seed under --force still compares like with like); a whole
# BLOCK, the size the engine draws, so that the grid is the one the SM count
# decides.
_FINGERPRINT_SEED = derive_seed(0, domain="fingerprint")


def fingerprint(gen: torch.Generator, device: str | torch.device) -> dict:
    """{"block_sha256": SHA-256 of one BLOCK of N(0, 1) float32 drawn with `gen`
    for a fixed seed, "device": the device's name, "sm": its SM count ("cpu" on
    the CPU), "torch": the torch version}.  Costs one block draw (16 MB of
    scratch, ~50 ms on a CPU core) and, on CUDA, one 16 MB copy to the host."""
    device = torch.device(device)
    out = torch.empty(BLOCK, dtype=torch.float32, device=device)
    gen.manual_seed(_FINGERPRINT_SEED)
    out.normal_(generator=gen)
    digest = hashlib.sha256(out.cpu().numpy()).hexdigest()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, sm = props.name, int(props.multi_processor_count)
    else:
        name, sm = f"{device.type} {platform.machine()}".strip(), device.type
    return {"block_sha256": digest, "device": name, "sm": sm, "torch": torch.__version__}


def prompt_batch(run_seed: int, generation: int, n_available: int, batch: int) -> np.ndarray:
    """The prompt indices every member is scored on in `generation`: a pure
    function of (run seed, generation), so all ranks agree without talking.
    Without replacement when possible."""
    rng = np.random.Generator(np.random.Philox(key=derive_seed(run_seed, generation, domain="prompts")))
    if batch <= n_available:
        return np.sort(rng.choice(n_available, size=batch, replace=False)).astype(np.int64)
    return rng.integers(0, n_available, size=batch).astype(np.int64)
