"""Prompt formatting, and the greedy generation config of a plain HF `generate`
(the baseline the bench measures our decoder against)."""
from __future__ import annotations

from typing import Sequence


def format_prompts(tokenizer, prompts: Sequence[str], chat: bool) -> list[str]:
    if not chat:
        return list(prompts)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the task asks for a chat template but the tokenizer has none")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def greedy_config(model, tokenizer, max_new_tokens: int, stop_strings: Sequence[str] = (),
                  ignore_eos: bool = False):
    """transformers GenerationConfig for greedy decoding as es-mpi decodes
    (EOS from the model's generation config, else the tokenizer's)."""
    from transformers import GenerationConfig

    from .greedy import eos_ids

    cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids(model, tokenizer),
                           temperature=None, top_p=None, top_k=None)
    if ignore_eos:
        cfg.min_new_tokens = max_new_tokens
    cfg.stop_strings = list(stop_strings) or None
    return cfg
