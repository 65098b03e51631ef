"""Helpers shared by the built-in tasks: option checking and packaged data."""
from __future__ import annotations

import importlib.resources
import math
import os
from pathlib import Path
from typing import Any, Mapping

from .base import Task, TaskDataError

# key -> kind; 'count' is an int >= 1 where 0/None means "task default" (the config
# writes 0 for unset sizes), 'path' is a string where "" means default, 'number'
# a finite int or float >= 0.
COMMON_OPTIONS = {"data": "path", "train_size": "count", "heldout_size": "count",
                  "seed": "int", "chat_template": "bool"}


def task_options(task: Task, extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check task.options against the common keys plus `extra`, apply chat_template,
    and return the options that were set (defaults left to the caller)."""
    kinds = {**COMMON_OPTIONS, **(extra or {})}
    out: dict[str, Any] = {}
    for key, value in task.options.items():
        kind = kinds.get(key)
        where = f"task.options.{key}"
        if kind is None:
            raise TaskDataError(f"task.options: unknown key {key!r} for task {task.name} "
                                f"(known: {', '.join(sorted(kinds))})")
        if kind == "bool":
            # config files may carry the strings of task.chat_template
            if isinstance(value, str) and value.lower() in ("true", "false", "auto"):
                if value.lower() == "auto":
                    continue
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise TaskDataError(f"{where}: expected true/false, got {value!r}")
        elif kind in ("int", "count"):
            if value is None and kind == "count":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TaskDataError(f"{where}: expected an integer, got {value!r}")
            if kind == "count":
                if value < 0:
                    raise TaskDataError(f"{where}: expected an integer >= 0, got {value}")
                if value == 0:
                    continue
        elif kind == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise TaskDataError(f"{where}: expected a number >= 0, got {value!r}")
            value = float(value)
        elif kind == "path":
            if not isinstance(value, (str, os.PathLike)):
                raise TaskDataError(f"{where}: expected a file path, got {value!r}")
            value = os.fspath(value)
            if not value:
                continue
        out[key] = value
    if "chat_template" in out:
        task.chat_template = out["chat_template"]
    return out


def packaged(name: str) -> Path:
    """Path of a data file shipped in es_mpi/data."""
    return Path(str(importlib.resources.files("es_mpi").joinpath("data", name)))
