"""Two small generated tasks.

sequence    next term of an arithmetic sequence (step 1, 2, 5 or 10)
arithmetic  one-digit x two-digit multiplication

Scoring rule (both): the LAST number written in the completion is the answer.
A number is ASCII digits with an optional sign ('-' or U+2212, counted as a sign
only when not glued to a preceding digit or letter, so '3-5' reads as 3 and 5),
optional thousands commas ('1,234' is 1234; '12,34' is 12 and 34) and an optional
decimal part ('42.0' is 42; '42.5' is not an integer and scores 0; '42.' is 42).
Reward 1.0 if that number equals the target, else 0.0.
"""
from __future__ import annotations

import os
import random
import re
from typing import Any, Mapping

from ._common import task_options
from .base import Example, Score, Task, TaskDataError

# ---------------------------------------------------------------- answer extraction
_NUMBER = re.compile(r"(?:(?<![0-9A-Za-z])([-\u2212]))?(?<![0-9.])"
                     r"([0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.([0-9]+))?")
_MAX_DIGITS = 100    # no target here is that long; also keeps int() cheap


def last_integer(text: str) -> int | None:
    """The last number in `text` (see the module docstring), or None if there is none
    or it is not an integer."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    if last is None:
        return None
    sign, digits, frac = last.groups()
    digits = digits.replace(",", "")
    if len(digits) > _MAX_DIGITS or (frac and frac.strip("0")):
        return None
    value = int(digits)
    return -value if sign else value


def _score_integer(example: Example, completion: str) -> Score:
    got = last_integer(completion)
    try:
        ok = got is not None and got == int(example.fields["target"])
    except (TypeError, ValueError):
        ok = False
    r = 1.0 if ok else 0.0
    return Score(reward=r, components={"answer_reward": r}, correct=ok)


class _GeneratedTask(Task):
    """Shared machinery: a finite problem space split in two halves by a seeded
    shuffle, so train and held-out problems are disjoint for every seed and size."""
    chat_template = True
    record_fields = ("target",)
    default_sizes = {"train": 200, "heldout": 200}

    def __init__(self, options: Mapping[str, Any] | None = None):
        super().__init__(options)
        opts = task_options(self)
        if "data" in opts:
            raise TaskDataError(f"task.options.data: task {self.name} generates its problems "
                                "and takes no data file")
        self.seed = opts.get("seed", 0)
        self.sizes = {s: opts.get(f"{s}_size", n) for s, n in self.default_sizes.items()}
        self._cache: dict[str, list[Example]] = {}

    def problems(self) -> list[tuple]:
        raise NotImplementedError

    def make_example(self, problem: tuple, split: str, index: int) -> Example:
        raise NotImplementedError

    def examples(self, split: str) -> list[Example]:
        if split not in ("train", "heldout"):
            raise TaskDataError(f"split: expected 'train' or 'heldout', got {split!r}")
        if split not in self._cache:
            space = self.problems()
            random.Random(f"{self.name}:{self.seed}").shuffle(space)
            half = len(space) // 2
            pool = space[half:] if split == "train" else space[:half]
            n = self.sizes[split]
            if n > len(pool):
                raise TaskDataError(f"task.options.{split}_size: at most {len(pool)} for task "
                                    f"{self.name}, got {n}")
            self._cache[split] = [self.make_example(p, split, i) for i, p in enumerate(pool[:n])]
        return list(self._cache[split])

    def score(self, example: Example, completion: str) -> Score:
        return _score_integer(example, completion)


class SequenceTask(_GeneratedTask):
    """Next term of an arithmetic sequence: start 0..199, step 1, 2, 5 or 10, five
    terms shown (800 problems, 400 per split).  Options: the common ones only."""
    name = "sequence"

    def problems(self) -> list[tuple]:
        return [(start, step) for start in range(200) for step in (1, 2, 5, 10)]

    def make_example(self, problem: tuple, split: str, index: int) -> Example:
        start, step = problem
        terms = ", ".join(str(start + k * step) for k in range(5))
        prompt = (f"What is the next number in the sequence {terms}, ...? "
                  "End your reply with the number.")
        return Example(id=f"sequence-{split}-{index}", prompt=prompt,
                       fields={"target": start + 5 * step})


class MultiplicationTask(_GeneratedTask):
    """One-digit x two-digit multiplication, a in 2..9 and b in 10..99 (720
    problems, 360 per split).  Options: the common ones only."""
    name = "arithmetic"

    def problems(self) -> list[tuple]:
        return [(a, b) for a in range(2, 10) for b in range(10, 100)]

    def make_example(self, problem: tuple, split: str, index: int) -> Example:
        a, b = problem
        prompt = f"What is {a} * {b}? End your reply with the number."
        return Example(id=f"arithmetic-{split}-{index}", prompt=prompt, fields={"target": a * b})
