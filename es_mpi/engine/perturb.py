"""The two perturbation kinds behind one interface, as the trainer uses them:

  begin(generation, members)   before this rank's tiles (members it holds rows of)
  tile(members_of_rows)        before a tile: returns the decoder's row listener, or None
  end()                        after the last tile: the working weights are cast(master) again
  apply_update(generation, plan, opt, alpha) -> update norm

Full-rank noise (FullRank) materialises one member's weights at a time, so a
tile holds one member's rows; low-rank noise (lowrank.LowRank) perturbs rows
of any members in one batch through forward hooks.
"""
from __future__ import annotations

from .lowrank import LowRank
from .noise import NoiseSource, member_noise


class FullRank:
    kind = "full"

    def __init__(self, weights, noise: NoiseSource, es, backend=None):
        self.weights, self.noise = weights, noise
        self.backend = backend          # a vllm decode.backend takes each member's weights (None: hf)
        self.sigma, self.antithetic = es.sigma, es.antithetic
        self._gen, self._current = 0, None

    @property
    def n_perturbed(self) -> int:
        return self.weights.n_params

    def begin(self, generation: int, members: list[int]) -> None:
        self._gen, self._current = generation, None

    def tile(self, members_of_rows: list[int]):
        m = members_of_rows[0]
        if any(x != m for x in members_of_rows):
            raise ValueError("a full-rank tile holds one member's rows")
        if m != self._current:
            mn = member_noise(m, self.antithetic)
            if self.backend is None:
                self.weights.materialise(self.noise, self._gen, mn, self.sigma)
            else:   # the engine holds the working weights: the member goes straight in from the master
                self.backend.write_member(self.weights, self.noise, self._gen, mn, self.sigma)
            self._current = m
        return None

    def end(self) -> None:
        # a vllm backend's engine gets cast(master) from the fp32 master when it
        # next decodes the base (backend.sync_base), not here: the next
        # member's write would overwrite it anyway
        self.weights.restore()
        self._current = None

    def apply_update(self, generation: int, plan, opt, alpha: float) -> float:
        return self.weights.apply_update(self.noise, generation, plan, opt, alpha)

    def close(self) -> None:  # nothing installed on the model (LowRank removes its hooks)
        pass


def make_perturbation(es, model, weights, noise: NoiseSource, backend=None):
    """`backend` (decode.backend): on vllm, low-rank members are LoRA adapters
    (decode.vllm_lora.LoRAPerturbation: the same factors and update, no hooks
    used, the base written into the engine once per generation)."""
    if es.noise == "lowrank":
        lowrank = LowRank(model, weights, noise, es)
        if getattr(backend, "name", "hf") == "vllm":
            from ..decode.vllm_lora import LoRAPerturbation
            return LoRAPerturbation(lowrank, backend.llm, lambda: backend.sync_base(weights))
        return lowrank
    return FullRank(weights, noise, es, backend if getattr(backend, "name", "hf") == "vllm" else None)
