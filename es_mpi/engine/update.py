"""Gathered rewards -> applied update: the one function that both the trainer
and `es-mpi replay` call, so a replay from the log is the training update by
construction, not by a copy that could drift from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .es import UpdatePlan, plan_update, shape_rewards
from ..scoring import OK


@dataclass(frozen=True)
class AppliedUpdate:
    valid_N: np.ndarray    # bool, members that entered the update
    shaped_N: np.ndarray   # float64 shaped scores z (0 for invalid members)
    plan: UpdatePlan
    norm: float            # L2 norm of the applied step (0 if none)


def apply_generation_update(perturbation, opt, es, generation: int, rewards_N: np.ndarray, status_N: np.ndarray,
                            tamper: Callable[[UpdatePlan], UpdatePlan] | None = None) -> AppliedUpdate:
    """Shape the gathered rewards of `generation`, plan the update and have
    `perturbation` (perturb.FullRank or lowrank.LowRank) apply it to its
    master with optimizer `opt`; `es` is the ESConfig.  `tamper` lets the
    trainer's fault injection alter the plan (tests only)."""
    valid = np.asarray(status_N) == OK
    z = shape_rewards(rewards_N, valid, es.shaping)
    plan = plan_update(z, valid, es.antithetic, es.alpha, es.sigma, es.step)
    if tamper is not None:
        plan = tamper(plan)
    norm = perturbation.apply_update(generation, plan, opt, es.alpha)
    return AppliedUpdate(valid, z, plan, norm)
