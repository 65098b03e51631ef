"""The fp32 master of theta and the working weights the model decodes with.

Exact restore: the working weights are always *materialised* from the master,
`working = cast(master + sigma * sign * eps)`, never perturbed and
un-perturbed in place (which drifts by an ulp in ~7 % of bf16 weights per
cycle in the reference code).  `restore()` is `working = cast(master)`.

Both passes work one noise block (noise.BLOCK elements) at a time.
Cost per member: one pass over P parameters that draws P normals and writes P
working values.  Memory: two fp32 scratch buffers of one block (32 MB), not of
the largest tensor; SmolLM2's tied embedding would make that 2 x 113 MB.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import RunAborted
from .es import UpdatePlan
from ..model import weights_digest, weights_fingerprint
from .noise import BLOCK, MemberNoise, NoiseSource, blocks
from .optim import SGD


class Weights:
    """`model` is the working model.  With `master` (fp32 tensors in
    named_parameters() order, e.g. from model.load_model) the model must
    already be in its working dtype and equal cast(master) bit for bit; without
    it the master is an fp32 copy of the model's parameters and, if
    `working_dtype` is given, the parameters (not the buffers) are cast to it."""

    def __init__(self, model: torch.nn.Module, working_dtype: torch.dtype | None = None,
                 master: list[torch.Tensor] | None = None):
        # named_parameters() skips tied duplicates (lm_head tied to the
        # embedding is perturbed once, as the model sees it).
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        if master is None:
            master = [p.detach().to(torch.float32).clone() for _, p in named]
            if working_dtype is not None:
                for _, p in named:
                    p.data = p.data.to(working_dtype)
        elif len(master) != len(named) or any(tuple(m.shape) != s for m, s in zip(master, self.shapes)):
            raise ValueError("master tensors do not match the model's parameters")
        self.master = [m.contiguous() for m in master]
        self.working = [p for _, p in model.named_parameters()]
        if not all(w.is_contiguous() for w in self.working):
            raise ValueError("model parameters must be contiguous (block-wise noise addresses them flat)")
        self.device = self.master[0].device
        self._blocks = [blocks(m.numel()) for m in self.master]
        scratch = min(BLOCK, max(t.numel() for t in self.master))
        self._eps = torch.empty(scratch, dtype=torch.float32, device=self.device)
        self._tmp = torch.empty(scratch, dtype=torch.float32, device=self.device)
        self.n_params = sum(t.numel() for t in self.master)
        # digest cache: hashing the master costs ~1 s per 500 MB (plus, on a GPU,
        # a host copy of it) and rank 0 asks for it twice at the end of a run
        # (checkpoint, final line); the cross-rank check uses fingerprint()
        self.version = 0
        self._digest: tuple[int, str] | None = None
        if any(not torch.equal(w, m.to(w.dtype)) for w, m in zip(self.working, self.master)):
            raise ValueError("working weights are not cast(master)")

    # -- members -----------------------------------------------------------
    @torch.no_grad()
    def draw(self, noise: NoiseSource, generation: int, index: int) -> None:
        """Draw one member's noise into scratch and drop it (bench: the cost of
        the noise alone)."""
        for i, bl in enumerate(self._blocks):
            for b, s, e in bl:
                noise.block(generation, index, i, b, self._eps[: e - s])

    @torch.no_grad()
    def materialise(self, noise: NoiseSource, generation: int, mn: MemberNoise, sigma: float) -> None:
        """working_i = cast(master_i + sigma * sign * eps_i), block by block."""
        alpha = sigma * mn.sign
        for i, (m, w) in enumerate(zip(self.master, self.working)):
            mf, wf = m.view(-1), w.data.view(-1)
            for b, s, e in self._blocks[i]:
                eps = noise.block(generation, mn.index, i, b, self._eps[: e - s])
                if w.dtype == torch.float32:
                    torch.add(mf[s:e], eps, alpha=alpha, out=wf[s:e])
                else:
                    tmp = self._tmp[: e - s]
                    torch.add(mf[s:e], eps, alpha=alpha, out=tmp)
                    wf[s:e].copy_(tmp)

    @torch.no_grad()
    def restore(self) -> None:
        for m, w in zip(self.master, self.working):
            w.data.copy_(m)

    # -- update ------------------------------------------------------------
    def full_blocks(self, noise: NoiseSource, generation: int, i: int, coeffs: list[float]):
        """(start, stop, sum_k c_k eps_k over that block) for tensor i, block by
        block, draws in order: each element's fp32 sum is the same whatever the
        block size.  Cost: K normals per element."""
        for b, s, e in self._blocks[i]:
            acc, eps = self._tmp[: e - s], self._eps[: e - s]
            acc.zero_()
            for k, c in enumerate(coeffs):
                if c == 0.0:
                    continue
                noise.block(generation, k, i, b, eps)
                acc.add_(eps, alpha=c)
            yield s, e, acc

    @torch.no_grad()
    def apply_update(self, noise: NoiseSource, generation: int, plan: UpdatePlan, opt: SGD,
                     alpha: float, sources=None) -> float:
        """theta += step(sum_k c_k eps_k), tensor by tensor, block by block,
        draws in order on every rank, so the fp32 sums are bitwise identical
        everywhere.  `sources[i]` (default: full-rank noise for every tensor)
        yields tensor i's (start, stop, accumulated sum) blocks, or is None for
        a frozen tensor.  Returns the update's L2 norm.  A non-finite result is
        refused: from the first non-finite block on, nothing more is written
        (earlier blocks may already hold the step), and the run must stop.

        No host sync per block: the finite flag and the squared norm stay on
        the device (a 7B update has ~1,800 blocks; two syncs each stalled the
        GPU 3,600 times), and are read once at the end.  A block is written as
        `where(all blocks so far finite, step, 0)`: one more pass over the
        block, which costs far less than its K normal draws."""
        if plan.empty:
            return 0.0
        opt.begin()
        coeffs = [float(c) for c in plan.coeffs_K]
        dev = self.device
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        ok = torch.ones((), dtype=torch.bool, device=dev)              # every block so far finite
        ok_i = torch.ones(len(self.master), dtype=torch.bool, device=dev)  # per tensor, for the message
        self.version += 1
        for i, m in enumerate(self.master):
            source = self.full_blocks if sources is None else sources[i]
            if source is None:
                continue
            mf = m.view(-1)
            for s, e, acc in source(noise, generation, i, coeffs):
                delta = opt.step_tensor(i, mf[s:e], acc, plan.scale, plan.grad_scale, alpha, part=slice(s, e))
                fin = torch.isfinite(delta).all()
                ok_i[i] &= fin
                ok &= fin
                sq += torch.linalg.vector_norm(delta).double().square()
                mf[s:e].add_(torch.where(ok, delta, 0.0))
        host = torch.cat([sq.view(1), ok_i.double()]).cpu()            # the update's one host sync
        flags = host[1:] > 0
        if not bool(flags.all()):
            bad = self.names[int(torch.nonzero(~flags)[0, 0])]
            self.restore()
            raise RunAborted(f"generation {generation}: non-finite update in tensor {bad}; "
                             "refused (the last checkpoint is intact)")
        self.restore()
        return float(host[0]) ** 0.5

    # -- identity ----------------------------------------------------------
    def digest(self) -> str:
        """SHA-256 of the master (see model.weights_digest), for what is written
        down (checkpoints, the `final-digest:` line): rank 0's business, since
        it copies the whole master to the host.  Callers that change the master
        outside apply_update/load_state_dict must bump `version`."""
        if self._digest is None or self._digest[0] != self.version:
            self._digest = (self.version, weights_digest(self.master))
        return self._digest[1]

    def fingerprint(self) -> int:
        """The exact integer fingerprint of the master computed on its device
        (model.weights_fingerprint), for the cross-rank agreement check.  Not
        cached: the check is there to catch a master that changed unnoticed."""
        return weights_fingerprint(self.master)

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
