"""ES maths: fitness shaping and update coefficients (pure numpy, no MPI).

Shapes: N = population, K = distinct noise draws (N, or N/2 antithetic).
Every rank calls these on the same gathered rewards, so they must be
deterministic functions of their inputs (they are: fixed-order numpy float64).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZSCORE_EPS = 1e-8


def shape_rewards(rewards_N: np.ndarray, valid_N: np.ndarray, method: str) -> np.ndarray:
    """Shaped scores z_N; invalid members get 0 (they are left out, not zeroed in)."""
    r = np.asarray(rewards_N, dtype=np.float64)
    valid = np.asarray(valid_N, dtype=bool) & np.isfinite(r)
    z = np.zeros_like(r)
    rv = r[valid]
    if rv.size == 0:
        return z
    if method == "zscore":
        # The paper's (r - mean) / (std + 1e-8), population std.
        z[valid] = (rv - rv.mean()) / (rv.std() + ZSCORE_EPS)
    elif method == "centered_rank":
        # Salimans et al. 2017: ranks 0..n-1 scaled to [-0.5, 0.5].  Tied rewards
        # share their average rank, so equal rewards give a zero update instead of
        # one that depends on member order.
        n = rv.size
        order = np.argsort(rv, kind="stable")
        ranks = np.empty(n, dtype=np.float64)
        ranks[order] = np.arange(n, dtype=np.float64)
        for v in np.unique(rv):
            tie = rv == v
            ranks[tie] = ranks[tie].mean()
        z[valid] = ranks / (n - 1) - 0.5 if n > 1 else 0.0
    elif method == "raw":
        z[valid] = rv
    else:
        raise ValueError(f"unknown shaping {method!r}")
    return z


@dataclass(frozen=True)
class UpdatePlan:
    """What the update applies: coefficient c_k for each noise draw k and the
    scalar step scale, so that  theta += scale * sum_k c_k eps_k  (SGD)."""
    coeffs_K: np.ndarray       # float64, per distinct noise draw, in draw order
    n_valid: int
    scale: float               # alpha/N (paper) or alpha/(N sigma) (gradient), for SGD
    grad_scale: float          # 1/N or 1/(N sigma): turns sum c eps into the gradient estimate (Adam)

    @property
    def empty(self) -> bool:
        return self.n_valid == 0 or not np.any(self.coeffs_K)


def plan_update(z_N: np.ndarray, valid_N: np.ndarray, antithetic: bool, alpha: float, sigma: float,
                step: str) -> UpdatePlan:
    """Fold shaped scores into per-draw coefficients.  With antithetic pairs
    z_{2k} eps_k + z_{2k+1} (-eps_k) = (z_{2k} - z_{2k+1}) eps_k, so each draw is
    regenerated once, halving the update's noise cost."""
    z = np.asarray(z_N, dtype=np.float64)
    valid = np.asarray(valid_N, dtype=bool)
    n_valid = int(valid.sum())
    if antithetic:
        coeffs = z[0::2] - z[1::2]
    else:
        coeffs = z.copy()
    if not np.all(np.isfinite(coeffs)):
        raise FloatingPointError("non-finite shaped scores")
    if n_valid == 0:
        return UpdatePlan(np.zeros_like(coeffs), 0, 0.0, 0.0)
    grad_scale = 1.0 / n_valid if step == "paper" else 1.0 / (n_valid * sigma)
    return UpdatePlan(coeffs, n_valid, alpha * grad_scale, grad_scale)
