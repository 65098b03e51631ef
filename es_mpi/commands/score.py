"""`es-mpi score`: rewards for responses in a JSONL file (no model, no MPI)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from ..errors import UserError
from ..scoring import OK, STATUS_TEXT, score_one
from ..tasks import TaskDataError, UnknownTask, make_task
from ..tasks.base import iter_jsonl


def score_file(task_name: str, input_path: str, output_path: str = "-", options=(), timeout: float = 5.0) -> int:
    opts = {}
    for item in options:
        k, sep, v = item.partition("=")
        if not sep:
            raise UserError(f"--option {item!r}: expected KEY=VALUE")
        opts[k] = yaml.safe_load(v)
    try:
        task = make_task(task_name, opts)
    except (UnknownTask, TaskDataError) as e:
        raise UserError(str(e)) from None
    p = Path(input_path)
    lines_out = []
    for i, rec in iter_jsonl(p, error=UserError, what="input"):
        if "response" not in rec or not isinstance(rec["response"], str):
            raise UserError(f"{p}:{i}: missing string field 'response'")
        try:
            ex = task.from_record(rec, where=f"{p}:{i}")
        except TaskDataError as e:
            raise UserError(str(e)) from None
        s = score_one(task, ex, rec["response"], timeout)
        out = dict(rec)
        out["reward"] = s.reward if s.status == OK else None
        out.update(s.components)
        if s.status != OK:
            out["error"] = STATUS_TEXT[s.status]
        lines_out.append(json.dumps(out))
    payload = "".join(l + "\n" for l in lines_out)
    if output_path == "-":
        sys.stdout.write(payload)
    else:
        dst = Path(output_path)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(payload, encoding="utf-8")
            os.replace(tmp, dst)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"{dst}: cannot write ({e.strerror})") from None
    return len(lines_out)
