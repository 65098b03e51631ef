"""The fp32 master of theta and the working weights the model decodes with.

Exact restore: the working weights are always *materialised* from the master,
`working = cast(master + sigma * sign * eps)`, never perturbed and
un-perturbed in place (which drifts by an ulp in ~7 % of bf16 weights per
cycle in the reference code).  `restore()` is `working = cast(master)`.

Cost per member: one pass over P parameters that draws P normals and writes P
working values; one fp32 scratch buffer the size of the largest tensor.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import RunAborted
from .es import UpdatePlan
from .model import weights_digest
from .noise import MemberNoise, NoiseSource
from .optim import SGD


class Weights:
    def __init__(self, model: torch.nn.Module, working_dtype: torch.dtype):
        # named_parameters() skips tied duplicates (lm_head tied to the
        # embedding is perturbed once, as the model sees it).
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.master = [p.detach().to(torch.float32).clone().contiguous() for _, p in named]
        model.to(working_dtype)
        self.working = [p for _, p in model.named_parameters()]
        self.device = self.master[0].device
        biggest = max(t.numel() for t in self.master)
        self._eps = torch.empty(biggest, dtype=torch.float32, device=self.device)
        self._tmp = torch.empty(biggest, dtype=torch.float32, device=self.device)
        self.n_params = sum(t.numel() for t in self.master)
        # digest cache: hashing the master costs ~1 s per 500 MB and the end of a
        # run asks for it three times (agreement, checkpoint, final line)
        self.version = 0
        self._digest: tuple[int, str] | None = None
        self.restore()

    # -- members -----------------------------------------------------------
    def _scratch(self, buf: torch.Tensor, shape) -> torch.Tensor:
        return buf[: int(np.prod(shape))].view(shape)

    @torch.no_grad()
    def materialise(self, noise: NoiseSource, generation: int, mn: MemberNoise, sigma: float) -> None:
        """working_i = cast(master_i + sigma * sign * eps_i), tensor by tensor."""
        for i, (m, w) in enumerate(zip(self.master, self.working)):
            eps = noise.tensor(generation, mn.index, i, m.shape, out=self._scratch(self._eps, m.shape))
            if w.dtype == torch.float32:
                torch.add(m, eps, alpha=sigma * mn.sign, out=w.data)
            else:
                tmp = self._scratch(self._tmp, m.shape)
                torch.add(m, eps, alpha=sigma * mn.sign, out=tmp)
                w.data.copy_(tmp)

    @torch.no_grad()
    def restore(self) -> None:
        for m, w in zip(self.master, self.working):
            w.data.copy_(m)

    # -- update ------------------------------------------------------------
    @torch.no_grad()
    def apply_update(self, noise: NoiseSource, generation: int, plan: UpdatePlan, opt: SGD,
                     alpha: float) -> float:
        """theta += step(sum_k c_k eps_k), per tensor, members in draw order on
        every rank (so the fp32 sums are bitwise identical everywhere).
        Returns the update's L2 norm.  Cost: K x P normals per call.
        A non-finite result is refused before it is written to that tensor;
        the run must then stop (earlier tensors may already hold the step)."""
        if plan.empty:
            return 0.0
        opt.begin()
        coeffs = [float(c) for c in plan.coeffs_K]
        sq = 0.0
        for i, m in enumerate(self.master):
            acc = self._scratch(self._tmp, m.shape)
            acc.zero_()
            eps = self._scratch(self._eps, m.shape)
            for k, c in enumerate(coeffs):
                if c == 0.0:
                    continue
                noise.tensor(generation, k, i, m.shape, out=eps)
                acc.add_(eps, alpha=c)
            delta = opt.step_tensor(i, m, acc, plan.scale, plan.grad_scale, alpha)
            if not bool(torch.isfinite(delta).all()):
                raise RunAborted(f"generation {generation}: non-finite update in tensor {self.names[i]}; "
                                 "refused (the last checkpoint is intact)")
            sq += float(torch.linalg.vector_norm(delta)) ** 2
            m.add_(delta)
            self.version += 1
        self.restore()
        return sq ** 0.5

    # -- identity ----------------------------------------------------------
    def digest(self) -> str:
        """SHA-256 of the master (see model.weights_digest); callers that change
        the master outside apply_update/load_state_dict must bump `version`."""
        if self._digest is None or self._digest[0] != self.version:
            self._digest = (self.version, weights_digest(self.master))
        return self._digest[1]

    def state_dict(self) -> dict[str, np.ndarray]:
        return {n: m.cpu().numpy() for n, m in zip(self.names, self.master)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for n, m in zip(self.names, self.master):
            if n not in state:
                raise KeyError(n)
            src = torch.from_numpy(np.asarray(state[n]))
            if tuple(src.shape) != tuple(m.shape):
                raise ValueError(f"{n}: shape {tuple(src.shape)} != {tuple(m.shape)}")
            m.copy_(src)
        self.version += 1
        self.restore()
