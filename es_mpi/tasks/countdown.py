"""Countdown (the ES paper's main task): combine the given numbers with + - * /
into an expression equal to the target.

Reward: the paper's own, reproduced by arith_eval.countdown_reward without eval:
    reward = 0.1 * format_reward + answer_reward
format_reward is 1.0 for "<think>" + completion matching
`<think>...</think>\\n<answer>...</answer>` exactly, else 0.1 for a think block plus
0.5 for an answer block; answer_reward is 1.0 when the LAST answer uses exactly the
given numbers and is within 1e-5 of the target.  correct = answer_reward == 1.

Prompts: by default (chat_template false) the paper's raw prompt, the record's
`context`, which ends in "Let me solve this step by step.\\n<think>", so the model
continues inside the think block.  With chat_template true the user message is
only the instruction ("Using the numbers [...] ... <answer> (1 + 2) / 3 </answer>.")
without the paper's system sentence (the chat template brings its own) and without
the "<think>" prefix; the model then opens <think> itself, and the reward is
unchanged, because the format regex's first '.*?' absorbs a second "<think>".

Data: option `data` (a JSON list like the paper's file, or JSONL), else the file
named by $ES_MPI_COUNTDOWN_DATA, else the packaged copy of the paper's 2200 puzzles.
Records need `numbers` (list of ints) and `target` (string or number); `id`,
`context` (built from numbers/target when absent) and `solution` are optional.
Splits, as in the paper: train = the first train_size records (default 200);
held-out = the first heldout_size (default 2000) of the last 2000 records, or of the
records after the train part when the file is too short for both.

Options: data, train_size, heldout_size, seed, chat_template, and
  generate: N   train on N generated puzzles (seed = option seed) instead of the
                file's first records; puzzles equal to a held-out one are skipped.
"""
from __future__ import annotations

import json
import math
import os
import random
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Sequence

from .arith_eval import answer_reward, countdown_reward
from ._common import task_options
from .base import Example, Score, Task, TaskDataError, read_jsonl

SYSTEM = ("You are a helpful assistant. You first think about the reasoning process in your "
          "mind and then provide the user with the answer.")
INSTRUCTION = ("Using the numbers [{numbers}], create an equation that equals {target}. You can "
               "use basic arithmetic operations (+, -, *, /) and each number can only be used "
               "once. Show your work in <think> </think> tags. And return the final answer in "
               "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")
ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"
HELDOUT_TAIL = 2000


def format_numbers(numbers: Sequence[int]) -> str:
    """Numbers as the paper printed them (a numpy array: right-aligned, space-separated)."""
    width = max(len(str(n)) for n in numbers)
    return " ".join(str(n).rjust(width) for n in numbers)


def raw_prompt(numbers: Sequence[int], target: Any) -> str:
    """The paper's prompt; equals `context` on all 2200 records of its file."""
    return SYSTEM + INSTRUCTION.format(numbers=format_numbers(numbers), target=target) + ASSISTANT_PREFIX


def chat_prompt(numbers: Sequence[int], target: Any) -> str:
    return INSTRUCTION.format(numbers=format_numbers(numbers), target=target)


def default_data_path() -> Path:
    env = os.environ.get("ES_MPI_COUNTDOWN_DATA")
    if env:
        return Path(env)
    import importlib.resources
    return Path(str(importlib.resources.files("es_mpi").joinpath("data", "countdown.json")))


def check_record(rec: Any, where: str) -> dict:
    """A validated copy of one record; errors name `where` and the field."""
    if not isinstance(rec, Mapping):
        raise TaskDataError(f"{where}: expected a JSON object")
    nums = rec.get("numbers")
    if (not isinstance(nums, list) or not nums
            or any(isinstance(n, bool) or not isinstance(n, int) for n in nums)):
        raise TaskDataError(f"{where}: field 'numbers' must be a non-empty list of integers, "
                            f"got {nums!r:.80}")
    target = rec.get("target")
    try:
        ok = not isinstance(target, bool) and isinstance(target, (str, int, float)) \
            and math.isfinite(float(target))
    except (ValueError, OverflowError):
        ok = False
    if not ok:
        raise TaskDataError(f"{where}: field 'target' must be a finite number or numeric "
                            f"string, got {target!r:.80}")
    for key in ("context", "solution"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            raise TaskDataError(f"{where}: field {key!r} must be a string")
    out = dict(rec)
    out.setdefault("context", None)
    return out


def load_records(path: str | Path) -> list[dict]:
    p = Path(path)
    if p.suffix == ".jsonl":
        rows = read_jsonl(p)
        return [check_record(r, f"{p}:{i}") for i, r in enumerate(rows, 1)]
    if not p.is_file():
        raise TaskDataError(f"{p}: dataset file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{p}: cannot read dataset ({e.__class__.__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{p}: malformed JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, list) or not data:
        raise TaskDataError(f"{p}: expected a non-empty JSON list of records")
    return [check_record(r, f"{p}: record {i}") for i, r in enumerate(data)]


def _puzzle_key(numbers: Sequence[int], target: Any) -> tuple:
    return tuple(sorted(numbers)), str(target)


def generate_puzzles(n: int, seed: int, n_numbers: Sequence[int] = (3, 4), lo: int = 1,
                     hi: int = 99, exclude: set | None = None) -> list[dict]:
    """`n` solvable puzzles in the paper's record format (id, context, numbers, target
    as a string, solution).  Deterministic in (n, seed, ...): each puzzle combines
    random numbers in lo..hi by a random tree of + - * / with exact division only;
    the target (1..999) is the value, and the solution is checked by the reward."""
    rng = random.Random(f"countdown-generate:{seed}")
    counts = tuple(n_numbers)
    if not counts or min(counts) < 2 or lo < 0 or hi < lo:
        raise ValueError("generate_puzzles: need counts >= 2 and 0 <= lo <= hi")
    exclude = exclude or set()
    out: list[dict] = []
    while len(out) < n:
        nums = [rng.randint(lo, hi) for _ in range(rng.choice(counts))]
        items = [(str(x), Fraction(x)) for x in nums]
        rng.shuffle(items)
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            (ea, va), (eb, vb) = items[i], items[j]
            op = rng.choice("+-*/")
            if op == "/" and (vb == 0 or va % vb != 0):   # keep intermediates integral
                op = rng.choice("+-*")
            v = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else va}[op]
            items = [it for k, it in enumerate(items) if k not in (i, j)] + [(f"({ea} {op} {eb})", v)]
        expr, value = items[0]
        if value.denominator != 1 or not 1 <= value <= 999:
            continue
        target = str(value.numerator)
        if _puzzle_key(nums, target) in exclude:
            continue
        if answer_reward(f"<answer>{expr}</answer>", nums, target) != 1.0:
            continue      # cannot happen; the evaluator is the judge of record
        out.append({"id": len(out), "context": raw_prompt(nums, target), "numbers": nums,
                    "target": target, "solution": expr})
    return out


class CountdownTask(Task):
    name = "countdown"
    chat_template = False
    stop_strings = ("</answer>",)
    record_fields = ("numbers", "target")

    def __init__(self, options: Mapping[str, Any] | None = None):
        super().__init__(options)
        opts = task_options(self, {"generate": "count"})
        self.path = Path(opts["data"]) if "data" in opts else default_data_path()
        self.seed = opts.get("seed", 0)
        self.generate = opts.get("generate")
        self.train_size = opts.get("train_size", self.generate or 200)
        self.heldout_size = opts.get("heldout_size", HELDOUT_TAIL)
        self._records: list[dict] | None = None

    def _load(self) -> list[dict]:
        if self._records is None:
            self._records = load_records(self.path)
        return self._records

    def _heldout_span(self) -> range:
        """File indices of the held-out records (disjoint from the train part)."""
        n = len(self._load())
        train_end = 0 if self.generate else self.train_size
        start = n - HELDOUT_TAIL if n - HELDOUT_TAIL >= train_end else train_end
        return range(start, min(n, start + self.heldout_size))

    def _example(self, rec: dict, index: int, prefix: str = "") -> Example:
        nums, target = rec["numbers"], rec["target"]
        if self.chat_template:
            prompt = chat_prompt(nums, target)
        else:
            prompt = rec.get("context") or raw_prompt(nums, target)
        rid = rec.get("id", index)          # index: the record's position in the file
        return Example(id=f"{prefix}{rid}", prompt=prompt, fields={"numbers": list(nums), "target": target})

    def examples(self, split: str) -> list[Example]:
        if split == "heldout":
            return [self._example(self._load()[i], i) for i in self._heldout_span()]
        if split != "train":
            raise TaskDataError(f"split: expected 'train' or 'heldout', got {split!r}")
        if self.generate:
            if self.train_size > self.generate:
                raise TaskDataError(f"task.options.train_size: {self.train_size} is more than "
                                    f"generate={self.generate}")
            recs = self._load()
            exclude = {_puzzle_key(recs[i]["numbers"], recs[i]["target"]) for i in self._heldout_span()}
            recs = generate_puzzles(self.generate, self.seed, exclude=exclude)[:self.train_size]
            return [self._example(r, i, prefix=f"gen{self.seed}-") for i, r in enumerate(recs)]
        recs = self._load()
        if self.train_size > len(recs):
            raise TaskDataError(f"task.options.train_size: {self.path} has only {len(recs)} records, "
                                f"train_size is {self.train_size}")
        return [self._example(r, i) for i, r in enumerate(recs[:self.train_size])]

    def from_record(self, record: Mapping[str, Any], where: str = "record") -> Example:
        ex = super().from_record(record, where)
        check_record({"numbers": ex.fields["numbers"], "target": ex.fields["target"]}, where)
        return ex

    def score(self, example: Example, completion: str) -> Score:
        r = countdown_reward(completion, example.fields["numbers"], example.fields["target"])
        return Score(reward=r["reward"],
                     components={"format_reward": r["format_reward"], "answer_reward": r["answer_reward"]},
                     correct=r["answer_reward"] == 1.0)
