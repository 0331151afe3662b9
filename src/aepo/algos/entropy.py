"""Token entropy (docs/algorithms.md section 1): full, estimated from top-k log-probs, and segment entropy.

Tensors in, tensors out; all arithmetic runs in float32 whatever the input dtype, and the
result is float32 on the input's device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["segment_entropy", "token_entropy", "topk_entropy"]


def _entropy_from_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v over the last dim of normalised log-probs; -inf entries count 0."""
    finite = torch.isfinite(log_p)
    safe_log_p = torch.where(finite, log_p, torch.zeros_like(log_p))
    p = torch.where(finite, log_p.exp(), torch.zeros_like(log_p))
    return -(p * safe_log_p).sum(dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each token's sampling distribution, in nats.

    H_t = -sum_v p_v log p_v,  p = softmax(z_t / T),
    computed as log_softmax (logsumexp-stable) in float32. `logits` is [..., V]; the result is
    [...]. Vocabulary entries at -inf (banned tokens) contribute 0. Differentiable in `logits`.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim < 1:
        raise ValueError(f"logits must be a tensor [..., V], got {type(logits).__name__}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits has an empty vocabulary dim: shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return _entropy_from_log_probs(torch.log_softmax(z, dim=-1))


def topk_entropy(logprobs: torch.Tensor, vocab_size: int, k: int | None = None) -> torch.Tensor:
    """Entropy (nats) of distributions known only by their k largest log-probs (what vLLM
    returns), with the missing tail estimated; docs/algorithms.md section 1.

    `logprobs` [..., k'] are normalised log-probs of the k most likely tokens, possibly plus the
    sampled token when it is not among them (k' = k + 1), in any order; -inf entries are missing.
    The known part is -sum p log p. The tail mass r = 1 - sum p lies on the other V - k' tokens,
    each no more likely than the k-th (p_k), so its term lies between r * (-log p_k) (tail tokens
    as likely as p_k) and r * (-log(r / (V - k'))) (tail spread evenly); the estimate is the mean
    of the two bounds. Exact when the top k hold all the mass, or when the tail is uniform at p_k.
    """
    if not isinstance(logprobs, torch.Tensor) or logprobs.ndim < 1:
        raise ValueError("logprobs must be a tensor [..., k]")
    x = logprobs.float()
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    k = x.shape[-1] if k is None else max(1, min(int(k), x.shape[-1]))
    finite = torch.isfinite(x)
    p = torch.where(finite, x.exp(), torch.zeros_like(x))
    known = -(p * torch.where(finite, x, torch.zeros_like(x))).sum(-1)
    rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    n_tail = (vocab_size - finite.sum(-1)).clamp_min(0).float()
    top = x.sort(dim=-1, descending=True).values[..., :k]
    floor = torch.where(torch.isfinite(top), top, torch.full_like(top, math.inf)).min(-1).values
    has_tail = (rest > 1e-12) & (n_tail > 0) & torch.isfinite(floor)
    safe_rest = torch.where(has_tail, rest, torch.ones_like(rest))
    safe_floor = torch.where(has_tail, floor, torch.zeros_like(floor))
    low = safe_rest * -safe_floor
    high = torch.maximum(safe_rest * -torch.log(safe_rest / n_tail.clamp_min(1.0)), low)
    return (known + torch.where(has_tail, 0.5 * (low + high), torch.zeros_like(low))).clamp_min(0.0)


def segment_entropy(
    entropies: torch.Tensor | Sequence[float],
    mask: torch.Tensor | None = None,
    n_probe: int = 20,
    vocab_size: int | None = None,
    reduce: Literal["rescaled_sum", "sum", "mean"] = "rescaled_sum",
) -> torch.Tensor:
    """Entropy of a segment from its first `n_probe` valid tokens (last dim), docs/algorithms.md section 1.

    - "rescaled_sum" (default): H_seg = (n_probe / n) * sum_{t <= n} H_t / log|V|,
      n = min(n_probe, #valid tokens): the sum the ARPO paper defines, length-rescaled so that a
      segment shorter than n_probe does not look calm because it sums fewer tokens. Equal to
      "sum" for segments of n_probe tokens or more.
    - "sum": the released code (`segment_entropy_compat`): sum_{t <= n} H_t / log|V|, no rescale.
    - "mean": (1 / n) sum_{t <= n} H_t / log|V|, a per-token figure in [0, 1]; not the scale the
      branching constants assume (it made every entropy term inert), kept for diagnostics.

    Without `vocab_size` nothing is divided by log|V|. With it, the sums lie in [0, n_probe].
    `mask` (same shape, 1 = valid) selects the tokens; a row without valid tokens gives 0.
    Result: shape [...].
    """
    h = torch.as_tensor(entropies)
    if h.ndim < 1:
        raise ValueError(f"entropies must have a token dim, got a scalar of shape {tuple(h.shape)}")
    h = h.float()
    if mask is None:
        valid = torch.ones_like(h, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask, device=h.device)
        if mask.shape != h.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != entropies shape {tuple(h.shape)}")
        valid = mask.bool()
    if int(n_probe) < 1:
        raise ValueError(f"n_probe must be >= 1, got {n_probe}")
    if reduce not in ("rescaled_sum", "sum", "mean"):
        raise ValueError(f"reduce must be one of 'rescaled_sum', 'sum', 'mean', got {reduce!r}")
    if vocab_size is not None and int(vocab_size) < 2:
        raise ValueError(f"vocab_size must be >= 2 to normalise by log|V|, got {vocab_size}")
    rank = torch.cumsum(valid.long(), dim=-1)  # 1-based position among valid tokens
    take = valid & (rank <= int(n_probe))
    total = torch.where(take, h, torch.zeros_like(h)).sum(dim=-1)
    count = take.sum(dim=-1).clamp(min=1).to(total.dtype)  # n (1 for an empty row, whose total is 0)
    if reduce == "mean":
        total = total / count
    elif reduce == "rescaled_sum":
        total = total * (float(n_probe) / count)
    if vocab_size is not None:
        total = total / math.log(int(vocab_size))
    return total
