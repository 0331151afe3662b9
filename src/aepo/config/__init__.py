"""Typed run configuration: dataclasses loaded from YAML with dotted command-line overrides.

Names follow verl where the concept is the same (`rollout.n`, `clip_ratio_low`,
`clip_ratio_high`, `loss_agg_mode`, `ppo_mini_batch_size`, `ppo_epochs`), so moving between
the two feels familiar. Every unknown key or bad value fails before any work, naming the key
and the valid choices.

    cfg = load_config("configs/demo.yaml", ["algo=grpo", "rollout.n=8"])
"""
from __future__ import annotations

from aepo.config.loading import (
    EVAL_KEYS,
    LOGGER_PACKAGES,
    RUN_CONFIG_FILE,
    apply_mapping,
    apply_preset,
    check_loggers,
    config_value,
    config_yaml,
    import_plugins,
    load_config,
    model_config,
    parse_override,
    run_config_files,
    save_config,
    to_dict,
    validate,
)
from aepo.config.reference import config_reference, field_docs, undocumented_fields
from aepo.config.schema import (
    QUICK_DEMO,
    AlgoConfig,
    Config,
    DataConfig,
    DemoConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    SFTConfig,
    ToolsConfig,
    TrainerConfig,
)
from aepo.errors import ConfigError

__all__ = ["EVAL_KEYS", "LOGGER_PACKAGES", "QUICK_DEMO", "RUN_CONFIG_FILE", "AlgoConfig", "Config", "ConfigError",
           "DataConfig", "DemoConfig", "EvalConfig", "LoraConfig", "ModelConfig", "RewardConfig", "RolloutConfig",
           "SFTConfig", "ToolsConfig", "TrainerConfig", "apply_mapping", "apply_preset", "check_loggers",
           "config_reference", "config_value", "config_yaml", "field_docs", "import_plugins", "load_config",
           "model_config", "parse_override", "run_config_files", "save_config", "to_dict", "undocumented_fields",
           "validate"]
