"""Low-rank ES noise (EGGROLL, Sarkar et al. 2025) on a shared working model.

A perturbed matrix W (m x n) gets E = A B^T / sqrt(r), A (m x r) and B (n x r)
fp32 from the seed tree (noise.NoiseSource.factor: run seed, generation, draw,
tensor, A|B).  No member's weights are ever built: every member shares the
working copy of the master, and a forward hook on each perturbed module adds
the member's term to the rows it owns,

    x (W + s sigma E)^T = x W^T + (s sigma / sqrt(r)) (x B) A^T      (s = +-1),

so rows of any number of members go through one forward (their batch is a
tile of the work grid), and exact restore holds by construction: the base is
never written during evaluation.  The small products run in the working
dtype (the base output is in it anyway); the perturbation term of a bf16 row
is ~2 % of its output, well above bf16's 0.4 % rounding.

What is perturbed (`es.lowrank_scope`):
  layers  every 2-D weight of the decoder layers (attention and MLP
          projections); embeddings, LM head, norms and biases stay frozen, as
          in EGGROLL.
  all     also the token embedding and the LM head (low-rank; a tied head
          shares the embedding's A and B), and every 1-D parameter (norm
          weights, biases) with full-rank noise per row.

Update: theta += scale * sum_k c_k A_k B_k^T / sqrt(r) per matrix, summed in
fp32 in draw order as rank-1 updates over row blocks of about noise.BLOCK
elements and added to the master; never a K x m x n tensor.  Cost: K (m + n) r
normals and K r m n multiply-adds per matrix (in cache), against K m n normals
for full-rank noise.  1-D tensors (scope `all`) take the full-rank
block update.  Frozen tensors are never touched.
"""
from __future__ import annotations

import math

import torch

from .noise import BLOCK, NoiseSource, member_noise

LOWRANK, FULL, FROZEN = "lowrank", "full", "frozen"


def _is_rms_norm(module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def plan_sites(model, scope: str) -> tuple[list[str], list[tuple[torch.nn.Module, int, str]]]:
    """(kind per parameter in named_parameters() order, hook sites (module,
    parameter index, how)) for `scope`.  Raises ValueError for a module whose
    parameters `all` cannot perturb row by row."""
    index = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    kinds = [FROZEN] * len(index)
    sites: list[tuple[torch.nn.Module, int, str]] = []
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    for name, mod in model.named_modules():
        in_layers = ".layers." in f".{name}."
        if isinstance(mod, torch.nn.Linear) and (in_layers or (scope == "all" and mod is head)):
            i = index[id(mod.weight)]
            kinds[i] = LOWRANK
            sites.append((mod, i, "linear"))
            if mod.bias is not None and scope == "all":
                kinds[index[id(mod.bias)]] = FULL
                sites.append((mod, index[id(mod.bias)], "bias"))
        elif scope == "all" and mod is emb:
            i = index[id(mod.weight)]
            kinds[i] = LOWRANK
            sites.append((mod, i, "embedding"))
        elif scope == "all" and _is_rms_norm(mod):
            i = index[id(mod.weight)]
            kinds[i] = FULL
            sites.append((mod, i, "norm"))
        elif scope == "all" and list(mod.parameters(recurse=False)):
            raise ValueError(f"es.lowrank_scope: all cannot perturb {name} ({type(mod).__name__}) row by row; "
                             "use lowrank_scope: layers or es.noise: full")
    return kinds, sites


class _Rows:
    """The decoder's row listener for one tile: maps batch slots to members."""

    def __init__(self, owner: "LowRank", member_of_row: torch.Tensor):
        self.owner, self.member_of_row = owner, member_of_row
        self.groups = member_of_row.tolist()     # rows of one member share weights (the shared prefix)

    def set(self, row_ids: torch.Tensor) -> None:
        self.owner.row_member = self.member_of_row[row_ids.to(self.member_of_row.device)]


class LowRank:
    """The perturbation of one generation: factors for this rank's members,
    hooks that add them, and the update."""

    kind = "lowrank"

    def __init__(self, model, weights, noise: NoiseSource, es):
        self.model, self.weights, self.noise = model, weights, noise
        self.sigma, self.rank, self.antithetic = es.sigma, es.rank, es.antithetic
        self.kinds, self.sites = plan_sites(model, es.lowrank_scope)
        self.row_member: torch.Tensor | None = None   # local member index per batch slot, while armed
        self._factors: dict[int, tuple[torch.Tensor, ...]] = {}
        self._local: dict[int, int] = {}
        self._hooks = [mod.register_forward_hook(self._hook(i, how)) for mod, i, how in self.sites]

    @property
    def n_perturbed(self) -> int:
        return sum(self.weights.master[i].numel() for i, k in enumerate(self.kinds) if k != FROZEN)

    # -- evaluation ------------------------------------------------------------
    @torch.no_grad()
    def begin(self, generation: int, members: list[int]) -> None:
        """Draw the factors of `members` (this rank's) in the working dtype:
        per lowrank tensor A (k, m, r) and B (k, n, r), per 1-D tensor eps (k, d),
        and the per-member signed scales."""
        self._local = {m: j for j, m in enumerate(members)}
        mns = [member_noise(m, self.antithetic) for m in members]
        dev = self.weights.device
        signs = torch.tensor([mn.sign for mn in mns], dtype=torch.float32, device=dev)
        self._factors = {}
        for i, kind in enumerate(self.kinds):
            if kind == FROZEN:
                continue
            w = self.weights.working[i]
            if kind == LOWRANK:
                m_, n_ = w.shape
                a = torch.stack([self.noise.factor(generation, mn.index, i, 0, m_, self.rank) for mn in mns])
                b = torch.stack([self.noise.factor(generation, mn.index, i, 1, n_, self.rank) for mn in mns])
                scale = (signs * (self.sigma / math.sqrt(self.rank))).to(w.dtype)
                # B of all local members side by side, (n, k r): x B for every member is one GEMM
                b_cat = b.permute(1, 0, 2).reshape(n_, -1).to(w.dtype).contiguous()
                self._factors[i] = (a.to(w.dtype), b.to(w.dtype), scale, b_cat)
            else:
                eps = torch.stack([self.noise.tensor(generation, mn.index, i, w.shape).view(-1) for mn in mns])
                self._factors[i] = (eps.to(w.dtype), (signs * self.sigma).to(w.dtype))

    def tile(self, members_of_rows: list[int]) -> _Rows:
        """A listener for a tile whose rows belong to `members_of_rows` (global
        member ids); the decoder keeps it told which rows are in the batch."""
        local = torch.tensor([self._local[m] for m in members_of_rows], dtype=torch.long,
                             device=self.weights.device)
        return _Rows(self, local)

    def end(self) -> None:
        self.row_member = None
        self._factors = {}

    def _hook(self, i: int, how: str):
        def add_outer(out, left, right):
            """out (n, L, m) += sum_j left[..., j] (n, L) x right[:, :, j] (n, m),
            one broadcast multiply-add per j: a bf16 bmm with inner dimension 1
            ran 100x slower here (132 ms for 128 x 98 x 1536)."""
            o3 = out.view(left.shape[0], -1, out.shape[-1])
            for j in range(self.rank):
                o3.addcmul_(left[..., j:j + 1], right[:, None, :, j])
            return out

        def linear(mod, args, out):
            # x B for every local member in one GEMM with k r columns (~1 % of
            # the layer's own), then each row keeps its member's r columns: a
            # per-row bmm of (1 x n) (n x r) cost 0.2 ms per call on decode steps
            a, _, scale, b_cat = self._factors[i]
            rm = self.row_member
            n = rm.numel()
            x = args[0].reshape(n, -1, args[0].shape[-1])
            xb_all = (x @ b_cat).view(n, x.shape[1], -1, self.rank)                   # (n, L, k, r)
            xb = xb_all[torch.arange(n, device=rm.device), :, rm]                      # (n, L, r)
            xb.mul_(scale[rm].view(-1, 1, 1))
            return add_outer(out, xb, a[rm])                                           # + (n, L, m)

        def embedding(mod, args, out):
            a, b, scale, _ = self._factors[i]
            rm = self.row_member
            ar = a[rm[:, None], args[0]]                                               # (n, L, r)
            ar.mul_(scale[rm].view(-1, 1, 1))
            return add_outer(out, ar, b[rm])                                           # + (n, L, n_emb)

        def bias(mod, args, out):
            eps, scale = self._factors[i]
            rm = self.row_member
            return out.add_((eps[rm] * scale[rm, None]).view(rm.numel(), *([1] * (out.dim() - 2)), -1))

        def norm(mod, args, out):
            # RMSNorm: out = w * normed(x); the row's (w + s sigma eps) adds s sigma eps * normed(x),
            # normed recomputed exactly as the Llama/Qwen2 module computes it
            eps, scale = self._factors[i]
            rm = self.row_member
            x = args[0]
            h = x.to(torch.float32)
            h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)).to(x.dtype)
            d = (eps[rm] * scale[rm, None]).view(rm.numel(), *([1] * (out.dim() - 2)), -1)
            return out.add_(d * h)

        fn = {"linear": linear, "embedding": embedding, "bias": bias, "norm": norm}[how]

        def hook(mod, args, out):
            if self.row_member is None:           # not evaluating members: the base model
                return None
            return fn(mod, args, out)
        return hook

    # -- update ----------------------------------------------------------------
    def lowrank_blocks(self, noise: NoiseSource, generation: int, i: int, coeffs: list[float]):
        """(start, stop, rows of sum_k c_k A_k B_k^T / sqrt(r)) for matrix i, in
        row blocks of about BLOCK elements (one block of fp32 scratch).

        Summed as K r rank-1 updates in draw order, acc += (c_k / sqrt(r))
        a_kj b_kj^T, rather than as one GEMM with inner dimension K r: each
        element is then a fixed sequence of fp32 adds, the same bits whatever
        the block size, thread count or BLAS kernel (measured: a GEMM's result
        changed with the number of rows per block).  Cost: K r passes over the
        block in cache, and K (m + n) r normals: no m x n noise is drawn."""
        m_, n_ = self.weights.shapes[i]
        ks = [k for k, c in enumerate(coeffs) if c != 0.0]
        a = [noise.factor(generation, k, i, 0, m_, self.rank).mul_(coeffs[k] / math.sqrt(self.rank)) for k in ks]
        b = [noise.factor(generation, k, i, 1, n_, self.rank) for k in ks]
        rows = max(1, min(m_, BLOCK // n_))
        acc_buf = torch.empty(rows, n_, dtype=torch.float32, device=self.weights.device)
        for r0 in range(0, m_, rows):
            r1 = min(m_, r0 + rows)
            acc = acc_buf[: r1 - r0].zero_()
            for ak, bk in zip(a, b):
                for j in range(self.rank):
                    acc.addr_(ak[r0:r1, j], bk[:, j])
            yield r0 * n_, r1 * n_, acc.view(-1)

    def sources(self) -> list:
        w = self.weights
        return [w.full_blocks if k == FULL else self.lowrank_blocks if k == LOWRANK else None for k in self.kinds]

    def apply_update(self, generation: int, plan, opt, alpha: float) -> float:
        return self.weights.apply_update(self.noise, generation, plan, opt, alpha, self.sources())

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
