"""The task interface: prompts in, rewards out.

A task is a small object that yields examples (train and held-out) and scores
completions.  It knows nothing of models, MPI or ES; the trainer and `es-mpi
eval` drive it.  Rewards are pure functions of (example, completion) so that
`es-mpi score` can check them without a model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


class TaskDataError(ValueError):
    """A dataset or record is unusable; the message names the file/line/field."""


@dataclass(frozen=True)
class Example:
    """One prompt of a task.

    id:     stable identifier (string) written to eval JSONL.
    prompt: the text shown to the model.  If the task uses a chat template it
            is the *user message*; otherwise it is the raw prompt text.
    fields: task-specific data the reward needs (target, numbers, ...).
            Must be JSON-serialisable.
    """
    id: str
    prompt: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """Reward of one completion.

    reward:     the scalar ES optimises (float; NaN is allowed and means invalid).
    components: named parts of the reward, e.g. format_reward / answer_reward.
    correct:    task-level success, used for accuracy in eval.
    """
    reward: float
    components: Mapping[str, float] = field(default_factory=dict)
    correct: bool = False


class Task:
    """Base class.  Subclasses set the class attributes and implement
    `examples` and `score`; `from_record` is needed for `es-mpi score`."""

    name: str = "base"
    #: apply the tokenizer's chat template to Example.prompt
    chat_template: bool = False
    #: generation stops per sequence when one of these appears
    stop_strings: tuple[str, ...] = ()
    #: fields `es-mpi score` requires in an input record (besides `response`)
    record_fields: tuple[str, ...] = ()

    def __init__(self, options: Mapping[str, Any] | None = None):
        self.options = dict(options or {})

    def examples(self, split: str) -> Sequence[Example]:
        """All examples of split 'train' or 'heldout', in a fixed order."""
        raise NotImplementedError

    def score(self, example: Example, completion: str) -> Score:
        raise NotImplementedError

    def from_record(self, record: Mapping[str, Any], where: str = "record") -> Example:
        """Build an Example from a JSON record (for `es-mpi score`).
        Missing fields raise TaskDataError naming `where` and the field."""
        missing = [f for f in self.record_fields if f not in record]
        if missing:
            raise TaskDataError(f"{where}: missing field(s) {', '.join(missing)} for task {self.name}")
        return Example(id=str(record.get("id", "")), prompt=str(record.get("prompt", "")),
                       fields={k: record[k] for k in self.record_fields})


def iter_jsonl(path: str | Path, error=TaskDataError, what: str = "dataset"):
    """Yield (line number, object) of a JSONL file, skipping blank lines.
    Every problem raises `error` naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: {what} file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{p}: cannot read {what} ({e.__class__.__name__}: {e})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{p}:{i}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{p}:{i}: expected a JSON object")
        yield i, row


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    """Read a JSONL dataset; every error names the file and line number."""
    rows: list[dict] = []
    required = tuple(required)
    for i, row in iter_jsonl(path):
        miss = [k for k in required if k not in row]
        if miss:
            raise TaskDataError(f"{path}:{i}: missing field(s) {', '.join(miss)}")
        rows.append(row)
    if not rows:
        raise TaskDataError(f"{path}: dataset is empty")
    return rows
