"""Algorithm presets (docs/algorithms.md section 6) as data: `algo=NAME` sets these config fields.

Each preset names the rollout strategy, the advantage estimator and the policy loss; every
field can still be overridden on its own for ablations (e.g. `algo=aepo rollout.strategy=independent`).
"""
from __future__ import annotations

import copy
from typing import Any

_PPO = {"policy_loss": "ppo", "clip_ratio_low": 0.2, "clip_ratio_high": 0.2}

ALGO_PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {"rollout": {"strategy": "independent"}, "actor": {"adv_estimator": "grpo", **_PPO}},
    "reinforce_pp": {
        "rollout": {"strategy": "independent"},
        "actor": {"adv_estimator": "reinforce_pp", **_PPO},
    },
    "dapo": {
        "rollout": {"strategy": "independent"},
        "actor": {
            "adv_estimator": "grpo", "policy_loss": "dapo", "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.28, "loss_agg_mode": "token-mean", "dynamic_sampling": True,
            "kl_coef": 0.0,
            # overlong reward shaping over the last quarter of the default 256-token budget
            # (DAPO: 4,096 of 20,480); generated tokens only (docs/algorithms.md section 5)
            "overlong_buffer": 64, "overlong_penalty": 1.0,
        },
    },
    "gppo": {"rollout": {"strategy": "independent"}, "actor": {"adv_estimator": "grpo", "policy_loss": "gppo"}},
    "cispo": {"rollout": {"strategy": "independent"}, "actor": {"adv_estimator": "grpo", "policy_loss": "cispo"}},
    "clip_cov": {
        "rollout": {"strategy": "independent"},
        "actor": {"adv_estimator": "grpo", "policy_loss": "clip_cov"},
    },
    "kl_cov": {"rollout": {"strategy": "independent"}, "actor": {"adv_estimator": "grpo", "policy_loss": "kl_cov"}},
    "epo": {"rollout": {"strategy": "independent"}, "actor": {"adv_estimator": "grpo", **_PPO, "epo": True}},
    "arpo": {"rollout": {"strategy": "arpo"}, "actor": {"adv_estimator": "grpo", **_PPO}},
    "aepo": {
        "rollout": {"strategy": "aepo"},
        "actor": {"adv_estimator": "aepo", "policy_loss": "aepo", "clip_ratio_low": 0.2, "clip_ratio_high": 0.2},
    },
    # What the published AEPO training scripts ran (docs/algorithms.md section 6): the dynamic
    # rollout's pre-monitoring off (enable_dynamic_rollouts unset), so m = k / 2; the released
    # branch rule (U + gamma dH)(1 - 0.05 l) >= 0.5 with its per-prompt, per-round counter and
    # its unrescaled segment entropy; the entropy-aware advantage off (the configs never
    # computed the token entropies, so the advantage was GRPO's); the entropy-balanced clip on.
    "released_aepo": {
        "rollout": {
            "strategy": "aepo", "premonitor": False, "initial_rollouts": 0, "branch_decision": "released",
            "branch_gamma": 0.2, "branch_penalty": 0.05, "branch_tau": 0.5, "penalty_scope": "prompt",
            "segment_entropy_compat": True, "branch_children": 1,
        },
        "actor": {"adv_estimator": "grpo", "policy_loss": "aepo", "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
                  "kl_coef": 0.0},
    },
}


def preset_names() -> list[str]:
    return list(ALGO_PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    """The config fields of preset `name`; ValueError listing the valid names otherwise."""
    if name not in ALGO_PRESETS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGO_PRESETS)}")
    return copy.deepcopy(ALGO_PRESETS[name])
