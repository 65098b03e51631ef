"""Randomly initialised models of real shapes, for benchmarks without downloads.

`model.path: builtin:qwen2.5-7b-random` builds a Qwen2-architecture model with
Qwen2.5-7B's dimensions and random weights from `model.tiny_seed`, with a
word-level tokenizer covering the full vocabulary (token i is written as i in
hex), so every generated id decodes to text and a text reward such as the toy
task's varies between members: the bench then times a real, non-zero update.  The cache holds only config + tokenizer; weights are generated at
load time on each rank (same seed, same bytes), since writing 30 GB of random
weights to disk would cost more than generating them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

MARKER = "es_mpi_random_init.json"

SHAPES = {
    # dimensions from the published Qwen2.5 configs
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # a CPU-sized stand-in with the same architecture, for testing the GPU check
    "qwen2.5-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}


def shape_name(path: str) -> str | None:
    """'builtin:qwen2.5-7b-random' -> 'qwen2.5-7b' (None if not a random shape)."""
    if path.startswith("builtin:") and path.endswith("-random"):
        name = path[len("builtin:"):-len("-random")]
        return name if name in SHAPES else None
    return None


def hex_tokenizer(vocab_size: int, chat_template: str):
    """Word-level tokenizer: specials, then token i = hex(i), for every id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[format(i, "x")] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


def write_random_folder(out: Path, shape: str, seed: int, chat_template: str) -> None:
    from transformers import Qwen2Config

    tokenizer = hex_tokenizer(SHAPES[shape]["vocab_size"], chat_template)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / MARKER).write_text(json.dumps({"shape": shape, "seed": seed}))


def is_random_folder(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def build_random(folder: Path, device: str, dtype: torch.dtype = torch.float32):
    """The model, initialised from the marker's seed directly on `device` (in
    `dtype`, as `from_config(dtype=...)` builds it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads((folder / MARKER).read_text())
    cfg = AutoConfig.from_pretrained(str(folder))
    torch.manual_seed(int(spec["seed"]))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model
