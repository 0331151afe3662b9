"""Pure tensor math of the algorithms: entropy, advantages, policy losses, regularisers, presets.

No models, tokenizers or I/O here: tensors in, tensors out (docs/algorithms.md is the reference).
"""
from aepo.algos.advantages import (
    ADVANTAGE_REGISTRY,
    AdvantageInputs,
    advantage_config,
    advantage_names,
    advantage_spec,
    compute_advantages,
    entropy_zscore,
    get_advantage_fn,
    group_index,
    hard_attribution,
    per_token_config,
    register_advantage,
)
from aepo.algos.entropy import segment_entropy, token_entropy, topk_entropy
from aepo.algos.losses import (
    AGG_MODES,
    POLICY_LOSS_REGISTRY,
    PolicyLossInputs,
    agg_loss,
    get_policy_loss_fn,
    loss_options,
    policy_loss,
    policy_loss_config,
    policy_loss_names,
    register_policy_loss,
)
from aepo.algos.presets import PRESETS, get_preset, preset_names
from aepo.algos.regularizers import (
    KL_KINDS,
    EntropyHistory,
    epo_band_penalty,
    epo_phase_weight,
    epo_regularizer,
    kl_penalty,
    turn_entropy_means,
)

__all__ = [
    "ADVANTAGE_REGISTRY",
    "AGG_MODES",
    "KL_KINDS",
    "POLICY_LOSS_REGISTRY",
    "PRESETS",
    "AdvantageInputs",
    "EntropyHistory",
    "PolicyLossInputs",
    "advantage_config",
    "advantage_names",
    "advantage_spec",
    "agg_loss",
    "compute_advantages",
    "entropy_zscore",
    "epo_band_penalty",
    "epo_phase_weight",
    "epo_regularizer",
    "get_advantage_fn",
    "get_policy_loss_fn",
    "get_preset",
    "group_index",
    "hard_attribution",
    "kl_penalty",
    "loss_options",
    "per_token_config",
    "policy_loss",
    "policy_loss_config",
    "policy_loss_names",
    "preset_names",
    "register_advantage",
    "register_policy_loss",
    "segment_entropy",
    "token_entropy",
    "topk_entropy",
    "turn_entropy_means",
]
