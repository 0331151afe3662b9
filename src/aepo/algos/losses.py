"""Token-level policy-gradient losses (docs/algorithms.md section 5) and their aggregation.

    loss, metrics = policy_loss("aepo", log_prob, old_log_prob, advantages, response_mask)

Every loss is one function registered with `@register_policy_loss(name)`: it receives a
`PolicyLossInputs` (validated float32 tensors, the ratio r = pi_theta / pi_old, the clip widths)
plus its own keyword options, and returns a per-token loss matrix [B, T] and extra metrics.
`policy_loss` validates the inputs, calls it, aggregates with `agg_loss` and adds the metrics
shared by all losses. Masked tokens (response_mask == 0) are replaced by neutral values before
any arithmetic, so whatever they hold (even NaN) never reaches the loss or the gradient.

Notation: r = exp(clamp(log pi_theta - log pi_old, -20, 20)), A the advantage, eps_l / eps_h the
lower / upper clip widths, c the dual-clip constant, sg the stop-gradient. The "gradient factor"
of a token is f in  d(loss_t)/d(log pi_theta) = -A * f.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from aepo.registry import Registry

__all__ = [
    "AGG_MODES",
    "POLICY_LOSS_REGISTRY",
    "PolicyLossInputs",
    "PolicyLossSpec",
    "agg_loss",
    "clipped_token_mask",
    "get_policy_loss_fn",
    "loss_options",
    "policy_loss",
    "policy_loss_config",
    "policy_loss_names",
    "register_policy_loss",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------- aggregation


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    batch_num_tokens: float | torch.Tensor | None = None,
    batch_num_seqs: float | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Aggregate a per-token loss [B, T] into a scalar, following verl's `agg_loss`.

    token-mean:              sum_{i,t} m_it L_it / sum_{i,t} m_it
    seq-mean-token-mean:     (1 / B') sum_i [ sum_t m_it L_it / sum_t m_it ]
    seq-mean-token-sum:      (1 / B') sum_i sum_t m_it L_it
    seq-mean-token-sum-norm: (1 / B') sum_i sum_t m_it L_it / T   (Dr.GRPO's constant normaliser)

    B' = number of rows with at least one valid token (fully masked rows are left out of the
    mean, as current verl does). T = mask.shape[-1] unless `loss_scale_factor` is given (set it
    to the maximum response length so the normaliser stays constant, as Dr.GRPO does).
    For gradient accumulation over micro-batches pass the totals of the whole mini-batch as
    `batch_num_tokens` (token-mean) / `batch_num_seqs` (seq-mean-*): the micro-batch losses then
    sum to the mini-batch loss. A batch with no valid token gives 0 with a zero gradient.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid: {', '.join(AGG_MODES)}")
    if loss_mat.shape != mask.shape or loss_mat.ndim != 2:
        raise ValueError(
            f"loss_mat shape {tuple(loss_mat.shape)} and mask shape {tuple(mask.shape)} "
            "must be equal and [B, T]"
        )
    valid = mask.bool()
    zeros = torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device)
    masked = torch.where(valid, loss_mat, zeros)
    if mode == "token-mean":
        denom = valid.sum() if batch_num_tokens is None else batch_num_tokens
        return masked.sum() / _at_least_one(denom, loss_mat)
    scale = 1.0
    if mode == "seq-mean-token-sum-norm":
        scale = float(mask.shape[-1]) if loss_scale_factor is None else float(loss_scale_factor)
        if scale <= 0:
            raise ValueError(f"loss_scale_factor must be > 0, got {loss_scale_factor}")
    row_tokens = valid.sum(dim=-1).to(loss_mat.dtype)
    row_loss = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        row_loss = row_loss / row_tokens.clamp(min=1)
    n_rows = (row_tokens > 0).sum() if batch_num_seqs is None else batch_num_seqs
    return row_loss.sum() / _at_least_one(n_rows, loss_mat) / scale


def _at_least_one(count: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A count as a tensor of `like`'s dtype and device, floored at 1 (empty batches give 0, not NaN)."""
    return torch.as_tensor(count, device=like.device).to(like.dtype).clamp(min=1)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class PolicyLossInputs:
    """What a registered loss receives. All tensors are [B, T] float32 on one device, with
    masked entries replaced by neutral values (log-probs 0, advantage 0, so r = 1)."""

    log_prob: torch.Tensor  # log pi_theta, carries the gradient
    old_log_prob: torch.Tensor  # log pi_old
    advantages: torch.Tensor  # A
    mask: torch.Tensor  # bool, True on trained tokens
    log_ratio: torch.Tensor  # clamp(log_prob - old_log_prob, -20, 20)
    ratio: torch.Tensor  # r = exp(log_ratio)
    clip_low: float  # eps_l
    clip_high: float  # eps_h
    clip_c: float  # c, dual clip


LossFn = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class PolicyLossSpec:
    """A registered loss: its function, the upper clip width it uses by default, and where its
    settings come from in a run config: `config` maps a `policy_loss` argument (`clip_low`,
    `clip_high`, or one of the function's keyword-only options) to the `actor.*` field holding it."""

    fn: LossFn
    default_clip_high: float
    config: Mapping[str, str] = field(default_factory=dict)


POLICY_LOSS_REGISTRY: Registry[PolicyLossSpec] = Registry("policy loss", sort=True)


def register_policy_loss(
    name: str, *, clip_high: float = 0.2, config: Mapping[str, str] | None = None
) -> Callable[[LossFn], LossFn]:
    """Decorator: make `fn(inputs: PolicyLossInputs, **opts) -> (loss_mat [B, T], metrics)`
    available as `name`; `clip_high` is the upper clip width used when the caller passes None;
    `config` maps its options to `actor.*` fields (`policy_loss_config`)."""

    def decorator(fn: LossFn) -> LossFn:
        POLICY_LOSS_REGISTRY.register(name, PolicyLossSpec(fn=fn, default_clip_high=clip_high, config=dict(config or {})),
                                      same=lambda old, new: old.fn is new.fn)
        return fn

    return decorator


_COMMON_CONFIG = {"clip_low": "clip_ratio_low", "clip_high": "clip_ratio_high", "clip_c": "clip_ratio_c",
                  "agg": "loss_agg_mode"}


def policy_loss_config(actor: Any) -> dict[str, Any]:
    """The keyword arguments of `policy_loss(actor.policy_loss, ...)` from an actor config:
    the clip widths and aggregation mode, the loss's own options from the `actor.*` fields its
    registration names, then `actor.policy_loss_options` (options with no field of their own).
    Runtime inputs a loss declares (such as clip_cov's `generator`) are the caller's to add.
    ValueError names an option the loss does not take."""
    spec = _get_spec(actor.policy_loss)
    kw = {opt: getattr(actor, key) for opt, key in {**_COMMON_CONFIG, **spec.config}.items()}
    extra = dict(getattr(actor, "policy_loss_options", None) or {})
    allowed = _loss_options(spec.fn)
    unknown = sorted(set(extra) - set(allowed))
    if unknown:
        raise ValueError(f"actor.policy_loss_options: loss {actor.policy_loss!r} has no option(s) {unknown}; "
                         f"its options: {allowed or 'none'}")
    return {**kw, **extra}


def policy_loss_names() -> list[str]:
    """Names accepted by `policy_loss`."""
    return POLICY_LOSS_REGISTRY.names()


def get_policy_loss_fn(name: str) -> LossFn:
    """The registered loss function `name`; ValueError listing the valid names otherwise."""
    return _get_spec(name).fn


def _get_spec(name: str) -> PolicyLossSpec:
    return POLICY_LOSS_REGISTRY.get(name)


# ----------------------------------------------------------------------------- shared pieces


def _frac(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of valid tokens where `flags` holds (0 when there is no valid token)."""
    return (flags & mask).sum().float() / mask.sum().clamp(min=1).float()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1).float()


def _scaled_ratio(ratio: torch.Tensor, bound: float) -> torch.Tensor:
    """bound * r / sg(r): forward value `bound`, gradient wrt log pi equal to `bound`."""
    return bound * ratio / ratio.detach()


def _clipped_surrogate(
    inp: PolicyLossInputs, clipped_ratio: torch.Tensor, dual_clip: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate with a given clipped ratio (whose gradient may differ).

    L1 = -A r,  L2 = -A r_clip,  L = max(L1, L2);  dual clip for A < 0: L = min(L, -A c).
    Returns (loss_mat, clipped-branch flags).
    """
    a, r = inp.advantages, inp.ratio
    l1 = -a * r
    l2 = -a * clipped_ratio
    use_clip = l2 > l1
    loss = torch.where(use_clip, l2, l1)
    if dual_clip:
        l3 = -a * inp.clip_c
        loss = torch.where((a < 0) & (loss > l3), l3, loss)
    return loss, use_clip


def _clip_flags(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps_l: float, eps_h: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper, lower) clip flags: A > 0 and r > 1 + eps_h; A < 0 and r < 1 - eps_l (valid tokens)."""
    upper = mask & (advantages > 0) & (ratio > 1.0 + eps_h)
    lower = mask & (advantages < 0) & (ratio < 1.0 - eps_l)
    return upper, lower


def clipped_token_mask(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> torch.Tensor:
    """Bool [B, T]: the valid tokens whose ratio left [1 - eps_l, 1 + eps_h] on the side where
    clipping applies, i.e. (A > 0 and r > 1 + eps_h) or (A < 0 and r < 1 - eps_l), with r
    computed as `policy_loss` does. These are the tokens counted by the metrics
    clipfrac_upper and clipfrac_lower (dual-clipped tokens, A < 0 and r > c, are not included).
    Computed without gradient.
    """
    _check_inputs(
        log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, response_mask=response_mask
    )
    with torch.no_grad():
        mask = (response_mask != 0).to(log_prob.device)
        zero = torch.zeros((), dtype=torch.float32, device=log_prob.device)
        logp = torch.where(mask, log_prob.detach().float(), zero)
        old = torch.where(mask, old_log_prob.to(log_prob.device).float(), zero)
        adv = torch.where(mask, advantages.detach().to(log_prob.device).float(), zero)
        ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        upper, lower = _clip_flags(ratio, adv, mask, float(clip_low), float(clip_high))
    return upper | lower


# ----------------------------------------------------------------------------- losses


@register_policy_loss("ppo")
def ppo_loss(inp: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clip with dual clip (verl's compute_policy_loss_vanilla).

    L = max(-A r, -A clip(r, 1 - eps_l, 1 + eps_h)); for A < 0: L = min(L, -A c).
    Gradient factor: r inside the trust region, 0 where a clip is active.
    """
    clipped = inp.ratio.clamp(1.0 - inp.clip_low, 1.0 + inp.clip_high)
    loss, use_clip = _clipped_surrogate(inp, clipped)
    return loss, {"clipfrac": _frac(use_clip, inp.mask)}


@register_policy_loss("dapo", clip_high=0.28)
def dapo_loss(inp: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO: the PPO formula with clip-higher (eps_l = 0.2, eps_h = 0.28 by default), meant to be
    aggregated with token-mean. Dynamic sampling and overlong shaping live outside the loss."""
    return ppo_loss(inp)


@register_policy_loss("gppo")
def gppo_loss(inp: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GPPO: PPO whose clip bounds keep a bounded gradient.

    L = max(-A r, -A r_hat), r_hat = (1 + eps_h) r / sg(r) if r > 1 + eps_h,
    (1 - eps_l) r / sg(r) if r < 1 - eps_l, r otherwise; dual clip min(L, -A c) for A < 0.
    Forward equals PPO's. Gradient factor: (1 + eps_h) for A > 0, r > 1 + eps_h;
    (1 - eps_l) for A < 0, r < 1 - eps_l; 0 for A < 0, r > c; r otherwise.
    """
    r = inp.ratio
    hi, lo = 1.0 + inp.clip_high, 1.0 - inp.clip_low
    clipped = torch.where(r > hi, _scaled_ratio(r, hi), torch.where(r < lo, _scaled_ratio(r, lo), r))
    loss, use_clip = _clipped_surrogate(inp, clipped)
    return loss, {"clipfrac": _frac(use_clip, inp.mask)}


@register_policy_loss("cispo", config={"clip_low": "cispo_clip_low", "clip_high": "cispo_clip_high"})
def cispo_loss(inp: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: clipped importance-sampling weight under a stop-gradient; no token is dropped.

    L = -sg(clip(r, 1 - eps_l, 1 + eps_h)) * A * log pi_theta.
    clip_low / clip_high are the IS-weight clip widths (eps_l^IS, eps_h^IS).
    Gradient factor: clip(r, 1 - eps_l, 1 + eps_h).
    """
    weight = inp.ratio.clamp(1.0 - inp.clip_low, 1.0 + inp.clip_high).detach()
    loss = -weight * inp.advantages * inp.log_prob
    return loss, {"cispo_clipfrac": _frac(weight != inp.ratio.detach(), inp.mask)}


@register_policy_loss("aepo")
def aepo_loss(inp: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AEPO entropy-balanced clipping.

    L = -min(r A, clip(r, 1 - eps_l, (1 + eps_h) r / sg(r)) A), dual clip min(L, -A c) for A < 0.
    Forward equals PPO's. Gradient factor: (1 + eps_h) when r > 1 + eps_h and A > 0 (PPO: 0);
    0 when r < 1 - eps_l and A < 0; 0 when A < 0 and r > c; r otherwise.
    """
    r = inp.ratio
    hi, lo = 1.0 + inp.clip_high, 1.0 - inp.clip_low
    clipped = torch.where(r > hi, _scaled_ratio(r, hi), r.clamp(min=lo))
    loss, use_clip = _clipped_surrogate(inp, clipped)
    return loss, {"clipfrac": _frac(use_clip, inp.mask)}


@register_policy_loss("clip_cov", config={"clip_ratio": "clip_cov_ratio", "clip_cov_lb": "clip_cov_lb",
                                          "clip_cov_ub": "clip_cov_ub"})
def clip_cov_loss(
    inp: PolicyLossInputs,
    *,
    clip_ratio: float = 0.0002,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clip-Cov (Cui et al. 2025), as verl's compute_policy_loss_clip_cov.

    Cov_t = (A_t - mean A) (log pi_t - mean log pi) over valid tokens (means masked, detached).
    Among valid tokens not already clipped by PPO (-A clip(r) > -A r) with
    clip_cov_lb < Cov_t < clip_cov_ub, max(1, floor(clip_ratio * #valid)) are drawn uniformly
    at random (`generator` makes it reproducible) and their loss is multiplied by 0 (value and
    gradient). L = max(-A r, -A clip(r, 1 - eps_l, 1 + eps_h)) * corr; no dual clip.
    """
    if not clip_ratio > 0:
        raise ValueError(f"clip_cov: clip_ratio must be > 0, got {clip_ratio}")
    a, r, mask = inp.advantages, inp.ratio, inp.mask
    l1 = -a * r
    l2 = -a * r.clamp(1.0 - inp.clip_low, 1.0 + inp.clip_high)
    clipped_by_ppo = (l2 > l1) & mask
    logp = inp.log_prob.detach()
    cov = (a.detach() - _masked_mean(a.detach(), mask)) * (logp - _masked_mean(logp, mask))
    candidates = mask & ~clipped_by_ppo & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    corr = torch.ones_like(a)
    n_valid = int(mask.sum().item())
    idx = torch.nonzero(candidates)
    if n_valid > 0 and idx.shape[0] > 0:
        clip_num = max(int(clip_ratio * n_valid), 1)
        perm_device = generator.device if generator is not None else torch.device("cpu")
        perm = torch.randperm(idx.shape[0], generator=generator, device=perm_device).to(idx.device)
        chosen = idx[perm[: min(clip_num, idx.shape[0])]]
        corr[chosen[:, 0], chosen[:, 1]] = 0.0
    loss = torch.maximum(l1, l2) * corr
    return loss, {"clipfrac": _frac(clipped_by_ppo, mask), "clip_cov_frac": _frac(corr == 0, mask)}


@register_policy_loss("kl_cov", config={"kl_cov_ratio": "kl_cov_ratio", "ppo_kl_coef": "kl_cov_coef"})
def kl_cov_loss(
    inp: PolicyLossInputs, *, kl_cov_ratio: float = 0.002, ppo_kl_coef: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL-Cov (Cui et al. 2025), as verl's compute_policy_loss_kl_cov.

    Cov_t = (A_t - mean A)(log pi_t - mean log pi) over valid tokens (detached). The
    k = max(1, floor(kl_cov_ratio * #valid)) tokens with the largest Cov_t get
    L = -A r + ppo_kl_coef * |log pi_theta - log pi_old|; all others L = -A r. No clipping.
    """
    if not kl_cov_ratio > 0:
        raise ValueError(f"kl_cov: kl_cov_ratio must be > 0, got {kl_cov_ratio}")
    a, r, mask = inp.advantages, inp.ratio, inp.mask
    pg = -a * r
    abs_kl = inp.log_ratio.abs()
    flat_valid = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    penalised = torch.zeros_like(mask)
    if flat_valid.numel() > 0:
        adv_v = a.detach().reshape(-1)[flat_valid]
        logp_v = inp.log_prob.detach().reshape(-1)[flat_valid]
        cov = (adv_v - adv_v.mean()) * (logp_v - logp_v.mean())
        k = max(1, int(flat_valid.numel() * kl_cov_ratio))
        top = torch.topk(cov, min(k, cov.numel()), largest=True).indices
        penalised.view(-1)[flat_valid[top]] = True
    loss = torch.where(penalised, pg + ppo_kl_coef * abs_kl, pg)
    return loss, {"kl_cov_frac": _frac(penalised, mask), "ppo_kl_abs": _masked_mean(abs_kl.detach(), mask)}


# ----------------------------------------------------------------------------- entry point

_AGG_OPTIONS = ("batch_num_tokens", "batch_num_seqs", "loss_scale_factor")


def loss_options(name: str) -> list[str]:
    """The keyword-only options of the registered loss `name`."""
    return _loss_options(_get_spec(name).fn)


def _loss_options(fn: LossFn) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _check_inputs(**tensors: torch.Tensor) -> None:
    shapes = {
        k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in tensors.items()
    }
    if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"policy loss inputs must be tensors, got {shapes}")
    if len(set(shapes.values())) != 1:
        raise ValueError(f"policy loss inputs must share one [B, T] shape, got {shapes}")
    if len(shapes["log_prob"]) != 2:
        raise ValueError(f"policy loss inputs must be 2-D [B, T], got {shapes}")


def policy_loss(
    name: str,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    clip_c: float = 3.0,
    agg: str = "token-mean",
    **opts: object,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The aggregated policy loss `name` (see `policy_loss_names()`) and its metrics.

    clip_high=None uses the loss's own default (0.28 for dapo, 0.2 otherwise). opts are the
    loss's own options (clip_cov: clip_ratio, clip_cov_lb, clip_cov_ub, generator; kl_cov:
    kl_cov_ratio, ppo_kl_coef) and the `agg_loss` totals (batch_num_tokens, batch_num_seqs,
    loss_scale_factor). The loss is a float32 scalar differentiable in `log_prob`.
    Metrics (floats over valid tokens): clipfrac_upper (A > 0, r > 1 + eps_h), clipfrac_lower
    (A < 0, r < 1 - eps_l), clipfrac_dual (A < 0, r > c), ppo_kl (mean of log pi_old - log pi),
    plus the loss's own.
    """
    spec = _get_spec(name)
    allowed = _loss_options(spec.fn)
    unknown = sorted(set(opts) - set(allowed) - set(_AGG_OPTIONS))
    if unknown:
        raise ValueError(
            f"policy loss {name!r} got unknown option(s) {unknown}; valid: {allowed + list(_AGG_OPTIONS)}"
        )
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {agg!r}; valid: {', '.join(AGG_MODES)}")
    _check_inputs(
        log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, response_mask=response_mask
    )
    eps_h = spec.default_clip_high if clip_high is None else float(clip_high)
    eps_l = float(clip_low)
    if eps_l < 0 or eps_h < 0:
        raise ValueError(f"clip widths must be >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if not clip_c > 1.0:
        raise ValueError(f"clip_c (dual-clip constant) must be > 1, got {clip_c}")

    mask = (response_mask != 0).to(log_prob.device)
    zero = torch.zeros((), dtype=torch.float32, device=log_prob.device)
    logp = torch.where(mask, log_prob.float(), zero)
    old = torch.where(mask, old_log_prob.to(log_prob.device).float(), zero)
    adv = torch.where(mask, advantages.to(log_prob.device).float(), zero)
    log_ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    inputs = PolicyLossInputs(
        log_prob=logp, old_log_prob=old, advantages=adv, mask=mask, log_ratio=log_ratio, ratio=ratio,
        clip_low=eps_l, clip_high=eps_h, clip_c=float(clip_c),
    )
    loss_opts = {k: v for k, v in opts.items() if k in allowed}
    agg_opts = {k: v for k, v in opts.items() if k in _AGG_OPTIONS}
    loss_mat, extra = spec.fn(inputs, **loss_opts)
    loss = agg_loss(loss_mat, mask, agg, **agg_opts)

    with torch.no_grad():
        r, a = ratio.detach(), adv.detach()
        upper, lower = _clip_flags(r, a, mask, eps_l, eps_h)
        metric_tensors = {
            "clipfrac_upper": _frac(upper, mask),
            "clipfrac_lower": _frac(lower, mask),
            "clipfrac_dual": _frac((a < 0) & (r > clip_c), mask),
            "ppo_kl": _masked_mean(-log_ratio.detach(), mask),
            **{k: v.detach().float() for k, v in extra.items()},
        }
        values = torch.stack(list(metric_tensors.values())).tolist()
    return loss, dict(zip(metric_tensors, values))
