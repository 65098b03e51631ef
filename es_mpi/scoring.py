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

from .generation import decode, format_prompts
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


def score_member(scored: Sequence[Scored]) -> tuple[float, int, float]:
    """A member's (reward, status, correct fraction) from its prompts' scores:
    the mean reward, or invalid (NaN, first bad status) if any prompt failed."""
    bad = [s.status for s in scored if s.status != OK]
    correct = float(np.mean([s.correct for s in scored])) if scored else 0.0
    if bad or not scored:
        return math.nan, bad[0] if bad else RAISED, correct
    return float(np.mean([s.reward for s in scored])), OK, correct


def generate_and_score(model, tokenizer, task: Task, examples: Sequence[Example], max_new_tokens: int,
                       batch_size: int, timeout: float, chat: bool):
    texts = format_prompts(tokenizer, [e.prompt for e in examples], chat)
    comps = decode(model, tokenizer, texts, max_new_tokens, task.stop_strings, batch_size)
    return comps, [score_one(task, e, c.text, timeout) for e, c in zip(examples, comps)]


def summarize(rewards: Sequence[float], correct: Sequence[bool]) -> dict:
    """Mean reward with a 95 % normal-approximation CI, and accuracy."""
    r = np.asarray([x for x in rewards if math.isfinite(x)], dtype=np.float64)
    n = len(rewards)
    mean = float(r.mean()) if r.size else math.nan
    ci = float(1.96 * r.std(ddof=1) / math.sqrt(r.size)) if r.size > 1 else math.nan
    return {"mean_reward": mean, "ci95": ci, "accuracy": float(np.mean(correct)) if n else math.nan,
            "n_prompts": n, "n_invalid": int(n - r.size)}
