"""aepo's `actor.lora` as verl's own LoRA settings (docs/usage.md, "LoRA"): verl trains the adapters
itself (peft on its FSDP actor, adapter-only syncs to its vLLM servers), so aepo only passes
the values through as command-line overrides of `verl.trainer.main_ppo`."""

from __future__ import annotations

from typing import Any

__all__ = ["verl_lora_overrides"]


def verl_lora_overrides(lora: Any) -> list[str]:
    """Hydra overrides giving verl's FSDP actor the adapters `lora` (an `aepo.config.LoraConfig`)
    describes; none when `lora.rank` is 0. An empty `target_modules` becomes verl's "all-linear".
    verl's vLLM rollout needs `load_format=safetensors` to load the base model under LoRA."""
    if lora.rank <= 0:
        return []
    targets = "[" + ",".join(lora.target_modules) + "]" if lora.target_modules else "all-linear"
    return [
        f"actor_rollout_ref.model.lora_rank={lora.rank}",
        f"actor_rollout_ref.model.lora_alpha={lora.alpha:g}",
        f"actor_rollout_ref.model.target_modules={targets}",
        "actor_rollout_ref.rollout.load_format=safetensors",
    ]
