"""Noise identity records: what a device draws for the same seed, as written
in run logs and checkpoints, and how two records compare.  No torch here
(`es-mpi info` reads these without loading it); noise.fingerprint computes one.

The same seed draws the same noise only where `normal_` runs the same way:
CUDA's launch grid follows the GPU's SM count, so an H100, an H200, a MIG
slice and the CPU each draw their own stream.  A run therefore records what
its device draws for one fixed key; resume and replay refuse another one
(unless --force), and all ranks must agree at start.
"""
from __future__ import annotations

import json

FINGERPRINT_ATTR = "noise_fingerprint"


def fingerprint_text(fp: dict) -> str:
    """The form stored in HDF5 attributes (canonical JSON)."""
    return json.dumps(fp, sort_keys=True)


def fingerprint_of(attrs) -> dict | None:
    """The noise fingerprint recorded in a run log's or checkpoint's attributes,
    or None for files written before es-mpi recorded one."""
    raw = attrs.get(FINGERPRINT_ATTR)
    if raw is None:
        return None
    try:
        fp = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        return {"block_sha256": "unreadable", "device": str(raw)[:40], "sm": "?", "torch": "?"}
    return fp if isinstance(fp, dict) else {"block_sha256": "unreadable", "device": "?", "sm": "?", "torch": "?"}


def fingerprint_short(fp: dict | None) -> str:
    """One-line form for messages: `3f2a9c1b0d4e (NVIDIA H200, 132 SMs, torch 2.9.0)`."""
    if fp is None:
        return "not recorded"
    sm = fp.get("sm")
    where = fp.get("device", "?") if not isinstance(sm, int) else f"{fp.get('device', '?')}, {sm} SMs"
    return f"{str(fp.get('block_sha256', '?'))[:12]} ({where}, torch {fp.get('torch', '?')})"


def same_noise(a: dict, b: dict) -> bool:
    """Whether two fingerprints promise the same noise: the same drawn block and
    the same SM count.  The device name and torch version are for people: a
    torch upgrade or another GPU model that draws the same bits is the same noise."""
    return a.get("block_sha256") == b.get("block_sha256") and a.get("sm") == b.get("sm")


def ranks_disagree(fps: list[dict]) -> str | None:
    """None when every rank's fingerprint is the same noise as rank 0's; else a
    one-line description naming the ranks of each kind."""
    groups: list[tuple[dict, list[int]]] = []
    for r, fp in enumerate(fps):
        for ref, ranks in groups:
            if same_noise(ref, fp):
                ranks.append(r)
                break
        else:
            groups.append((fp, [r]))
    if len(groups) == 1:
        return None
    return "; ".join(f"rank(s) {', '.join(map(str, ranks))} draw {fingerprint_short(fp)}" for fp, ranks in groups)
