"""Build a randomly initialised HF causal LM for the demo, from a config (no download).

`init_model(out_dir, tokenizer, preset="tiny")` makes a Qwen3-style (or Llama / Qwen2) model
sized by a preset, saves it with its tokenizer as a normal HF directory (safetensors), and
returns it; `AutoModelForCausalLM.from_pretrained(out_dir)` loads it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)

from aepo.models.tokenizer import save_tokenizer


@dataclass(frozen=True)
class ModelPreset:
    """Transformer sizes; parameter counts below exclude the (tied) embedding matrix."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 4096


MODEL_PRESETS: dict[str, ModelPreset] = {
    # ~0.39 M non-embedding parameters (+ 128 per vocabulary entry): the demo's model. On the demo
    # world it learns faster per second than "tiny" and reaches a higher SFT accuracy in the same
    # number of optimizer steps (benchmarks/RESULTS.md, "Demo: learning status").
    "micro": ModelPreset(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
    ),
    # ~0.79 M non-embedding parameters (+ 128 per vocabulary entry).
    "tiny": ModelPreset(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
    ),
    # ~4.7 M non-embedding parameters (+ 256 per vocabulary entry).
    "small": ModelPreset(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=768,
    ),
}
ARCHITECTURES = ("qwen3", "qwen2", "llama")


def check_model_args(preset: str, arch: str) -> None:
    """ValueError naming a preset or arch that is not built in, with the valid choices."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model arch {arch!r}; choose one of {list(ARCHITECTURES)}")


def model_config(
    tokenizer: PreTrainedTokenizerBase, preset: str = "tiny", arch: str = "qwen3"
) -> PretrainedConfig:
    """The HF config of a built-in model: `preset` sizes, `arch` family, vocab of `tokenizer`."""
    check_model_args(preset, arch)
    p = MODEL_PRESETS[preset]
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        head_dim=p.hidden_size // p.num_attention_heads,
        max_position_embeddings=p.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if arch == "qwen3":
        return Qwen3Config(**common)
    if arch == "qwen2":
        common.pop("head_dim")
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared/tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def init_model(
    out_dir: str | Path | None,
    tokenizer: PreTrainedTokenizerBase,
    preset: str = "tiny",
    seed: int = 0,
    arch: str = "qwen3",
) -> PreTrainedModel:
    """Randomly initialise a causal LM (same `seed` -> same weights) and save it with `tokenizer`.

    Nothing is saved when `out_dir` is None (handy in tests). The global torch RNG is left
    untouched.
    """
    config = model_config(tokenizer, preset, arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
    if out_dir is not None:
        from aepo.models.loading import silence_transformers_progress

        silence_transformers_progress()
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(path), safe_serialization=True)
        save_tokenizer(tokenizer, path)
    return model
