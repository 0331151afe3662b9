"""Is the sampler engine serving the policy the trainer just updated?

After every weight (or adapter) sync the trainer scores a fixed probe sequence twice: with its
own model (`probe_logprobs`) and with the engine (`SamplerBackend.probe_logprobs`), and
`check_sync` compares the two per-token log-probs. An engine that kept stale weights, or never
received the adapter, gives log-probs of an older policy; the run then stops with a SyncError
instead of training on samples from the wrong model (docs/usage.md, "LoRA"; `rollout.sync_tolerance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["SyncError", "check_sync", "probe_logprobs", "sync_gap"]


class SyncError(RuntimeError):
    """The engine's log-probs of the probe sequence disagree with the trainer's."""


def probe_logprobs(model: torch.nn.Module, ids: Sequence[int]) -> list[float]:
    """log p(ids[j+1] | ids[:j+1]) for j = 0 .. len(ids) - 2 under `model` at temperature 1, in
    float32, without gradients (a wrapped LoRA model is run with its adapters on)."""
    from aepo.models.lora import policy_module

    if len(ids) < 2:
        raise ValueError("probe_logprobs: the probe sequence needs at least 2 tokens")
    module = policy_module(model)
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            x = torch.tensor([list(ids)], dtype=torch.long, device=device)
            logits = module(input_ids=x, use_cache=False).logits[0, :-1].float()
            lp = F.log_softmax(logits, dim=-1).gather(-1, x[0, 1:, None])[:, 0]
    finally:
        module.train(was_training)
    return lp.cpu().tolist()


def sync_gap(trained: Sequence[float], served: Sequence[float]) -> float:
    """Mean |trained - served| per token (nats); inf when the lengths differ or a value is not finite."""
    if len(trained) != len(served) or not trained:
        return math.inf
    diffs = [abs(float(a) - float(b)) for a, b in zip(trained, served)]
    return sum(diffs) / len(diffs) if all(math.isfinite(d) for d in diffs) else math.inf


def check_sync(
    trained: Sequence[float],
    served: Sequence[float],
    tolerance: float,
    *,
    step: int | None = None,
    engine: str = "the sampler engine",
) -> float:
    """The gap (`sync_gap`) between the trainer's and the engine's probe log-probs; SyncError
    when it exceeds `tolerance` (the engine samples from another policy than the one trained)."""
    gap = sync_gap(trained, served)
    if gap > tolerance:
        at = f" after step {step}" if step is not None else ""
        raise SyncError(
            f"{engine} is not serving the trained policy{at}: the log-probs of the probe sequence "
            f"differ from the trainer's by {gap:.4g} nats per token on average (tolerance "
            f"rollout.sync_tolerance={tolerance:g}); its weights or adapter were not updated. Stopping "
            f"rather than training on samples of a stale policy"
        )
    return gap
