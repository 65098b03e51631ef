"""Task registry: built-in tasks by name, user tasks by `package.module:Class`."""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from .base import Example, Score, Task, TaskDataError, read_jsonl

# name -> "module:Class", imported lazily so that a task's dependencies cost
# nothing unless it is used.
BUILTIN = {
    "toy": "es_mpi.tasks.toy:ToyTask",
    "conciseness": "es_mpi.tasks.conciseness:ConcisenessTask",
    "countdown": "es_mpi.tasks.countdown:CountdownTask",
    "arithmetic": "es_mpi.tasks.arithmetic:MultiplicationTask",
    "sequence": "es_mpi.tasks.arithmetic:SequenceTask",
    "math": "es_mpi.tasks.math_boxed:MathBoxedTask",
    "sudoku": "es_mpi.tasks.sudoku:SudokuTask",
}


class UnknownTask(ValueError):
    pass


def task_class(name: str) -> type[Task]:
    """Resolve a task name or dotted path `pkg.mod:Class` to its class."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise UnknownTask(f"task.name: unknown task {name!r} (built-in: {', '.join(sorted(BUILTIN))}; "
                          "or give package.module:Class)")
    mod_name, cls_name = target.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UnknownTask(f"task.name: cannot import module {mod_name!r} for task {name!r} ({e})") from None
    cls = getattr(mod, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise UnknownTask(f"task.name: {target!r} is not a subclass of es_mpi.tasks.Task")
    return cls


def make_task(name: str, options: Mapping[str, Any] | None = None) -> Task:
    return task_class(name)(options)


__all__ = ["Example", "Score", "Task", "TaskDataError", "read_jsonl", "make_task", "task_class",
           "UnknownTask", "BUILTIN"]
