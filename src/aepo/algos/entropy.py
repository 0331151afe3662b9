"""Token entropy (docs/algorithms.md section 1): full, top-k probe and segment entropy.

Tensors in, tensors out; all arithmetic runs in float32 whatever the input dtype, and the
result is float32 on the input's device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["segment_entropy", "token_entropy", "topk_probe_entropy"]


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


def topk_probe_entropy(logprobs_or_logits: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Entropy of the renormalised top-k of the last dim (the cheap probe used while sampling).

    H^k_t = -sum_{v in topk} q_v log q_v,  q = softmax over the k largest entries.
    The input may be full logits [..., V] or the top-k logprobs a server returned [..., k']:
    log_softmax over the kept entries renormalises either form (shift-invariant). When the last
    dim has fewer than k entries all of them are used; -inf entries (missing) contribute 0.
    """
    if not isinstance(logprobs_or_logits, torch.Tensor) or logprobs_or_logits.ndim < 1:
        raise ValueError("logprobs_or_logits must be a tensor [..., V]")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = logprobs_or_logits.float()
    if x.shape[-1] > k:
        x = torch.topk(x, int(k), dim=-1).values
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    all_missing = torch.isneginf(x).all(dim=-1, keepdim=True)
    x = torch.where(all_missing, torch.zeros_like(x), x)  # avoid NaN; such rows are set to 0 below
    h = _entropy_from_log_probs(torch.log_softmax(x, dim=-1))
    return torch.where(all_missing.squeeze(-1), torch.zeros_like(h), h)


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
