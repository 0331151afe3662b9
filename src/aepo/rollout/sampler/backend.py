"""The one place that builds samplers: `rollout.backend` picks the engine behind them.

A `SamplerBackend` is made once per run (or per eval/rollout command) and hands out one fresh
`Sampler` per rollout batch; the strategies drive that sampler and never see the engine.

- `torch`: `TorchSampler` over the live training model (with its LoRA adapters, if any);
  nothing to synchronise.
- `vllm`: an in-process vLLM engine (`aepo.rollout.sampler.vllm_sampler`), built once; its
  weights (or, for a LoRA run, only its adapter) are reloaded from the trainer's model after
  every optimizer step (`sync`).

`probe_logprobs` scores a fixed sequence with the engine, for the trainer's per-step check that
the engine serves the trained policy (`aepo.rollout.sampler.sync_check`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from aepo.models.lora import is_peft_model, policy_module
from aepo.rollout.config import RolloutConfig
from aepo.rollout.sampler.sync_check import probe_logprobs
from aepo.rollout.sampler.torch_sampler import TorchSampler

if TYPE_CHECKING:
    from aepo.types import Sampler

__all__ = ["BACKENDS", "SamplerBackend", "TorchBackend", "build_backend"]

BACKENDS = ("torch", "vllm")


class SamplerBackend(Protocol):
    """Hands out samplers; keeps the engine's weights equal to the trainer's."""

    name: str

    def sampler(self, seed: int) -> Sampler:
        """A fresh sampler for one rollout batch, seeded with `seed`."""

    def sync(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""

    def probe_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[j+1] | ids[:j+1]) under the engine's current weights, temperature 1."""

    def stats(self) -> dict[str, float]:
        """Counters since the last call (e.g. the prefix-cache hit rate), namespaced for metrics."""

    def close(self) -> None:
        """Free the engine."""


class TorchBackend:
    """`TorchSampler`s over the training model itself (a LoRA-wrapped model's base module, whose
    layers hold the adapters): `sync` has nothing to copy."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: RolloutConfig) -> None:
        self.model, self.tokenizer, self.cfg = policy_module(model), tokenizer, cfg
        self.graph_cache: dict = {}  # the samplers' CUDA graphs that outlive one (one sampler at a time)

    def sampler(self, seed: int) -> TorchSampler:
        c = self.cfg
        return TorchSampler(self.model, self.tokenizer, temperature=c.temperature, top_p=c.top_p,
                            top_k=c.top_k, seed=seed,
                            decode_graphs=None if c.decode_graphs else False,  # None: on CUDA only
                            graph_cache=self.graph_cache)  # layer graphs kept across rollouts

    def sync(self, model: torch.nn.Module) -> None:
        self.model = policy_module(model)

    def probe_logprobs(self, ids: list[int]) -> list[float]:
        return probe_logprobs(self.model, ids)

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def build_backend(cfg: RolloutConfig, model: torch.nn.Module | None, tokenizer: Any,
                  model_dir: str | Path | None = None) -> SamplerBackend:
    """The sampler backend `cfg.backend` names. `model` is the live torch model (required for
    `torch`; for `vllm` it gives the engine its dtype); `model_dir` is the HF directory the vLLM
    engine is built from. A trainer calls `sync` before its first rollout and after updates."""
    if cfg.backend == "torch":
        if model is None:
            raise ValueError("rollout.backend=torch needs the torch model")
        return TorchBackend(model, tokenizer, cfg)
    if cfg.backend == "vllm":
        from aepo.rollout.sampler.vllm_sampler import VLLMBackend

        if model_dir is None:
            raise ValueError("rollout.backend=vllm needs the model's directory (model.path) to build "
                             "the engine")
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.") if model is not None else None
        lora = model.peft_config["default"].r if model is not None and is_peft_model(model) else 0
        return VLLMBackend(model_dir, cfg, dtype=dtype, lora_rank=int(lora))
    raise ValueError(f"rollout.backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
