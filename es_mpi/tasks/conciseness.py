"""Conciseness (the ES paper's task): answer short questions briefly.

reward   = -|len(answer) - len(target)|  in characters (the paper's reward),
           minus `missing_penalty` when the answer lacks the target
contains = 1 if the target appears in the answer (case-insensitive), so that
           "learning to say nothing" is visible: reward rises but contains falls.
correct  = contains.

Option `missing_penalty` (characters, default 0 = the paper's reward): with
the paper's reward alone, ES on SmolLM2-135M learns to be brief partly by
dropping the answer (contains 0.52 -> 0.29 in 12 generations); a penalty
above any length gain (the demo's 150 characters: SmolLM2's untrained
answers average 101) makes "shorter and still right" the only way up.

Data: JSONL with `question` and `answer` (optional `id`).  Default: the
packaged es_mpi/data/conciseness.jsonl (97 factual questions); even rows train,
odd rows are held out.  With option `data`, the same split applies.
"""
from __future__ import annotations

from ._common import packaged, task_options
from .base import Example, Score, Task, TaskDataError, read_jsonl


class ConcisenessTask(Task):
    name = "conciseness"
    chat_template = True
    record_fields = ("answer",)

    def __init__(self, options=None):
        super().__init__(options)
        self.opts = task_options(self, {"missing_penalty": "number"})
        self.missing_penalty = self.opts.get("missing_penalty", 0.0)
        self.path = self.opts.get("data") or packaged("conciseness.jsonl")
        self._rows = None

    def _load(self):
        if self._rows is None:
            rows = read_jsonl(self.path, required=("question", "answer"))
            for i, r in enumerate(rows, 1):
                if not isinstance(r["question"], str) or not isinstance(r["answer"], str):
                    raise TaskDataError(f"{self.path}:{i}: question and answer must be strings")
            self._rows = rows
        return self._rows

    def examples(self, split):
        rows = self._load()
        if split == "train":
            part, size = rows[0::2], self.opts.get("train_size")
        elif split == "heldout":
            part, size = rows[1::2], self.opts.get("heldout_size")
        else:
            raise TaskDataError(f"unknown split {split!r}")
        part = part[: int(size)] if size else part
        return [Example(str(r.get("id", f"{split}-{i}")), r["question"], {"answer": r["answer"]})
                for i, r in enumerate(part)]

    def score(self, example, completion):
        target = str(example.fields["answer"])
        answer = completion.strip()
        contains = float(target.lower() in answer.lower())
        reward = -float(abs(len(answer) - len(target))) - (0.0 if contains else self.missing_penalty)
        return Score(reward, {"length": float(len(answer)), "contains": contains}, bool(contains))
