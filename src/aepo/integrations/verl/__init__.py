"""Register `aepo`'s policy losses and advantage estimators in verl's registries.

verl (Ray + FSDP/Megatron + vLLM/SGLang) looks policy losses up by
`actor_rollout_ref.actor.policy_loss.loss_mode` and advantage estimators by
`algorithm.adv_estimator` in `verl.trainer.ppo.core_algos`. `register()` adds:

    policy losses          aepo (entropy-balanced clipping), gppo, aepo_cispo (CISPO)
    advantage estimators   aepo_grpo (GRPO), aepo_entropy (AEPO entropy-aware advantage)

Every registered function is a thin adapter: it reads verl's arguments and config and calls
`aepo.algos.policy_loss` / `aepo.algos.compute_advantages`, so the numbers are exactly
aepo's. verl is imported only inside `register()`; importing this module never needs it.

verl conventions handled here:
- Loss config: `clip_ratio_low` / `clip_ratio_high` (None falls back to `clip_ratio`),
  `clip_ratio_c` (dual clip), `global_batch_info` (`dp_size`, `batch_num_tokens`,
  `global_batch_size`, `loss_scale_factor`: the loss is normalised by the global batch and
  multiplied by `dp_size`, as verl's `agg_loss` does).
- Rollout correction: `rollout_is_weights` (newer verl) and truncated IS from
  `rollout_log_probs` with `tis_imp_ratio_cap > 0` (older verl) multiply the per-token loss.
  For these three losses that equals multiplying the advantage by the (non-negative) weight,
  which is how it is applied (so the clip-fraction metrics count a zero-weight token as A = 0).
- Return value: older verl expects `(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)`,
  newer verl `(pg_loss, metrics_dict)`; `register()` detects which (`detect_return_style`).
- Advantages: verl passes `token_level_rewards` [B, T] (summed to one reward per row),
  `response_mask`, `index` (group uids) and `config` (`norm_adv_by_std_in_grpo`); aepo's
  trainer modes add the keyword `aepo_entropy_alpha`. Token entropies for `aepo_entropy` come from the keyword
  `entropys` (verl's name for them), `entropy`, or `batch["entropys"]`.

Ray: verl runs its trainer loop and its actor workers in separate Ray processes, each with its
own registries, so registration must run in every process. Ray's setup hook does that:
`+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=aepo.integrations.verl.trainer.register`
(this module's `register` alone is enough where only the losses and estimators are used).
"""
from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import torch

from aepo.algos import compute_advantages, policy_loss

__all__ = [
    "ADV_ESTIMATOR_NAMES",
    "ENTROPY_ALPHA_ENV",
    "POLICY_LOSS_NAMES",
    "ReturnStyle",
    "aepo_entropy_advantage",
    "aepo_grpo_advantage",
    "detect_return_style",
    "register",
    "verl_advantage_fn",
    "verl_policy_loss_fn",
]

ReturnStyle = Literal["dict", "tuple"]

# verl name -> aepo.algos policy loss name
_LOSS_TARGETS = {"aepo": "aepo", "gppo": "gppo", "aepo_cispo": "cispo"}
POLICY_LOSS_NAMES: tuple[str, ...] = tuple(_LOSS_TARGETS)
ADV_ESTIMATOR_NAMES: tuple[str, ...] = ("aepo_grpo", "aepo_entropy")

ENTROPY_ALPHA_ENV = "AEPO_ENTROPY_ALPHA"
DEFAULT_ENTROPY_ALPHA = 0.2
_ENTROPY_KWARGS = ("entropys", "entropy")
_GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")

_INSTALL_HINT = (
    "aepo.integrations.verl needs verl, which is not installed: `pip install verl` "
    "(or `pip install aepo[verl]`), then call register() again"
)


@dataclass
class _Settings:
    """Process-wide options set by `register()` and read by the registered functions."""

    return_style: ReturnStyle = "dict"
    entropy_alpha: float | None = None


_SETTINGS = _Settings()


# ----------------------------------------------------------------------------- config access


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg.key` for verl's config objects (dataclass ActorConfig/AlgoConfig, omegaconf
    DictConfig, plain dict); `default` when absent or None. `key` may be a dotted path."""
    if "." in key:
        for part in key.split("."):
            cfg = _cfg_get(cfg, part)
        return default if cfg is None else cfg
    if cfg is None:
        return default
    getter = cfg.get if isinstance(cfg, Mapping) else getattr(cfg, "get", None)
    if callable(getter):
        try:
            value = getter(key, None)
        except Exception:  # noqa: BLE001 - a structured config that refuses the key
            value = getattr(cfg, key, None)
    else:
        value = getattr(cfg, key, None)
    return default if value is None else value


def _clip_widths(config: Any) -> tuple[float, float, float]:
    """(eps_l, eps_h, c) from an actor config, with verl's fallbacks."""
    base = _cfg_get(config, "clip_ratio", 0.2)
    return (
        float(_cfg_get(config, "clip_ratio_low", base)),
        float(_cfg_get(config, "clip_ratio_high", base)),
        float(_cfg_get(config, "clip_ratio_c", 3.0)),
    )


def _aggregation_options(config: Any) -> tuple[dict[str, Any], Any]:
    """(`agg_loss` totals, loss multiplier) from verl's `config.global_batch_info`.

    verl's agg_loss computes sum / global_count * dp_size for every mode (global_count = tokens
    for token-mean, rows for the seq-mean modes), and seq-mean-token-sum-norm then divides by
    loss_scale_factor.
    """
    info = _cfg_get(config, "global_batch_info", None) or {}
    info = dict(info.items()) if hasattr(info, "items") else {}
    unknown = sorted(k for k, v in info.items() if v is not None and k not in _GLOBAL_BATCH_KEYS)
    if unknown:
        warnings.warn(
            f"aepo verl losses ignore global_batch_info entries {unknown}; "
            f"understood: {list(_GLOBAL_BATCH_KEYS)}",
            stacklevel=3,
        )
    opts: dict[str, Any] = {}
    if info.get("batch_num_tokens") is not None:
        opts["batch_num_tokens"] = info["batch_num_tokens"]
    if info.get("global_batch_size") is not None:
        opts["batch_num_seqs"] = info["global_batch_size"]
    scale_factor = info.get("loss_scale_factor")
    if scale_factor is None:
        scale_factor = _cfg_get(config, "loss_scale_factor", None)
    if scale_factor is not None:
        opts["loss_scale_factor"] = scale_factor
    return opts, info.get("dp_size") or 1


def _rollout_weights(
    config: Any,
    old_log_prob: torch.Tensor,
    rollout_log_probs: torch.Tensor | None,
    rollout_is_weights: torch.Tensor | None,
) -> torch.Tensor | None:
    """Per-token loss weights from rollout correction, or None when there is none."""
    weight = None
    if rollout_is_weights is not None:
        weight = rollout_is_weights.detach()
    cap = float(_cfg_get(config, "tis_imp_ratio_cap", -1.0))
    if rollout_log_probs is not None and cap > 0:
        tis = torch.exp(old_log_prob.detach() - rollout_log_probs.detach()).clamp(max=cap)
        weight = tis if weight is None else weight * tis
    return weight


def _weighted_advantages(
    advantages: torch.Tensor, weight: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """A * w; exact for losses that are positively homogeneous in A (aepo, gppo, cispo)."""
    try:
        weight = torch.broadcast_to(weight.to(advantages.device), advantages.shape)
    except RuntimeError:
        raise ValueError(
            f"rollout weights shape {tuple(weight.shape)} does not broadcast to advantages shape "
            f"{tuple(advantages.shape)}"
        ) from None
    if bool(((weight < 0) & (response_mask != 0).to(weight.device)).any()):
        raise ValueError("rollout importance weights must be >= 0 on response tokens")
    return advantages * weight.to(advantages.dtype)


# ----------------------------------------------------------------------------- policy losses


def _to_verl_result(
    loss: torch.Tensor, metrics: dict[str, float], style: ReturnStyle
) -> tuple[Any, ...]:
    """aepo's (loss, metrics) in the installed verl's return convention."""
    pg_clipfrac = metrics.get("clipfrac", metrics.get("cispo_clipfrac", 0.0))
    if style == "tuple":
        def as_tensor(value: float) -> torch.Tensor:
            return torch.tensor(value, dtype=torch.float32, device=loss.device)

        return loss, as_tensor(pg_clipfrac), as_tensor(metrics["ppo_kl"]), as_tensor(metrics["clipfrac_dual"])
    verl_metrics = {
        "actor/pg_clipfrac": pg_clipfrac,
        "actor/ppo_kl": metrics["ppo_kl"],
        "actor/pg_clipfrac_lower": metrics["clipfrac_dual"],
        **{f"actor/aepo/{k}": v for k, v in metrics.items()},
    }
    return loss, verl_metrics


def verl_policy_loss_fn(verl_name: str) -> Callable[..., tuple[Any, ...]]:
    """The verl-signature policy loss registered as `verl_name` (one of POLICY_LOSS_NAMES).

    Signature: (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
    config=None, rollout_log_probs=None, rollout_is_weights=None, **extra). Returns verl's
    4-tuple or (loss, metrics) according to the convention `register()` detected.
    """
    if verl_name not in _POLICY_LOSS_FNS:
        raise ValueError(f"unknown aepo verl policy loss {verl_name!r}; valid: {', '.join(POLICY_LOSS_NAMES)}")
    return _POLICY_LOSS_FNS[verl_name]


def _make_policy_loss(verl_name: str) -> Callable[..., tuple[Any, ...]]:
    aepo_name = _LOSS_TARGETS[verl_name]

    def loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_log_probs: torch.Tensor | None = None,
        rollout_is_weights: torch.Tensor | None = None,
        **extra: Any,
    ) -> tuple[Any, ...]:
        ignored = sorted(k for k, v in extra.items() if v is not None)
        if ignored:
            warnings.warn(f"aepo verl loss {verl_name!r} ignores arguments {ignored}", stacklevel=2)
        clip_low, clip_high, clip_c = _clip_widths(config)
        agg_opts, multiplier = _aggregation_options(config)
        weight = _rollout_weights(config, old_log_prob, rollout_log_probs, rollout_is_weights)
        if weight is not None:
            advantages = _weighted_advantages(advantages, weight, response_mask)
        loss, metrics = policy_loss(
            aepo_name, log_prob, old_log_prob, advantages, response_mask,
            clip_low=clip_low, clip_high=clip_high, clip_c=clip_c, agg=loss_agg_mode, **agg_opts,
        )
        if not (isinstance(multiplier, (int, float)) and multiplier == 1):
            loss = loss * multiplier
        return _to_verl_result(loss, metrics, _SETTINGS.return_style)

    loss_fn.__name__ = loss_fn.__qualname__ = f"aepo_verl_policy_loss_{verl_name}"
    loss_fn.__doc__ = f"verl policy loss {verl_name!r}: aepo.algos.policy_loss({aepo_name!r}) with verl's config."
    return loss_fn


_POLICY_LOSS_FNS: dict[str, Callable[..., tuple[Any, ...]]] = {
    name: _make_policy_loss(name) for name in POLICY_LOSS_NAMES
}


# ----------------------------------------------------------------------------- advantages


def _rewards_and_groups(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any, name: str
) -> tuple[torch.Tensor, list[Any] | torch.Tensor]:
    if index is None:
        raise ValueError(
            f"advantage estimator {name!r} needs `index` (the group uid of each row, verl's "
            "non_tensor_batch['uid']); none was passed"
        )
    if token_level_rewards.ndim != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards shape {tuple(token_level_rewards.shape)} must equal response_mask "
            f"shape {tuple(response_mask.shape)} ([B, T])"
        )
    groups = index if isinstance(index, torch.Tensor) else list(index)
    return token_level_rewards.sum(dim=-1), groups


def _find_entropy(kwargs: dict[str, Any]) -> torch.Tensor | None:
    for key in _ENTROPY_KWARGS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    batch = kwargs.get("batch")
    # `in batch.keys()`, not `in batch`: some TensorDict versions refuse `in` on the dict itself
    if batch is not None and hasattr(batch, "keys") and "entropys" in batch.keys():  # noqa: SIM118
        return batch["entropys"]
    return None


def _entropy_alpha(config: Any, given: float | None = None) -> float:
    """alpha_H: the keyword aepo's trainer modes pass (`actor_rollout_ref.rollout.custom.aepo.
    entropy_alpha`), else config `aepo_entropy_alpha` (a plain dict config; verl's own algorithm
    config refuses unknown keys), else register(entropy_alpha=...), else the AEPO_ENTROPY_ALPHA
    environment variable (reaches Ray workers), else 0.2."""
    value = given if given is not None else _cfg_get(config, "aepo_entropy_alpha", None)
    if value is None:
        value = _SETTINGS.entropy_alpha
    if value is None:
        raw = os.environ.get(ENTROPY_ALPHA_ENV)
        if raw is not None:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{ENTROPY_ALPHA_ENV}={raw!r} is not a number") from None
    return DEFAULT_ENTROPY_ALPHA if value is None else float(value)


_MISSING_ENTROPY = (
    "advantage estimator 'aepo_entropy' needs the token entropies of the rollout policy [B, T], "
    "but verl passed none (extra keywords received: {received}). verl's V1 trainer computes them "
    "with the old log-probs but does not pass them to the estimator: select aepo's trainer mode, "
    "trainer.v1.trainer_mode=aepo_sync, with the setup hook "
    "+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=aepo.integrations.verl.trainer.register "
    "(docs/verl.md). The legacy trainer (trainer.use_v1=false) has no such hook: use "
    "algorithm.adv_estimator=aepo_grpo there."
)


def aepo_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl estimator 'aepo_grpo': aepo's GRPO advantage (groups of one row or with equal
    rewards get 0). `norm_adv_by_std_in_grpo` (keyword or config) False gives Dr.GRPO.
    Returns (advantages, returns), both the same [B, T] tensor as verl's outcome estimators."""
    rewards, groups = _rewards_and_groups(token_level_rewards, response_mask, index, "aepo_grpo")
    norm_by_std = kwargs.get("norm_adv_by_std_in_grpo")
    if norm_by_std is None:
        norm_by_std = _cfg_get(config, "norm_adv_by_std_in_grpo", True)
    adv = compute_advantages(
        "grpo", rewards, groups, response_mask, norm_by_std=bool(norm_by_std), epsilon=float(epsilon)
    )
    return adv, adv


def aepo_entropy_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl estimator 'aepo_entropy': the AEPO entropy-aware advantage
    A_i * (1 + alpha_H * z(H_t)). Needs token entropies (keyword `entropys`/`entropy`, or
    `batch['entropys']`); raises ValueError explaining how to enable them otherwise."""
    rewards, groups = _rewards_and_groups(token_level_rewards, response_mask, index, "aepo_entropy")
    entropy = _find_entropy(kwargs)
    if entropy is None:
        raise ValueError(_MISSING_ENTROPY.format(received=sorted(kwargs) or "none"))
    norm_by_std = kwargs.get("norm_adv_by_std_in_grpo")
    if norm_by_std is None:
        norm_by_std = _cfg_get(config, "norm_adv_by_std_in_grpo", True)
    adv = compute_advantages(
        "aepo", rewards, groups, response_mask, entropy=entropy,
        alpha=_entropy_alpha(config, kwargs.get("aepo_entropy_alpha")), norm_by_std=bool(norm_by_std),
        epsilon=float(epsilon),
    )
    return adv, adv


_ADV_FNS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "aepo_grpo": aepo_grpo_advantage,
    "aepo_entropy": aepo_entropy_advantage,
}


def verl_advantage_fn(verl_name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The verl-signature advantage estimator registered as `verl_name` (ADV_ESTIMATOR_NAMES)."""
    if verl_name not in _ADV_FNS:
        raise ValueError(
            f"unknown aepo verl advantage estimator {verl_name!r}; valid: {', '.join(ADV_ESTIMATOR_NAMES)}"
        )
    return _ADV_FNS[verl_name]


# ----------------------------------------------------------------------------- registration


def _style_from_annotation(fn: Callable[..., Any]) -> ReturnStyle | None:
    try:
        annotation = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return None
    if annotation is inspect.Signature.empty:
        return None
    text = annotation if isinstance(annotation, str) else repr(annotation)
    if "dict" in text.lower():
        return "dict"
    if text.count("Tensor") == 4:
        return "tuple"
    return None


class _ProbeConfig(dict):
    """A minimal actor config for one probing call of verl's vanilla loss."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _style_from_probe(fn: Callable[..., Any]) -> ReturnStyle | None:
    cfg = _ProbeConfig(
        clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0,
        tis_imp_ratio_cap=-1.0, global_batch_info={}, loss_scale_factor=None, policy_loss=None,
    )
    x = torch.zeros(1, 2)
    try:
        out = fn(
            old_log_prob=x, log_prob=x.clone(), advantages=torch.ones(1, 2),
            response_mask=torch.ones(1, 2), loss_agg_mode="token-mean", config=cfg,
        )
    except Exception:  # noqa: BLE001 - a probe on foreign code; failure means "unknown"
        return None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return "dict"
    if isinstance(out, tuple) and len(out) == 4:
        return "tuple"
    return None


def detect_return_style(verl_core_algos: ModuleType) -> ReturnStyle:
    """Which return convention the installed verl's policy losses use: "tuple" for
    (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), "dict" for (pg_loss, metrics).

    Read from `compute_policy_loss_vanilla`'s return annotation, else from calling it once
    on 1x2 tensors. RuntimeError when neither tells.
    """
    vanilla = getattr(verl_core_algos, "compute_policy_loss_vanilla", None)
    if vanilla is None:
        raise RuntimeError(
            "cannot detect verl's policy-loss return convention: core_algos has no "
            "compute_policy_loss_vanilla; pass register(return_style='dict' or 'tuple')"
        )
    style = _style_from_annotation(vanilla) or _style_from_probe(vanilla)
    if style is None:
        raise RuntimeError(
            "cannot detect verl's policy-loss return convention from compute_policy_loss_vanilla; "
            "pass register(return_style='dict' or 'tuple')"
        )
    return style


def _import_core_algos() -> ModuleType:
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return core_algos


def _check_free(registry: Mapping[str, Any] | None, name: str, ours: Callable[..., Any], kind: str) -> None:
    if registry is not None and name in registry and registry[name] is not ours:
        raise ValueError(
            f"verl {kind} {name!r} is already registered to {registry[name]!r}, not to aepo's adapter; "
            "remove that registration or rename it"
        )


def register(
    verl_core_algos: ModuleType | None = None,
    *,
    return_style: Literal["auto", "dict", "tuple"] = "auto",
    entropy_alpha: float | None = None,
) -> list[str]:
    """Register aepo's losses (aepo, gppo, aepo_cispo) and advantage estimators (aepo_grpo,
    aepo_entropy) in verl; returns the registered names. Registering again is a no-op
    (apart from updating the options).

    verl_core_algos: the `verl.trainer.ppo.core_algos` module (imported when None; ImportError
    with an install hint when verl is missing). return_style: verl's policy-loss return
    convention, detected by default. entropy_alpha: alpha_H of 'aepo_entropy' for this
    process (`actor_rollout_ref.rollout.custom.aepo.entropy_alpha` under aepo's trainer modes
    overrides it; AEPO_ENTROPY_ALPHA env var and 0.2 are the fallbacks).
    """
    if return_style not in ("auto", "dict", "tuple"):
        raise ValueError(f"return_style must be 'auto', 'dict' or 'tuple', got {return_style!r}")
    if entropy_alpha is not None and not float(entropy_alpha) >= 0:
        raise ValueError(f"entropy_alpha must be >= 0, got {entropy_alpha}")
    core = _import_core_algos() if verl_core_algos is None else verl_core_algos
    missing = [f for f in ("register_policy_loss", "register_adv_est") if not hasattr(core, f)]
    if missing:
        raise RuntimeError(
            f"this verl has no {', '.join(missing)} in verl.trainer.ppo.core_algos; "
            "aepo needs a verl with registries for policy losses and advantage estimators"
        )
    style = detect_return_style(core) if return_style == "auto" else return_style
    loss_registry = getattr(core, "POLICY_LOSS_REGISTRY", None)
    adv_registry = getattr(core, "ADV_ESTIMATOR_REGISTRY", None)
    for name, fn in _POLICY_LOSS_FNS.items():
        _check_free(loss_registry, name, fn, "policy loss")
    for name, fn in _ADV_FNS.items():
        _check_free(adv_registry, name, fn, "advantage estimator")

    _SETTINGS.return_style = style
    _SETTINGS.entropy_alpha = None if entropy_alpha is None else float(entropy_alpha)
    for name, fn in _POLICY_LOSS_FNS.items():
        core.register_policy_loss(name)(fn)
    for name, fn in _ADV_FNS.items():
        core.register_adv_est(name)(fn)
    return [*POLICY_LOSS_NAMES, *ADV_ESTIMATOR_NAMES]
