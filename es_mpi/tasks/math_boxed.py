"""Math word problems answered in \\boxed{} (GSM8K, MATH-style JSONL).

Data (option `data`): JSONL, one problem a line, with `question` (or `problem`)
and `answer`.  A GSM8K answer ("...reasoning... #### 1,234") counts as the text
after the last "####"; a record with `solution` instead of `answer` uses the last
\\boxed{} of the solution (MATH).  Train = the first train_size rows (default
200); held-out = the next heldout_size rows (default: all the rest).
Without `data`, the packaged es_mpi/data/math_sample.jsonl is used: 64 short
grade-school word problems with integer answers (for smoke runs and CPU demos,
not a benchmark); its default train_size is 16, leaving 48 held out.  A relative
`data` path is read from the current directory, like every task's data file.

Reward 1.0 when the LAST \\boxed{...} of the completion (braces balanced, escaped
\\{ \\} ignored; \\fbox too) matches the reference after normalisation, else 0.0:
  * dropped: $ and \\$, \\left \\right, spacing (\\! \\, \\; \\: '\\ ' ~ and all blanks),
    ^\\circ and degree signs, \\% and %, a trailing '.', a leading "x =";
  * \\text{..} \\textbf{..} \\mathrm{..} \\mbox{..} are replaced by their content;
  * \\dfrac and \\tfrac are \\frac, \\frac12 is \\frac{1}{2};
  * unit words: trailing words of letters (2+ letters each, e.g. "dollars",
    "cm^2", "square feet"; not "pi") are dropped, but only when what remains is
    a number, so "18 dollars" is 18 while "x + y" is untouched;
  * thousands commas ("1,234" and "1{,}234") are removed when the whole answer is
    such a number.
Then, if both sides read as numbers (integer, decimal, a/b, \\frac{a}{b} with
integer or decimal parts, mixed 3\\frac{1}{2}, with a sign), they are compared
exactly as fractions.Fraction (0.5 == 1/2 == \\frac{1}{2}); otherwise the
normalised strings must be equal.  correct = reward == 1.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Mapping

from ._common import packaged, task_options
from .base import Example, Score, Task, TaskDataError, read_jsonl

SAMPLE_FILE = "math_sample.jsonl"
SAMPLE_TRAIN_SIZE = 16
PROMPT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} or \\fbox{...}, in one linear pass."""
    match: dict[int, int] = {}
    stack: list[int] = []
    for b in re.finditer(r"(?<!\\)[{}]", text):      # \{ and \} are literal braces
        if b.group() == "{":
            stack.append(b.start())
        elif stack:
            match[stack.pop()] = b.start()
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        open_at = m.end() - 1
        if open_at in match:
            best = text[open_at + 1:match[open_at]]
    return best


_NUM = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"      # ASCII digits only
_SIMPLE = re.compile(rf"[+-]?{_NUM}")
_RATIO = re.compile(rf"([+-]?)({_NUM})/({_NUM})")
_FRAC = re.compile(rf"([+-]?)(?:([0-9]+))?\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_TEXT = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# words separated by blanks (no ambiguity in how letters split into words: no backtracking blow-up)
_UNITS = re.compile(r"(.*?[0-9}.])\s*([A-Za-z]{2,}(?:\^\{?[23]\}?)?(?:\s+[A-Za-z]{2,}(?:\^\{?[23]\}?)?)*)")
_THOUSANDS = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")
_MAX_NUMBER_CHARS = 60                   # keeps Fraction() cheap on adversarial input


def parse_number(s: str) -> Fraction | None:
    """Exact value of an already normalised answer, or None if it is not a number."""
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    try:
        if _SIMPLE.fullmatch(s):
            return Fraction(s)
        m = _RATIO.fullmatch(s)
        if m:
            v = Fraction(m.group(2)) / Fraction(m.group(3))
            return -v if m.group(1) == "-" else v
        m = _FRAC.fullmatch(s)
        if m:
            v = Fraction(m.group(3)) / Fraction(m.group(4)) + int(m.group(2) or 0)
            return -v if m.group(1) == "-" else v
    except (ZeroDivisionError, ValueError):
        return None
    return None


def normalize(s: str) -> str:
    """The normal form described in the module docstring (whitespace removed)."""
    s = s.strip()
    for _ in range(10):                  # nested \text{\textbf{..}}: a few rounds suffice
        t = _TEXT.sub(r"\1", s)
        if t == s:
            break
        s = t
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[!,;: ]|~", " ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\%|%", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"^[A-Za-z]\s*=\s*", "", s)
    m = _UNITS.fullmatch(s) if len(s) <= 200 else None     # bounded: the lazy prefix is O(n^2)
    if m and m.group(2).strip().lower() not in ("pi",) \
            and parse_number(re.sub(r"\s+", "", m.group(1))) is not None:
        s = m.group(1)
    s = re.sub(r"\s+", "", s).replace("{,}", ",")
    s = re.sub(r"\\frac([0-9])([0-9])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}([0-9])", r"\\frac{\1}{\2}", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s.rstrip(".")


def answers_match(predicted: str, reference: str) -> bool:
    a, b = normalize(predicted), normalize(reference)
    if not a:
        return False
    na, nb = parse_number(a), parse_number(b)
    if na is not None and nb is not None:
        return na == nb
    return a == b


def reference_answer(answer: Any) -> str:
    """GSM8K answers end in '#### value'; anything else is taken as is."""
    text = str(answer)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


class MathBoxedTask(Task):
    name = "math"
    chat_template = True
    record_fields = ("answer",)

    def __init__(self, options: Mapping[str, Any] | None = None):
        super().__init__(options)
        opts = task_options(self)
        self.path = opts.get("data") or packaged(SAMPLE_FILE)
        self.train_size = opts.get("train_size", 200 if opts.get("data") else SAMPLE_TRAIN_SIZE)
        self.heldout_size = opts.get("heldout_size")
        self._rows: list[dict] | None = None

    def _load(self) -> list[dict]:
        if self._rows is None:
            rows = read_jsonl(self.path)
            out = []
            for i, r in enumerate(rows, 1):
                q = r.get("question", r.get("problem"))
                if "answer" in r:
                    a = reference_answer(r["answer"])
                elif isinstance(r.get("solution"), str):
                    a = last_boxed(r["solution"])
                else:
                    a = None
                if not isinstance(q, str) or not q.strip():
                    raise TaskDataError(f"{self.path}:{i}: missing string field 'question' (or 'problem')")
                if not a:
                    raise TaskDataError(f"{self.path}:{i}: missing field 'answer' (or a 'solution' "
                                        "with \\boxed{})")
                out.append({"id": str(r.get("id", i - 1)), "question": q, "answer": a})
            self._rows = out
        return self._rows

    def examples(self, split: str) -> list[Example]:
        if split not in ("train", "heldout"):
            raise TaskDataError(f"split: expected 'train' or 'heldout', got {split!r}")
        rows = self._load()
        if self.train_size > len(rows):
            raise TaskDataError(f"task.options.train_size: {self.path} has only {len(rows)} rows, "
                                f"train_size is {self.train_size}")
        if split == "train":
            part = rows[:self.train_size]
        else:
            rest = rows[self.train_size:]
            part = rest[:self.heldout_size] if self.heldout_size else rest
        return [Example(id=r["id"], prompt=r["question"] + PROMPT_SUFFIX, fields={"answer": r["answer"]})
                for r in part]

    def score(self, example: Example, completion: str) -> Score:
        boxed = last_boxed(completion)
        ok = boxed is not None and answers_match(boxed, reference_answer(example.fields["answer"]))
        r = 1.0 if ok else 0.0
        return Score(reward=r, components={"answer_reward": r}, correct=ok)
