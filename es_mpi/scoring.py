"""Scoring completions with a task's reward, guarded: a reward that raises,
returns NaN/inf or runs past its time limit marks the result invalid instead
of ending the run.  Also the held-out evaluation shared by `train` and `eval`.
"""
from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .decode import format_prompts
from .tasks import Example, Task

OK, RAISED, NONFINITE, TIMEOUT = 0, 1, 2, 3
STATUS_TEXT = {OK: "ok", RAISED: "reward raised", NONFINITE: "non-finite reward", TIMEOUT: "reward timed out"}


@dataclass(frozen=True)
class Scored:
    reward: float
    status: int
    correct: bool
    components: Mapping[str, float] = field(default_factory=dict)


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def score_one(task: Task, example: Example, completion: str, timeout: float) -> Scored:
    """One reward call under a wall-clock limit (SIGALRM, main thread only;
    elsewhere the call runs unguarded).  Python-level loops are interrupted;
    a single C call that never returns is not, which is why the built-in
    rewards bound their own work (e.g. Countdown's power-tower guard)."""
    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    old = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    try:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        s = task.score(example, completion)
        r = float(s.reward)
    except _Timeout:
        return Scored(math.nan, TIMEOUT, False)
    except Exception:
        return Scored(math.nan, RAISED, False)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    if not math.isfinite(r):
        return Scored(math.nan, NONFINITE, False)
    return Scored(r, OK, bool(s.correct), {k: float(v) for k, v in dict(s.components).items()})


def member_scores(rewards_P: np.ndarray, status_P: np.ndarray, correct_P: np.ndarray) -> tuple[float, int, float]:
    """A member's (reward, status, correct fraction) from its P prompts' rows,
    in prompt order: the mean reward, or invalid (NaN, the first bad status)
    if any row failed.  Every rank calls it on the same gathered rows."""
    status_P = np.asarray(status_P).astype(np.int64)
    correct = float(np.mean(correct_P)) if len(correct_P) else 0.0
    bad = status_P[status_P != OK]
    if bad.size or not len(rewards_P):
        return math.nan, int(bad[0]) if bad.size else RAISED, correct
    return float(np.mean(np.asarray(rewards_P, dtype=np.float64))), OK, correct


def eval_tile_rows(cfg) -> int:
    """Prompts per decode batch in evaluation: generation.batch_size, else a
    generation's prompt count; fixed by the config, never by the rank count,
    so held-out results are the same on any number of ranks."""
    return cfg.generation.batch_size or cfg.es.prompts_per_generation


def generate_and_score(backend, tokenizer, task: Task, examples: Sequence[Example], cfg, comm, chat: bool):
    """Decode and score `examples` on all ranks: fixed tiles of eval_tile_rows
    prompts, balanced contiguous runs of tiles per rank, results gathered in
    example order.  `backend` (decode.backend) must hold the weights to
    evaluate (backend.sync_base).
    Returns [(completion text, n_tokens, Scored)] on every rank."""
    from .engine.grid import balanced

    t = eval_tile_rows(cfg)
    starts = list(range(0, len(examples), t))
    mine = balanced(len(starts), comm.size, comm.rank)
    rows = []
    for s in (starts[i] for i in mine):
        part = examples[s:s + t]
        texts = format_prompts(tokenizer, [e.prompt for e in part], chat)
        comps = backend.decode(texts, cfg.generation.max_new_tokens, task.stop_strings)
        for e, c in zip(part, comps):
            sc = score_one(task, e, c.text, cfg.task.reward_timeout)
            rows.append([c.text, c.n_tokens, sc.reward, sc.status, sc.correct, dict(sc.components)])
    gathered = [r for part in comm.allgather_json(rows) for r in part]
    return [(text, n, Scored(rew, st, bool(cor), comp)) for text, n, rew, st, cor, comp in gathered]


def summarize(rewards: Sequence[float], correct: Sequence[bool]) -> dict:
    """Mean reward with a 95 % normal-approximation CI, and accuracy."""
    r = np.asarray([x for x in rewards if math.isfinite(x)], dtype=np.float64)
    n = len(rewards)
    mean = float(r.mean()) if r.size else math.nan
    ci = float(1.96 * r.std(ddof=1) / math.sqrt(r.size)) if r.size > 1 else math.nan
    return {"mean_reward": mean, "ci95": ci, "accuracy": float(np.mean(correct)) if n else math.nan,
            "n_prompts": n, "n_invalid": int(n - r.size)}
