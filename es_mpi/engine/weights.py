"""The fp32 master of theta and the working weights the model decodes with.

Exact restore: the working weights are always *materialised* from the master,
`working = cast(master + sigma * sign * eps)`, never perturbed and
un-perturbed in place (which drifts by an ulp in ~7 % of bf16 weights per
cycle in the reference code).  `restore()` is `working = cast(master)`.

Both passes work one noise block (noise.BLOCK elements) at a time.
Cost per member: one pass over P parameters that draws P normals and writes P
working values.  Memory: two fp32 scratch buffers of one block (32 MB), not of
the largest tensor; SmolLM2's tied embedding would make that 2 x 113 MB.

Where things live:
* the working weights are the HF model's parameters (backend hf), or a vLLM
  engine's own copy (backend vllm): the model here is then a meta-device
  skeleton and members leave as `member_tensors()`, one tensor at a time;
* the master is on the compute device, or in pinned host memory (`streamed`:
  es.master host/auto), when each block is copied to a device scratch before
  it is used and, in the update, back.  The arithmetic is the same on the same
  device, so the bits are the same: only the copies differ (4 P bytes up per
  member, 8 P per update).
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
    `working_dtype` is given, the parameters (not the buffers) are cast to it.

    A model on the meta device (model.skeleton) means an engine holds the
    working weights: `materialise` is refused, `restore` does nothing, members
    go out through `member_tensors`.  `device` is where noise is drawn and
    blocks are computed (default: the master's); a master elsewhere (host)
    is streamed through it, as is any master with `stream_master=True` (tests
    take the streamed path on the CPU that way)."""

    def __init__(self, model: torch.nn.Module, working_dtype: torch.dtype | None = None,
                 master: list[torch.Tensor] | None = None, device: str | torch.device | None = None,
                 stream_master: bool | None = None):
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
        self.engine_holds_working = any(w.is_meta for w in self.working)
        if not all(w.is_contiguous() for w in self.working):
            raise ValueError("model parameters must be contiguous (block-wise noise addresses them flat)")
        self.device = torch.device(device) if device is not None else self.master[0].device
        self.streamed = self.master[0].device != self.device if stream_master is None else stream_master
        self._blocks = [blocks(m.numel()) for m in self.master]
        scratch = min(BLOCK, max(t.numel() for t in self.master))
        self._eps = torch.empty(scratch, dtype=torch.float32, device=self.device)
        self._tmp = torch.empty(scratch, dtype=torch.float32, device=self.device)
        # a streamed master's block, on the device (one more block of scratch)
        self._up = torch.empty(scratch, dtype=torch.float32, device=self.device) if self.streamed else None
        self.n_params = sum(t.numel() for t in self.master)
        # digest cache: hashing the master costs ~1 s per 500 MB (plus, on a GPU,
        # a host copy of it) and rank 0 asks for it twice at the end of a run
        # (checkpoint, final line); the cross-rank check uses fingerprint()
        self.version = 0
        self._digest: tuple[int, str] | None = None
        if not self.engine_holds_working and any(not torch.equal(w, m.to(w.device, w.dtype))
                                                 for w, m in zip(self.working, self.master)):
            raise ValueError("working weights are not cast(master)")

    def _master_block(self, mf: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Elements s:e of a flat master tensor where the block is computed: a
        view when the master is there, else a copy in the upload scratch (in
        stream order: pinned memory, no host sync)."""
        if not self.streamed:
            return mf[s:e]
        up = self._up[: e - s]
        up.copy_(mf[s:e], non_blocking=True)
        return up

    # -- members -----------------------------------------------------------
    @torch.no_grad()
    def draw(self, noise: NoiseSource, generation: int, index: int) -> None:
        """Draw one member's noise into scratch and drop it (bench: the cost of
        the noise alone)."""
        for i, bl in enumerate(self._blocks):
            for b, s, e in bl:
                noise.block(generation, index, i, b, self._eps[: e - s])

    def _member_into(self, i: int, out: torch.Tensor, noise: NoiseSource, generation: int, mn: MemberNoise,
                     sigma: float) -> None:
        """out (tensor i's flat working values) = cast(master_i + sigma * sign * eps_i), block by block."""
        alpha = sigma * mn.sign
        mf = self.master[i].view(-1)
        for b, s, e in self._blocks[i]:
            eps = noise.block(generation, mn.index, i, b, self._eps[: e - s])
            m = self._master_block(mf, s, e)
            if out.dtype == torch.float32:
                torch.add(m, eps, alpha=alpha, out=out[s:e])
            else:
                tmp = self._tmp[: e - s]
                torch.add(m, eps, alpha=alpha, out=tmp)
                out[s:e].copy_(tmp)

    @torch.no_grad()
    def materialise(self, noise: NoiseSource, generation: int, mn: MemberNoise, sigma: float) -> None:
        """working_i = cast(master_i + sigma * sign * eps_i), block by block."""
        if self.engine_holds_working:
            raise ValueError("the working weights live in the decoding engine: use member_tensors()")
        for i, w in enumerate(self.working):
            self._member_into(i, w.data.view(-1), noise, generation, mn, sigma)

    @torch.no_grad()
    def member_tensors(self, noise: NoiseSource, generation: int, mn: MemberNoise, sigma: float,
                       dtype: torch.dtype):
        """(name, cast(master + sigma * sign * eps) in `dtype` on the device), a
        fresh tensor per parameter, one at a time: what a vLLM engine loads
        for a member, with no working copy of the whole model beside it (the
        peak is the largest tensor, 1.1 GB for Qwen2.5-7B's embedding in bf16).
        The same blocks and arithmetic as materialise: the same bits."""
        for i, m in enumerate(self.master):
            out = torch.empty(m.shape, dtype=dtype, device=self.device)
            self._member_into(i, out.view(-1), noise, generation, mn, sigma)
            yield self.names[i], out

    @torch.no_grad()
    def base_tensors(self, dtype: torch.dtype):
        """(name, a fresh cast(master) in `dtype` on the device), one at a time."""
        for n, m in zip(self.names, self.master):
            yield n, m.to(self.device, dtype, copy=True)

    @torch.no_grad()
    def restore(self) -> None:
        if self.engine_holds_working:   # the engine takes cast(master) when it next decodes the base
            return
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
                theta = self._master_block(mf, s, e)
                delta = opt.step_tensor(i, theta, acc, plan.scale, plan.grad_scale, alpha, part=slice(s, e))
                fin = torch.isfinite(delta).all()
                ok_i[i] &= fin
                ok &= fin
                sq += torch.linalg.vector_norm(delta).double().square()
                theta.add_(torch.where(ok, delta, 0.0))
                if self.streamed:   # back home, in stream order (the sync below waits for it)
                    mf[s:e].copy_(theta, non_blocking=True)
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
        return weights_fingerprint(self.master, self.device)

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
