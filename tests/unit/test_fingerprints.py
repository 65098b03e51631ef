"""Issue 16 items 4 and 6: the noise fingerprint (what a device draws for the
same seed) and the master's exact integer fingerprint (the cross-rank
agreement check, computed on the device without a host copy), with fake
communicators for the cross-rank checks."""
from __future__ import annotations

import hashlib
import platform

import numpy as np
import pytest
import torch

from es_mpi.engine.noise import _FINGERPRINT_SEED, BLOCK, NoiseSource
from es_mpi.engine.noise_id import (fingerprint_of, fingerprint_short, fingerprint_text, ranks_disagree,
                                    same_noise)
from es_mpi.errors import RunAborted, UserError
from es_mpi.model import FP_PRIME, FP_RADIX, FP_SIDE, FP_TILE, _fp_weights, weights_digest, weights_fingerprint
from es_mpi.trainer import check_masters_agree, check_noise_agrees


class FakeComm:
    """Rank `rank` of `size`: the gathers return what every rank sent, with
    this rank's own entry put in (`others` stands for the other ranks)."""

    def __init__(self, rank=0, size=2, others=None):
        self.rank, self.size, self.others = rank, size, others

    @property
    def is_root(self):
        return self.rank == 0

    def allgather_json(self, obj):
        out = list(self.others) if self.others is not None else [obj] * self.size
        out[self.rank] = obj
        return out

    def allgather_bytes(self, data, width):
        assert len(data) == width
        out = list(self.others) if self.others is not None else [data] * self.size
        out[self.rank] = data
        return out


# -- noise fingerprint --------------------------------------------------------
def test_noise_fingerprint_is_the_hash_of_one_block_drawn_for_a_fixed_key():
    fp = NoiseSource(1).fingerprint()
    ref = torch.empty(BLOCK).normal_(generator=torch.Generator().manual_seed(_FINGERPRINT_SEED))
    assert fp == {"block_sha256": hashlib.sha256(ref.numpy()).hexdigest(), "device": f"cpu {platform.machine()}",
                  "sm": "cpu", "torch": torch.__version__}
    # the device's stream, not the run's: the same for every run seed, and stable
    assert NoiseSource(12345).fingerprint() == fp == NoiseSource(1).fingerprint()


def test_noise_fingerprint_changes_with_what_the_device_draws(monkeypatch):
    before = NoiseSource(1).fingerprint()
    real = torch.Tensor.normal_

    def other_grid(self, *a, **k):     # as if a GPU with another SM count drew the block
        out = real(self, *a, **k)
        out[len(out) // 2] += 1.0
        return out

    monkeypatch.setattr(torch.Tensor, "normal_", other_grid)
    after = NoiseSource(1).fingerprint()
    assert after["block_sha256"] != before["block_sha256"] and not same_noise(before, after)


def test_fingerprint_records_and_comparisons():
    fp = {"block_sha256": "ab" * 32, "device": "NVIDIA H200", "sm": 132, "torch": "2.9.0"}
    assert fingerprint_of({"noise_fingerprint": fingerprint_text(fp)}) == fp
    assert fingerprint_of({"noise_fingerprint": fingerprint_text(fp).encode()}) == fp
    assert fingerprint_of({}) is None
    assert fingerprint_short(fp) == "abababababab (NVIDIA H200, 132 SMs, torch 2.9.0)"
    assert fingerprint_short(NoiseSource(1).fingerprint()).endswith(f"(cpu {platform.machine()}, torch "
                                                                   f"{torch.__version__})")
    assert same_noise(fp, {**fp, "torch": "2.10.0", "device": "NVIDIA H200 NVL"})  # same bits: same noise
    assert not same_noise(fp, {**fp, "sm": 114})                                   # another grid
    assert not same_noise(fp, {**fp, "block_sha256": "cd" * 32})


def test_ranks_that_draw_other_noise_are_refused_on_every_rank():
    mine = NoiseSource(1).fingerprint()
    assert check_noise_agrees(NoiseSource(1), FakeComm(rank=1, size=3)) == mine
    mig = {"block_sha256": "0f" * 32, "device": "NVIDIA H100 MIG 3g.40gb", "sm": 60, "torch": torch.__version__}
    for rank in range(3):   # every rank sees the same gathered list, so every rank raises the same line
        src = NoiseSource(1)
        if rank == 2:
            src._fingerprint = mig   # rank 2 runs on a MIG slice
        with pytest.raises(UserError) as e:
            check_noise_agrees(src, FakeComm(rank=rank, size=3, others=[mine, mine, mig]))
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("ranks draw different noise for the same seed: ")
        assert f"rank(s) 0, 1 draw {fingerprint_short(mine)}" in msg
        assert "rank(s) 2 draw 0f0f0f0f0f0f (NVIDIA H100 MIG 3g.40gb, 60 SMs" in msg
    assert ranks_disagree([mine, {**mine, "torch": "other"}]) is None


# -- the master's agreement fingerprint -----------------------------------------
def _reference(tensors) -> int:
    """The fingerprint's definition in numpy and Python integers (exact)."""
    a, b = (w.numpy().astype(object) for w in _fp_weights(torch.device("cpu")))
    h = 0
    for t in tensors:
        x = t.reshape(-1).numpy().view(np.int32).astype(np.int64)
        for s in range(0, len(x), FP_TILE):
            part = x[s:s + FP_TILE]
            rows = len(part) // FP_SIDE
            head, tail = part[:rows * FP_SIDE].reshape(rows, FP_SIDE), part[rows * FP_SIDE:]
            total = int((head.sum(0).astype(object) * a).sum()) + int((head.sum(1).astype(object) * b[:rows]).sum())
            total += int((tail.astype(object) * a[:len(tail)]).sum())
            assert abs(total) < 2 ** 63           # the bound that keeps int64 exact
            h = (h * FP_RADIX + total % FP_PRIME) % FP_PRIME
    return h


def _master():
    g = torch.Generator().manual_seed(0)
    shapes = [(FP_TILE + 3 * FP_SIDE + 5,),   # a full tile, then 3 rows and a tail
              (7,), (64, 48), (FP_SIDE,), (3, 5, 11)]
    return [torch.randn(s, generator=g) for s in shapes]


def _flip(tensors, i, pos, bit):
    out = [t.clone() for t in tensors]
    flat = out[i].view(-1).view(torch.int32)
    flat[pos] ^= torch.tensor(1 << bit if bit < 31 else -(1 << 31), dtype=torch.int32)
    return out


def test_agreement_fingerprint_matches_its_definition():
    ts = _master()
    assert weights_fingerprint(ts) == _reference(ts)
    assert 0 <= weights_fingerprint(ts) < FP_PRIME


def test_agreement_fingerprint_cannot_overflow():
    """Extreme bit patterns (every element -2^31 or 2^31 - 1) over a full tile:
    still the exact integer result, so it is the same on every device."""
    lo = torch.full((FP_TILE + FP_SIDE + 1,), -(1 << 31), dtype=torch.int32).view(torch.float32)
    hi = torch.full((FP_TILE + FP_SIDE + 1,), (1 << 31) - 1, dtype=torch.int32).view(torch.float32)
    for ts in ([lo], [hi], [lo, hi]):
        assert weights_fingerprint(ts) == _reference(ts)


def test_equal_masters_give_equal_fingerprints():
    ts = _master()
    assert weights_fingerprint(ts) == weights_fingerprint([t.clone() for t in ts])
    assert weights_fingerprint(ts) != weights_fingerprint(ts[::-1])   # order is part of it


BITS = {0: "lowest mantissa bit", 1: "bit1", 22: "top mantissa bit", 23: "lowest exponent bit", 30: "bit30",
        31: "sign bit"}


@pytest.mark.parametrize("where", ["first element", "last element", "last element of the first tile",
                                   "a middle tensor", "the tail of a partial tile", "a 3-d tensor"])
@pytest.mark.parametrize("bit", list(BITS), ids=list(BITS.values()))
def test_flipping_any_one_bit_changes_the_fingerprint(where, bit):
    ts = _master()
    i, pos = {"first element": (0, 0), "last element": (len(ts) - 1, ts[-1].numel() - 1),
              "last element of the first tile": (0, FP_TILE - 1), "a middle tensor": (2, 1000),
              "the tail of a partial tile": (0, FP_TILE + 3 * FP_SIDE + 2), "a 3-d tensor": (4, 77)}[where]
    flipped = _flip(ts, i, pos, bit)
    assert not torch.equal(flipped[i], ts[i])
    assert weights_fingerprint(flipped) != weights_fingerprint(ts)
    assert weights_digest(flipped) != weights_digest(ts)


def test_every_single_bit_of_a_small_tensor_is_seen():
    ts = [torch.randn(5, 3, generator=torch.Generator().manual_seed(1))]
    base = weights_fingerprint(ts)
    seen = {weights_fingerprint(_flip(ts, 0, pos, bit)) for pos in range(15) for bit in range(32)}
    assert base not in seen and len(seen) == 15 * 32


def test_a_master_that_differs_between_ranks_aborts_naming_the_generation_and_ranks():
    ts = _master()
    mine = weights_fingerprint(ts).to_bytes(8, "little")
    other = weights_fingerprint(_flip(ts, 2, 5, 0)).to_bytes(8, "little")
    check_masters_agree(FakeComm(rank=1, size=3, others=[mine, mine, mine]), weights_fingerprint(ts), 4)
    for rank in (0, 1, 3):
        comm = FakeComm(rank=rank, size=4, others=[mine, other, mine, other])
        fp = int.from_bytes(comm.others[rank], "little")
        with pytest.raises(RunAborted, match=r"^generation 8: master weights diverged across ranks: "
                                             r"rank\(s\) 1, 3 differ from rank 0$"):
            check_masters_agree(comm, fp, 8)
