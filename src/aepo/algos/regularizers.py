"""Regularisers added to the policy loss (docs/algorithms.md section 5): KL to a reference policy
and EPO's entropy regulariser (entropy bonus + phase-weighted entropy band penalty).

EPO in one step of training:

    history = EntropyHistory()                       # lives across steps (checkpoint its state)
    term, m = epo_regularizer(entropy, mask, history, step, total_steps)
    loss = pg_loss + term
    history.update(m["epo_entropy"])                 # after the step: H_hist uses past batches

With `turn_ids` the band is applied per turn index against that turn's own history.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = [
    "KL_KINDS",
    "EntropyHistory",
    "EpoBatch",
    "epo_band_penalty",
    "epo_phase_weight",
    "epo_regularizer",
    "kl_penalty",
    "turn_entropy_means",
]

KL_KINDS = ("k1", "k2", "k3")
_KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}  # verl's names


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs (Schulman's k1/k2/k3).

    k1: log pi - log pi_ref
    k2: 0.5 (log pi - log pi_ref)^2
    k3: exp(d) - d - 1, d = clamp(log pi_ref - log pi, -20, 20), result clamped to [-10, 10]
        (low variance, always >= 0; verl's low_var_kl). verl's names kl / mse / low_var_kl work too.
    Computed in float32; same shape as the inputs.
    """
    kind_key = _KL_ALIASES.get(kind, kind)
    if kind_key not in KL_KINDS:
        raise ValueError(
            f"unknown KL kind {kind!r}; valid: {', '.join(KL_KINDS)} (or {', '.join(_KL_ALIASES)})"
        )
    if not isinstance(log_prob, torch.Tensor) or not isinstance(ref_log_prob, torch.Tensor):
        raise ValueError("log_prob and ref_log_prob must be tensors")  # noqa: TRY004
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(
            f"log_prob shape {tuple(log_prob.shape)} != ref_log_prob shape {tuple(ref_log_prob.shape)}"
        )
    logp, ref = log_prob.float(), ref_log_prob.to(log_prob.device).float()
    if kind_key == "k1":
        return logp - ref
    if kind_key == "k2":
        return 0.5 * (logp - ref).square()
    d = (ref - logp).clamp(-20.0, 20.0)
    return (d.exp() - d - 1.0).clamp(-10.0, 10.0)


# ----------------------------------------------------------------------------- EPO


def epo_phase_weight(step: int, total_steps: int) -> float:
    """EPO's phase weight beta_k for training step k of K.

    k <= K/2: beta_k = 1 - 0.2 (1 - e^{-2p}),  p = k / (K/2)   (from 1 down to ~0.83)
    k >  K/2: beta_k = 0.8 e^{-3p},            p = (k - K/2) / (K/2)   (from 0.8 down to ~0.04)
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    half = total_steps / 2.0
    if step <= half:
        p = step / half
        return 1.0 - 0.2 * (1.0 - math.exp(-2.0 * p))
    p = (step - half) / half
    return 0.8 * math.exp(-3.0 * p)


def epo_band_penalty(
    entropy_mean: torch.Tensor | float,
    h_hist: torch.Tensor | float,
    kappa_l: float = 0.5,
    kappa_r: float = 1.5,
    coef: float = 1.0,
) -> torch.Tensor:
    """Differentiable penalty keeping the entropy inside [kappa_l H_hist, kappa_r H_hist].

    P = coef * mean_j( relu(kappa_l H_hist_j - H_j)^2 + relu(H_j - kappa_r H_hist_j)^2 )
    over the entries j of `entropy_mean` (a scalar, or one value per turn with a matching
    `h_hist`). Zero inside the band; gradient 2 coef (H - bound) / n outside it.
    """
    if not 0 <= kappa_l <= kappa_r:
        raise ValueError(f"need 0 <= kappa_l <= kappa_r, got kappa_l={kappa_l}, kappa_r={kappa_r}")
    h = torch.as_tensor(entropy_mean).float()
    hh = torch.as_tensor(h_hist, dtype=torch.float32, device=h.device).detach()
    if hh.shape != h.shape and hh.numel() != 1:
        raise ValueError(f"h_hist shape {tuple(hh.shape)} does not match entropy_mean shape {tuple(h.shape)}")
    below = torch.relu(kappa_l * hh - h)
    above = torch.relu(h - kappa_r * hh)
    return coef * (below.square() + above.square()).mean()


def turn_entropy_means(
    entropy: torch.Tensor, mask: torch.Tensor, turn_ids: torch.Tensor
) -> dict[int, torch.Tensor]:
    """Masked mean entropy of each turn index present among the valid tokens (turn id >= 0),
    as {turn: scalar tensor} (differentiable in `entropy`)."""
    if turn_ids.shape != entropy.shape:
        raise ValueError(f"turn_ids shape {tuple(turn_ids.shape)} != entropy shape {tuple(entropy.shape)}")
    valid = mask.bool() & (turn_ids >= 0)
    h = entropy.float()
    out: dict[int, torch.Tensor] = {}
    for turn in torch.unique(turn_ids[valid]).tolist():
        sel = valid & (turn_ids == turn)
        out[int(turn)] = torch.where(sel, h, torch.zeros_like(h)).sum() / sel.sum()
    return out


class EntropyHistory:
    """Running (cumulative) mean of past batch entropies, globally or per turn index.

    `update(value)` adds one batch's mean entropy; `update(value, turn=j)` adds turn j's.
    `value()` / `value(turn=j)` is the mean so far, or None before any update (no band then).
    """

    def __init__(self) -> None:
        self._sum: dict[int | None, float] = {}
        self._count: dict[int | None, int] = {}

    def update(self, value: float | torch.Tensor, turn: int | None = None) -> None:
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            raise ValueError(f"EntropyHistory.update: entropy must be finite, got {v}")
        key = None if turn is None else int(turn)
        self._sum[key] = self._sum.get(key, 0.0) + v
        self._count[key] = self._count.get(key, 0) + 1

    def update_turns(self, values: Mapping[int, float | torch.Tensor]) -> None:
        """Add one value per turn (e.g. the output of `turn_entropy_means`)."""
        for turn, v in values.items():
            self.update(v, turn=turn)

    def value(self, turn: int | None = None) -> float | None:
        key = None if turn is None else int(turn)
        if key not in self._count:
            return None
        return self._sum[key] / self._count[key]

    def turns(self) -> list[int]:
        """Turn indices that have a history."""
        return sorted(k for k in self._count if k is not None)

    def state_dict(self) -> dict[str, list]:
        keys = list(self._count)
        return {"keys": keys, "sums": [self._sum[k] for k in keys], "counts": [self._count[k] for k in keys]}

    def load_state_dict(self, state: Mapping[str, list]) -> None:
        self._sum = dict(zip(state["keys"], (float(s) for s in state["sums"])))
        self._count = dict(zip(state["keys"], (int(c) for c in state["counts"])))


def _hist_for(h_hist: object, turn: int | None) -> float | None:
    """H_hist for the batch (turn None) or one turn, from any accepted history form."""
    if h_hist is None:
        return None
    if isinstance(h_hist, EntropyHistory):
        return h_hist.value(turn)
    if isinstance(h_hist, Mapping):
        if turn is None:
            raise ValueError("h_hist is a per-turn mapping but no turn_ids were given")
        v = h_hist.get(turn)
        return None if v is None else float(v)
    if turn is not None:
        raise ValueError(
            "turn_ids were given but h_hist is a single value; pass {turn: value} or EntropyHistory"
        )
    return float(h_hist)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EpoBatch:
    """Entropy totals of the whole batch a micro-batch belongs to (from a no-grad pass), so that
    `epo_regularizer` can give each micro-batch its part of the batch's regulariser: n_tokens and
    h_bar over all valid tokens; turn_tokens and turn_means per turn index (turn id >= 0)."""

    n_tokens: float
    h_bar: float
    turn_tokens: Mapping[int, float] = field(default_factory=dict)
    turn_means: Mapping[int, float] = field(default_factory=dict)


def _band_slope(h: float, hist: float, kappa_l: float, kappa_r: float) -> float:
    """d/dH of relu(kappa_l hist - H)^2 + relu(H - kappa_r hist)^2 at H = h."""
    return 2.0 * (max(0.0, h - kappa_r * hist) - max(0.0, kappa_l * hist - h))


def epo_regularizer(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    h_hist: float | torch.Tensor | Mapping[int, float] | EntropyHistory | None,
    step: int,
    total_steps: int,
    entropy_coef: float = 0.001,
    kappa_l: float = 0.5,
    kappa_r: float = 1.5,
    band_coef: float = 1.0,
    turn_ids: torch.Tensor | None = None,
    batch: EpoBatch | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """EPO's term added to the policy loss.

    R = -lambda_H * H_bar + beta_k * P,  H_bar = masked mean token entropy of the batch,
    P = epo_band_penalty over the batch's H_bar against H_hist (no turn_ids), or, with
    turn_ids [B, T] (turn index per token, < 0 ignored), the mean over the turns of the batch
    that have a history of each turn's masked mean entropy against that turn's H_hist.
    h_hist: a float, {turn: float}, an EntropyHistory, or None (no history yet: P = 0).
    `entropy` [B, T] should carry the gradient (e.g. `token_entropy(logits)`).
    Metrics: epo_entropy (H_bar), epo_beta, epo_band_penalty, epo_band_turns (turns penalised).

    With `batch` (this micro-batch is part of a larger batch, docs/algorithms.md section 5) the
    band and the bonus are those of the whole batch: H_bar and the turn means are the batch's
    (`batch`), and the returned term is this micro-batch's part of R's gradient,
    -lambda_H S / N + beta sum_j P'(H_j) S_j / N_j (S, S_j: this micro-batch's entropy sums,
    N, N_j: the batch's token counts, P' the band's slope at the batch means), so the terms of
    all micro-batches add up to R's gradient at the batch means; the metrics are the batch's.
    """
    if batch is not None:
        return _epo_batch_part(entropy, mask, h_hist, step, total_steps, entropy_coef, kappa_l, kappa_r,
                               band_coef, turn_ids, batch)
    if entropy.shape != mask.shape or entropy.ndim != 2:
        raise ValueError(
            f"entropy shape {tuple(entropy.shape)} and mask shape {tuple(mask.shape)} must be equal [B, T]"
        )
    valid = mask.bool()
    h = entropy.float()
    h_bar = torch.where(valid, h, torch.zeros_like(h)).sum() / valid.sum().clamp(min=1)
    beta = epo_phase_weight(step, total_steps)
    band = torch.zeros((), dtype=torch.float32, device=h.device)
    n_band = 0
    if turn_ids is None:
        hist = _hist_for(h_hist, None)
        if hist is not None and bool(valid.any()):
            band = epo_band_penalty(h_bar, hist, kappa_l, kappa_r, band_coef)
            n_band = 1
    else:
        means = turn_entropy_means(h, valid, turn_ids.to(h.device))
        pairs = [(m, _hist_for(h_hist, t)) for t, m in means.items()]
        pairs = [(m, hv) for m, hv in pairs if hv is not None]
        if pairs:
            cur = torch.stack([m for m, _ in pairs])
            ref = torch.tensor([hv for _, hv in pairs], dtype=torch.float32, device=h.device)
            band = epo_band_penalty(cur, ref, kappa_l, kappa_r, band_coef)
            n_band = len(pairs)
    term = -entropy_coef * h_bar + beta * band
    metrics = {
        "epo_entropy": float(h_bar.detach()),
        "epo_beta": beta,
        "epo_band_penalty": float(band.detach()),
        "epo_band_turns": float(n_band),
    }
    return term, metrics


def _epo_batch_part(
    entropy: torch.Tensor, mask: torch.Tensor, h_hist: object, step: int, total_steps: int,
    entropy_coef: float, kappa_l: float, kappa_r: float, band_coef: float,
    turn_ids: torch.Tensor | None, batch: EpoBatch,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`epo_regularizer` for one micro-batch of `batch` (see there)."""
    if entropy.shape != mask.shape or entropy.ndim != 2:
        raise ValueError(
            f"entropy shape {tuple(entropy.shape)} and mask shape {tuple(mask.shape)} must be equal [B, T]"
        )
    if not 0 <= kappa_l <= kappa_r:
        raise ValueError(f"need 0 <= kappa_l <= kappa_r, got kappa_l={kappa_l}, kappa_r={kappa_r}")
    valid = mask.bool()
    h = torch.where(valid, entropy.float(), torch.zeros_like(entropy, dtype=torch.float32))
    beta = epo_phase_weight(step, total_steps)
    term = -entropy_coef * h.sum() / max(batch.n_tokens, 1.0)
    band_value, n_band = 0.0, 0
    if turn_ids is None:
        hist = _hist_for(h_hist, None)
        if hist is not None and batch.n_tokens > 0:
            band_value = float(epo_band_penalty(batch.h_bar, hist, kappa_l, kappa_r, band_coef))
            slope = band_coef * _band_slope(batch.h_bar, hist, kappa_l, kappa_r)
            term = term + beta * slope * h.sum() / batch.n_tokens
            n_band = 1
    else:
        tids = turn_ids.to(h.device)
        pairs = [(t, m, _hist_for(h_hist, t)) for t, m in sorted(batch.turn_means.items())]
        pairs = [(t, m, hv) for t, m, hv in pairs if hv is not None]
        if pairs:
            n_band = len(pairs)
            band_value = float(epo_band_penalty(torch.tensor([m for _, m, _ in pairs]),
                                                torch.tensor([hv for _, _, hv in pairs]), kappa_l, kappa_r, band_coef))
            for t, m, hv in pairs:
                slope = band_coef * _band_slope(m, hv, kappa_l, kappa_r) / n_band
                if slope != 0.0:
                    sel = valid & (tids == t)
                    term = term + beta * slope * torch.where(sel, h, torch.zeros_like(h)).sum() / batch.turn_tokens[t]
    metrics = {"epo_entropy": float(batch.h_bar), "epo_beta": beta, "epo_band_penalty": band_value,
               "epo_band_turns": float(n_band)}
    return term, metrics
