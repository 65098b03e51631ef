"""`es-mpi export`: a checkpoint as a Hugging Face folder (config.json,
tokenizer files, model.safetensors) that `from_pretrained` loads anywhere.

The base model folder the run started from is loaded (model.prepare, so a
builtin or GGUF base is rebuilt or converted into the cache as in training),
in the chosen dtype as `from_pretrained(dtype=...)` builds it, and its
weights are set to cast(checkpoint's fp32 master): exactly the run's working
model when the dtype is the run's.  Written into
a temporary folder beside --out and renamed, so --out is complete or absent.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..runs import checkpoint
from .. import config as config_mod
from ..errors import UserError
from ..model import DTYPES, load_model, prepare


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; not overwritten (choose another --out)")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory for its newest complete checkpoint."""
    p = Path(path)
    if p.is_dir():
        found = checkpoint.latest(p)
        if found is None:
            raise UserError(f"{p}: no complete checkpoint in {p / 'checkpoints'}")
        return found
    return p


def export(ckpt: str | Path, out: str | Path, dtype: str | None = None) -> dict:
    """Write the HF folder; returns {'path', 'dtype', 'generation', 'digest'}.
    dtype None: the run's working dtype (model.dtype)."""
    from transformers import AutoTokenizer

    from ..engine.weights import Weights

    out = Path(out)
    _check_out(out)
    path = resolve_checkpoint(ckpt)
    ck = checkpoint.load(path)
    attrs = ck["attrs"]
    cfg = config_mod.loads(str(attrs.get("config", "")), f"{path} (config attribute)")
    dtype = dtype or cfg.model.dtype
    if dtype not in DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    folder = prepare(cfg.model.path, cfg.model.tiny_seed, cfg.model.cache_dir)
    # the base as HF loads it in the export dtype (buffers and config.dtype
    # included), then its weights set to cast(checkpoint master)
    model, master = load_model(folder, dtype, "cpu")
    weights = Weights(model, master=master)
    try:
        weights.load_state_dict(ck["weights"])
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: checkpoint does not match the base model {cfg.model.path} ({e})") from None
    # The digest covers every weight: a flipped byte anywhere in them is caught here.
    if weights.digest() != attrs.get("digest"):
        raise UserError(f"{path}: weights digest mismatch (corrupted checkpoint)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the export private
    except OSError as e:
        raise UserError(f"{out}: cannot create ({e.strerror})") from None
    try:
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(tmp))
        _check_out(out)  # still free? (another export may have raced us)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"{out}: export failed ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"path": out, "dtype": dtype, "generation": int(attrs["generation"]), "digest": attrs["digest"]}
