"""`es-mpi eval`: greedy-decode and score a split, prompts sharded over ranks.

It uses the same decoding and scoring code as training (scoring.generate_and_score).
Prompts are decoded in fixed tiles (scoring.eval_tile_rows) dealt to ranks
in contiguous runs; the per-prompt results are gathered (one Allgatherv of
JSON) and rank 0 writes them in prompt order, so the output is the same on
any rank count (given the same threads per rank).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..runs import checkpoint
from ..comm import Comm, default_threads
from ..errors import UserError
from ..runs.rundir import log
from ..scoring import STATUS_TEXT, generate_and_score, summarize
from ..trainer import load_task, setup_model
from ..decode.backend import check_early as check_backend_early, open_backend


def run_eval(cfg, comm: Comm, split: str, limit: int, out_path: str | None, ckpt_path: str | None) -> dict:
    if split not in ("heldout", "train"):
        raise UserError(f"--split: {split!r} is not heldout or train")
    task, train, heldout = comm.agree(lambda: load_task(cfg))
    comm.agree(lambda: check_backend_early(cfg))
    examples = heldout if split == "heldout" else train
    if limit:
        examples = examples[:limit]
    if not examples:
        raise UserError(f"task {cfg.task.name}: the {split} split is empty")
    ck = comm.agree(lambda: checkpoint.load(ckpt_path)) if ckpt_path else None
    torch.set_num_threads(cfg.model.threads or default_threads(comm))
    ld = setup_model(cfg, comm)
    cfg, weights, tok, device, why = ld.cfg, ld.weights, ld.tok, ld.device, ld.backend_why
    if ck is not None:
        try:
            weights.load_state_dict(ck["weights"])
        except (KeyError, ValueError) as e:
            raise UserError(f"{ckpt_path}: checkpoint does not match the model ({e})") from None
    backend = comm.agree(lambda: open_backend(cfg, ld.folder, ld.model, tok, device, comm, weights))
    backend.sync_base(weights)
    if comm.is_root:
        log.info("decoder %s (%s)", cfg.generation.backend, why)
    gathered = []
    for i, (text, n_tokens, s) in enumerate(generate_and_score(backend, tok, task, examples, cfg, comm,
                                                                task.chat_template)):
        row = {"index": i, "id": examples[i].id, "completion": text, "n_tokens": n_tokens,
               "reward": s.reward if s.status == 0 else None, "correct": s.correct, **dict(s.components)}
        if s.status:
            row["error"] = STATUS_TEXT[s.status]
        gathered.append(row)
    summ = summarize([r["reward"] if r["reward"] is not None else float("nan") for r in gathered],
                     [bool(r["correct"]) for r in gathered])
    if comm.is_root:
        if out_path:
            _write_jsonl(Path(out_path), gathered)
        log.info("eval %s split of %s: mean reward %.4f ± %.4f (95%% CI) accuracy %.4f n=%d invalid=%d",
                 split, cfg.task.name, summ["mean_reward"], summ["ci95"], summ["accuracy"], summ["n_prompts"],
                 summ["n_invalid"])
    return {"summary": summ, "rows": gathered}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({e.strerror})") from None
