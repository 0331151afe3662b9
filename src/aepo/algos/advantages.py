"""Outcome-reward advantage estimators (docs/algorithms.md section 4), looked up by name.

Every estimator turns one scalar reward per row into a per-token advantage [B, T] that is
zero on masked tokens. Rows are grouped by `group_ids` (all rollouts of one prompt form a
group). Adding an estimator is adding one function decorated with `@register_advantage(name)`;
it receives an `AdvantageInputs` and its own keyword options.

    adv = compute_advantages("grpo", rewards, group_ids, response_mask)
    adv = compute_advantages("aepo", rewards, group_ids, response_mask, entropy=h, alpha=0.2)

Degenerate cases never give NaN: a group of one row, or a group whose rewards are all equal,
gets advantage 0 (before any batch-level normalisation).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aepo.registry import Registry

__all__ = [
    "ADVANTAGE_REGISTRY",
    "ADVANTAGE_SPECS",
    "AdvantageInputs",
    "AdvantageSpec",
    "advantage_config",
    "advantage_names",
    "advantage_spec",
    "compute_advantages",
    "entropy_shaped_advantage",
    "entropy_zscore",
    "get_advantage_fn",
    "group_index",
    "hard_attribution",
    "per_token_config",
    "register_advantage",
]

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGE_REGISTRY: Registry[AdvantageFn] = Registry("advantage estimator", sort=True)


@dataclass(frozen=True)
class AdvantageSpec:
    """How a trainer runs a registered estimator. `config` maps its keyword-only options to the
    `actor.*` fields holding them. An estimator that needs the current policy's token entropies
    names `per_token`: the trainer then computes the estimator `base` on the whole batch (the
    group part) and applies `per_token(base_adv, entropy, mask, **opts)` with detached
    entropies of the current policy: once over the whole batch (actor.adv_entropy_scope
    "batch"), or inside each micro-batch with that micro-batch's training forward pass ("micro")."""

    config: Mapping[str, str] = field(default_factory=dict)
    base: str | None = None
    per_token: Callable[..., torch.Tensor] | None = None


ADVANTAGE_SPECS: dict[str, AdvantageSpec] = {}


def register_advantage(
    name: str, *, config: Mapping[str, str] | None = None, base: str | None = None,
    per_token: Callable[..., torch.Tensor] | None = None,
) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: make `fn(inputs: AdvantageInputs, **opts) -> Tensor[B, T]` available as `name`;
    `config`, `base` and `per_token` tell a trainer how to run it (`AdvantageSpec`)."""

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_REGISTRY.register(name, fn)
        ADVANTAGE_SPECS[name] = AdvantageSpec(config=dict(config or {}), base=base, per_token=per_token)
        return fn

    return decorator


def advantage_spec(name: str) -> AdvantageSpec:
    get_advantage_fn(name)
    return ADVANTAGE_SPECS[name]


def _options(fn: Callable[..., Any]) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def advantage_config(actor: Any, name: str | None = None) -> dict[str, Any]:
    """The options of estimator `name` (default `actor.adv_estimator`) from an actor config: the
    `actor.*` fields its registration names, then `actor.adv_estimator_options`; only those the
    function takes. ValueError names an option in `adv_estimator_options` it does not take."""
    chosen = actor.adv_estimator
    name = name or chosen
    allowed = _options(get_advantage_fn(name))
    spec = advantage_spec(chosen)
    own = _options(get_advantage_fn(chosen)) + (_per_token_options(spec) if spec.per_token else [])
    unknown = sorted(set(getattr(actor, "adv_estimator_options", None) or {}) - set(own))
    if unknown:
        raise ValueError(f"actor.adv_estimator_options: estimator {chosen!r} has no option(s) {unknown}; "
                         f"its options: {own or 'none'}")
    return _from_config(actor, spec, allowed)


def _from_config(actor: Any, spec: AdvantageSpec, allowed: list[str]) -> dict[str, Any]:
    """The options in `allowed`: from the `actor.*` fields `spec.config` names, then from
    `actor.adv_estimator_options`."""
    kw = {opt: getattr(actor, key) for opt, key in spec.config.items() if opt in allowed}
    extra = getattr(actor, "adv_estimator_options", None) or {}
    return {**kw, **{k: v for k, v in extra.items() if k in allowed}}


def _per_token_options(spec: AdvantageSpec) -> list[str]:
    params = list(inspect.signature(spec.per_token).parameters.values())[3:]  # after (adv, entropy, mask)
    return [p.name for p in params]


def per_token_config(actor: Any) -> dict[str, Any]:
    """The options of the estimator's `per_token` step from an actor config (its `config`
    mapping, then `actor.adv_estimator_options`), for the parameters that step takes."""
    spec = advantage_spec(actor.adv_estimator)
    return _from_config(actor, spec, _per_token_options(spec)) if spec.per_token is not None else {}


def advantage_names() -> list[str]:
    """Names accepted by `compute_advantages`."""
    return ADVANTAGE_REGISTRY.names()


def get_advantage_fn(name: str) -> AdvantageFn:
    """The registered estimator `name`; ValueError listing the valid names otherwise."""
    return ADVANTAGE_REGISTRY.get(name)


@dataclass(frozen=True)
class AdvantageInputs:
    """Validated inputs handed to an estimator.

    rewards: [B] float (float32, or float64 when given float64); group: [B] long, contiguous
    group numbers 0..num_groups-1; mask: [B, T] bool; entropy: [B, T] float32 detached, or None.
    """

    rewards: torch.Tensor
    group: torch.Tensor
    num_groups: int
    mask: torch.Tensor
    entropy: torch.Tensor | None


def group_index(
    group_ids: torch.Tensor | Sequence[Hashable], device: torch.device | str | None = None
) -> tuple[torch.Tensor, int]:
    """Map group ids (a tensor or a list of hashables, e.g. prompt uids) to 0..G-1 in order of
    first appearance. Returns (index LongTensor [B], G)."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.ndim != 1:
            raise ValueError(f"group_ids must be 1-D [B], got shape {tuple(group_ids.shape)}")
        if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex:
            raise ValueError(f"group_ids tensor must hold integers, got {group_ids.dtype}")
        device = device if device is not None else group_ids.device
        group_ids = group_ids.tolist()
    seen: dict[Hashable, int] = {}
    try:
        remap = [seen.setdefault(g, len(seen)) for g in group_ids]
    except TypeError as e:
        raise ValueError(f"group_ids must be a 1-D tensor or a list of hashables: {e}") from None
    return torch.tensor(remap, dtype=torch.long, device=device), len(seen)


# ----------------------------------------------------------------------------- group statistics


@dataclass(frozen=True)
class _GroupStats:
    """Per-row statistics of the row's group."""

    centered: torch.Tensor  # R_i - mean_g, forced to 0 for degenerate groups
    std: torch.Tensor  # unbiased std of the group (0 for a group of one)
    count: torch.Tensor  # rows in the group


def _group_stats(rewards: torch.Tensor, group: torch.Tensor, num_groups: int) -> _GroupStats:
    """Mean, unbiased std and size of each row's group; groups of one or with all-equal rewards
    get `centered` exactly 0 (floating-point means would otherwise leave ~1e-8 residues)."""
    zeros = rewards.new_zeros(num_groups)
    count = zeros.index_add(0, group, torch.ones_like(rewards))
    mean = zeros.index_add(0, group, rewards) / count.clamp(min=1)
    dev = rewards - mean[group]
    var = zeros.index_add(0, group, dev * dev) / (count - 1).clamp(min=1)
    gmax = torch.full_like(zeros, -float("inf")).scatter_reduce(0, group, rewards, "amax")
    gmin = torch.full_like(zeros, float("inf")).scatter_reduce(0, group, rewards, "amin")
    degenerate = (count[group] < 2) | (gmax[group] == gmin[group])
    centered = torch.where(degenerate, torch.zeros_like(dev), dev)
    return _GroupStats(centered=centered, std=var.sqrt()[group], count=count[group])


def _to_tokens(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast [B] to [B, T], exactly 0 on masked tokens."""
    return torch.where(mask, per_row.unsqueeze(-1), torch.zeros((), dtype=per_row.dtype, device=mask.device))


def _grpo_per_row(inp: AdvantageInputs, norm_by_std: bool, epsilon: float) -> torch.Tensor:
    stats = _group_stats(inp.rewards, inp.group, inp.num_groups)
    if not norm_by_std:
        return stats.centered
    return stats.centered / (stats.std + epsilon)


# ----------------------------------------------------------------------------- estimators


@register_advantage("grpo", config={"norm_by_std": "norm_adv_by_std_in_grpo"})
def grpo_advantage(inp: AdvantageInputs, *, norm_by_std: bool = True, epsilon: float = 1e-6) -> torch.Tensor:
    """GRPO group-normalised outcome advantage, broadcast to response tokens.

    A_i = (R_i - mean_{j in g(i)} R_j) / (std_{j in g(i)} R_j + epsilon),  std unbiased (n - 1).
    `norm_by_std=False` is Dr.GRPO: A_i = R_i - mean_g R. Groups of one row or with all-equal
    rewards give A_i = 0 (verl gives a lone row R_i / (1 + epsilon); a lone row has no baseline,
    so `aepo` gives it no signal).
    """
    return _to_tokens(_grpo_per_row(inp, norm_by_std, epsilon), inp.mask)


@register_advantage("rloo")
def rloo_advantage(inp: AdvantageInputs) -> torch.Tensor:
    """RLOO leave-one-out baseline: A_i = R_i - (1 / (n - 1)) sum_{j != i, j in g(i)} R_j
    = n / (n - 1) (R_i - mean_g R). A group of one row gives 0."""
    stats = _group_stats(inp.rewards, inp.group, inp.num_groups)
    scale = stats.count / (stats.count - 1).clamp(min=1)
    return _to_tokens(stats.centered * scale, inp.mask)


def _masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """verl's masked_whiten over all valid tokens of the batch, times the mask:
    (x - mu) / sqrt(var + eps), mu = masked mean, var = masked mean of (x - mu)^2 * n / (n - 1).
    Fewer than 2 valid tokens (where verl raises) gives 0."""
    m = mask.to(values.dtype)
    n = m.sum()
    mu = (values * m).sum() / n.clamp(min=1)
    var = (((values - mu) * m) ** 2).sum() / (n - 1).clamp(min=1)
    whitened = (values - mu) * torch.rsqrt(var + eps)
    return torch.where(mask & (n >= 2), whitened, torch.zeros_like(whitened))


@register_advantage("reinforce_pp")
def reinforce_pp_advantage(inp: AdvantageInputs) -> torch.Tensor:
    """REINFORCE++ with a group baseline (verl's reinforce_plus_plus_baseline).

    a_{i,t} = (R_i - mean_g R) for valid tokens (group of one -> 0; verl keeps R_i), then whitened over all
    valid tokens of the batch (token-weighted, so longer responses weigh more):
    A_{i,t} = (a_{i,t} - mu) / sqrt(sigma^2 + 1e-8),  mu, sigma^2 = masked mean and unbiased
    masked variance of a over the batch; 0 on masked tokens.
    """
    stats = _group_stats(inp.rewards, inp.group, inp.num_groups)
    return _masked_whiten(_to_tokens(stats.centered, inp.mask), inp.mask)


def entropy_zscore(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z(H_t) = (H_t - mean) / std over the valid tokens (mean, unbiased std), H detached;
    0 on masked tokens, and everywhere when there are < 2 valid tokens or all H are equal."""
    valid = mask.bool()
    h = torch.where(valid, entropy.detach().float(), torch.zeros((), device=entropy.device))
    n = valid.sum()
    mean = h.sum() / n.clamp(min=1)
    dev = torch.where(valid, h - mean, torch.zeros_like(h))
    std = ((dev * dev).sum() / (n - 1).clamp(min=1)).sqrt()
    hmax = torch.where(valid, h, torch.full_like(h, -float("inf"))).max()
    hmin = torch.where(valid, h, torch.full_like(h, float("inf"))).min()
    ok = (n >= 2) & (hmax > hmin) & (std > 0)
    z = dev / torch.where(ok, std, torch.ones_like(std))
    return torch.where(valid & ok, z, torch.zeros_like(z))


def aepo_advantage(
    inp: AdvantageInputs, *, alpha: float = 0.2, norm_by_std: bool = True, epsilon: float = 1e-6
) -> torch.Tensor:
    """AEPO entropy-aware advantage.

    A~_{i,t} = A_i * (1 + alpha_H * z(H_{i,t})),  A_i the GRPO advantage, z the z-score of the
    detached token entropy over the valid tokens of the batch given (unbiased std; z = 0 when
    the std is 0 or there are fewer than 2 valid tokens). Needs `entropy` [B, T], which should
    be the current policy's. This one-shot form z-scores over whatever batch it is given:
    `RLTrainer` with actor.adv_entropy_scope "batch" (default) applies `entropy_shaped_advantage`
    to the whole batch, "micro" inside each micro-batch's loss (docs/algorithms.md section 4);
    the verl adapter calls this form with the entropies verl computed for pi_old over its whole
    batch (docs/algorithms.md section 1.1).
    """
    if inp.entropy is None:
        raise ValueError("advantage 'aepo' needs entropy=[B, T] token entropies of the current policy")
    base = _to_tokens(_grpo_per_row(inp, norm_by_std, epsilon), inp.mask)
    return entropy_shaped_advantage(base, inp.entropy, inp.mask, alpha)


def entropy_shaped_advantage(
    base_adv: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, alpha: float = 0.2
) -> torch.Tensor:
    """The entropy factor of the AEPO advantage (docs/algorithms.md section 4), applied to a given
    advantage: A~_t = A_t * (1 + alpha * z(H_t)), z = `entropy_zscore` over the valid tokens of
    `mask` (so over whatever batch the caller passes: the trainer passes the whole batch, or one
    micro-batch of the training forward pass as the released actor does). `entropy` is detached; the result has
    `base_adv`'s dtype and is exactly 0 on masked tokens. All tensors [B, T].
    """
    if not (base_adv.shape == entropy.shape == mask.shape) or base_adv.ndim != 2:
        raise ValueError(
            f"base_adv {tuple(base_adv.shape)}, entropy {tuple(entropy.shape)} and mask "
            f"{tuple(mask.shape)} must share one [B, T] shape"
        )
    valid = mask.bool()
    z = entropy_zscore(entropy, valid).to(device=base_adv.device, dtype=base_adv.dtype)
    shaped = base_adv * (1.0 + alpha * z)
    return torch.where(valid.to(base_adv.device), shaped, torch.zeros_like(shaped))


# AEPO in a trainer: the GRPO part on the whole batch, then the entropy factor (over the batch,
# or per micro-batch with actor.adv_entropy_scope "micro")
register_advantage("aepo", config={"alpha": "entropy_adv_alpha", "norm_by_std": "norm_adv_by_std_in_grpo"},
                   base="grpo", per_token=entropy_shaped_advantage)(aepo_advantage)


# ----------------------------------------------------------------------------- tree rollouts


def hard_attribution(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    parent: torch.Tensor | Sequence[int | None],
    branch_position: torch.Tensor | Sequence[int | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """"Hard" credit for tree rollouts: each physical token is trained once, with the mean
    advantage of all rows that contain it.

    Row i forked from row parent[i] (a batch index; None or -1 for a root) at response offset
    branch_position[i], so its tokens t < branch_position[i] are its parent's tokens (and, going
    up, possibly an older ancestor's). Responses must be aligned at offset 0. For a token owned by
    row o at offset t, with S = {rows whose token t resolves to (o, t)}:
        A'_{o,t} = (1 / |S|) sum_{j in S} A_{j,t},  and the copies j != o get mask 0.
    Returns (advantages [B, T], response_mask [B, T] as float32), both 0 on dropped copies.
    """
    if advantages.shape != response_mask.shape or advantages.ndim != 2:
        raise ValueError(
            f"advantages shape {tuple(advantages.shape)} and response_mask shape "
            f"{tuple(response_mask.shape)} must be equal [B, T]"
        )
    B, T = advantages.shape
    device = advantages.device
    par = torch.tensor([-1 if p is None else int(p) for p in parent], dtype=torch.long, device=device)
    pos = torch.tensor([0 if b is None else int(b) for b in branch_position], dtype=torch.long, device=device)
    if par.shape != (B,) or pos.shape != (B,):
        raise ValueError(
            f"parent {tuple(par.shape)} and branch_position {tuple(pos.shape)} must be [B] = ({B},)"
        )
    if ((par < -1) | (par >= B)).any() or (par == torch.arange(B, device=device)).any():
        raise ValueError(
            f"parent entries must be -1/None or another row index in [0, {B}), got {par.tolist()}"
        )
    t = torch.arange(T, device=device).expand(B, T)
    owner = torch.arange(B, device=device).unsqueeze(-1).expand(B, T).clone()
    for _ in range(B + 1):  # each pass climbs one level of the tree
        up = (par[owner] >= 0) & (t < pos[owner])
        if not bool(up.any()):
            break
        owner = torch.where(up, par[owner], owner)
    else:
        raise ValueError("parent links contain a cycle")
    valid = response_mask.bool()
    adv = advantages.float()
    key = (owner * T + t)[valid]
    total = torch.zeros(B * T, dtype=adv.dtype, device=device).index_add(0, key, adv[valid])
    count = torch.zeros(B * T, dtype=adv.dtype, device=device).index_add(0, key, torch.ones_like(adv[valid]))
    mean = (total / count.clamp(min=1)).view(B, T)
    own = valid & (owner == torch.arange(B, device=device).unsqueeze(-1))
    out = torch.where(own, mean, torch.zeros_like(mean))
    return out, own.float()


# ----------------------------------------------------------------------------- entry point


def _check_options(name: str, fn: AdvantageFn, opts: dict) -> None:
    allowed = _options(fn)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(
            f"advantage {name!r} got unknown option(s) {unknown}; valid: {allowed or 'none'}"
        )


def compute_advantages(
    name: str,
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[Hashable],
    response_mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    **opts: object,
) -> torch.Tensor:
    """Per-token advantages [B, T] (0 on masked tokens) from per-row rewards [B].

    name: a registered estimator (`advantage_names()`: grpo, rloo, reinforce_pp, aepo).
    group_ids: [B] LongTensor or list of hashables; rows with equal ids form one group.
    entropy: [B, T] token entropies (needed by 'aepo', ignored by the others; never
    differentiated). opts: the estimator's own options (e.g. norm_by_std, epsilon, alpha).
    Output dtype float32 (float64 when rewards are float64), on `response_mask`'s device.
    """
    fn = get_advantage_fn(name)
    _check_options(name, fn, opts)
    if not isinstance(response_mask, torch.Tensor) or response_mask.ndim != 2:
        shape = tuple(response_mask.shape) if isinstance(response_mask, torch.Tensor) else type(response_mask)
        raise ValueError(f"response_mask must be a [B, T] tensor, got {shape}")
    device = response_mask.device
    rewards_t = torch.as_tensor(rewards, device=device)
    if rewards_t.ndim != 1 or rewards_t.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"rewards shape {tuple(rewards_t.shape)} does not match response_mask shape "
            f"{tuple(response_mask.shape)}: expected [B] with B = {response_mask.shape[0]}"
        )
    dtype = torch.float64 if rewards_t.dtype == torch.float64 else torch.float32
    rewards_t = rewards_t.to(dtype)
    if not bool(torch.isfinite(rewards_t).all()):
        raise ValueError("rewards contain NaN or inf")
    group, num_groups = group_index(group_ids, device=device)
    if group.shape != rewards_t.shape:
        raise ValueError(
            f"group_ids shape {tuple(group.shape)} does not match rewards shape {tuple(rewards_t.shape)}"
        )
    ent = None
    if entropy is not None:
        if not isinstance(entropy, torch.Tensor) or entropy.shape != response_mask.shape:
            eshape = tuple(entropy.shape) if isinstance(entropy, torch.Tensor) else type(entropy)
            raise ValueError(f"entropy shape {eshape} != response_mask shape {tuple(response_mask.shape)}")
        ent = entropy.detach().to(device=device, dtype=torch.float32)
    inputs = AdvantageInputs(
        rewards=rewards_t, group=group, num_groups=num_groups, mask=response_mask.bool(), entropy=ent
    )
    return fn(inputs, **opts)
