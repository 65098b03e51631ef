"""What a rank holds on its device, in bytes, and where Adam's moments go.

Per rank, full-rank noise, P parameters, working dtype of w bytes:

    fp32 master            4 P      (the truth; every member is cast(master + sigma eps));
                                    on the card, or pinned host memory (es.master)
    working weights        w P      (the model that decodes; 2 P in bf16): the HF
                                    model with backend hf, the vLLM engine's own
                                    copy with backend vllm (no HF copy beside it)
    noise scratch          2 x 16 MB (two fp32 blocks of noise.BLOCK elements)
    Adam moments m, v      8 P      (only with es.optimizer: adam)
    KV cache, activations  the rest

Qwen2.5-7B (7.62 G parameters) in bf16: 30.5 + 15.2 = 45.7 GB with SGD, which
leaves ~30 GB of an 80 GB card for the KV cache; Adam's 61 GB does not fit
beside them, so `es.adam_state: auto` keeps the moments in pinned host memory
there and streams them block by block through the update (2 x 8 P bytes over
PCIe per generation: ~5 s at 7B on PCIe 4, against minutes of decoding).
`es.master: auto` keeps the master on the card when master + working fit
RESIDENT_SHARE of it (7B on 80 GB: yes), else in pinned host memory, streamed
one noise block at a time through every member write and the update (4 P
bytes up per member, 8 P per update: ~1.2 s per member at 7B on PCIe 4).
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
# Share of the card the resident tensors may take: the rest is the KV cache,
# activations and the CUDA context (~1 GB) of the decoder.
RESIDENT_SHARE = 0.75


@dataclass(frozen=True)
class Budget:
    n_params: int
    working_bytes: int      # bytes per working parameter (2 for bf16/fp16, 4 for fp32)
    adam: bool
    master_on_card: bool = True

    @property
    def master(self) -> int:
        return 4 * self.n_params

    @property
    def working(self) -> int:
        return self.working_bytes * self.n_params

    @property
    def moments(self) -> int:
        return 8 * self.n_params if self.adam else 0

    @property
    def resident(self) -> int:
        """Bytes on the card: the master (unless on the host), working, moments."""
        return (self.master if self.master_on_card else 0) + self.working + self.moments

    @classmethod
    def of(cls, weights, adam: bool) -> "Budget":
        """The budget of an engine.weights.Weights (its working dtype's size)."""
        return cls(weights.n_params, weights.working[0].element_size(), adam, not weights.streamed)

    def text(self) -> str:
        parts = [f"master {self.master / GB:.1f} GB" + ("" if self.master_on_card else " (host)"),
                 f"working {self.working / GB:.1f} GB"]
        if self.adam:
            parts.append(f"Adam moments {self.moments / GB:.1f} GB")
        return " + ".join(parts)


def card_bytes(device: str) -> int | None:
    """Total memory of a CUDA device, None for the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def _place(key: str, pref: str, device: str, budget: Budget, card_bytes: int | None) -> tuple[str, str]:
    """(device or "cpu", why) for a setting `key` of auto | device | host:
    on the card when budget.resident fits RESIDENT_SHARE of it (auto), else
    pinned host memory; `device` that does not fit is a ValueError with the
    arithmetic."""
    if not device.startswith("cuda") or card_bytes is None:
        return device, "same memory as the working weights"
    limit = RESIDENT_SHARE * card_bytes
    fits = budget.resident <= limit
    arith = f"{budget.text()} = {budget.resident / GB:.1f} GB vs {RESIDENT_SHARE:.0%} of {card_bytes / GB:.0f} GB"
    if pref == "host" or (pref == "auto" and not fits):
        return "cpu", f"pinned host memory, streamed per block ({arith})"
    if pref == "device" and not fits:
        raise ValueError(f"{key}: device does not fit: {arith}; use {key.split('.')[-1]}: host or auto")
    return device, f"on the device ({arith})"


def adam_state_device(pref: str, device: str, budget: Budget, card_bytes: int | None) -> tuple[str, str]:
    """(where Adam's moments live: the device string or "cpu", why) for
    es.adam_state `pref`, beside the weights `budget` counts on the card."""
    return _place("es.adam_state", pref, device, budget, card_bytes)


def master_device(pref: str, device: str, budget: Budget, card_bytes: int | None) -> tuple[str, str]:
    """(where the fp32 master lives: the device string or "cpu", why) for
    es.master `pref`: on the card when master + working fit.  Adam's moments
    are placed after, with the master's place known."""
    return _place("es.master", pref, device, Budget(budget.n_params, budget.working_bytes, adam=False),
                  card_bytes)
