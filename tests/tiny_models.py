"""The tiny random models the tests share, built one way everywhere (tests/conftest.py holds
the fixtures made from them)."""
from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

# the micro model's whole corpus: a question, a search call and an answer
MICRO_TEXT = "question: who founded molto press? <search> molto press </search> <answer> x </answer>"


def tiny_qwen3(vocab_size: int, *, layers: int = 2, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A random Qwen3 of hidden size 32 (MLP 64, 2 query heads over 1 kv head of dim 16) with
    `layers` layers, initialised from `seed` without touching the global RNG; `config` adds
    Qwen3Config fields (pad_token_id, eos_token_id, tie_word_embeddings, initializer_range)."""
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg)


def save_tiny_qwen3(out: Any, tok: Any, *, layers: int = 1) -> Any:
    """`tiny_qwen3` for `tok` (its pad and eos ids), saved with the tokenizer into `out`."""
    tiny_qwen3(len(tok), layers=layers, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out
