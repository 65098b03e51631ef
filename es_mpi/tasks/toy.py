"""A toy task for tiny random models: ES must learn to write the letter "a".

reward  = fraction of the completion's characters that are "a" (0 if empty);
correct = reward >= 0.25.
A random model emits a haphazard mix of tokens; raising the logits of
"a"-rich tokens is a direction ES finds within a few generations (measured on
builtin:tiny: held-out reward 0.009 -> 0.097 in 12 generations of N=16).
"""
from __future__ import annotations

import random

from ._common import task_options
from .base import Example, Score, Task, TaskDataError

_WORDS = ["count", "the", "vowels", "sum", "of", "number", "next", "seven", "blue", "sky", "think"]


class ToyTask(Task):
    name = "toy"
    chat_template = False
    record_fields = ()

    def __init__(self, options=None):
        super().__init__(options)
        self.opts = task_options(self)
        self.seed = self.opts.get("seed", 0)
        self.sizes = {"train": self.opts.get("train_size", 64), "heldout": self.opts.get("heldout_size", 32)}

    def examples(self, split):
        if split not in self.sizes:
            raise TaskDataError(f"unknown split {split!r}")
        rng = random.Random(f"toy-{split}-{self.seed}")
        return [Example(f"{split}-{i}", " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6))))
                for i in range(self.sizes[split])]

    def score(self, example, completion):
        r = completion.count("a") / len(completion) if completion else 0.0
        return Score(r, {"a_fraction": r}, r >= 0.25)
