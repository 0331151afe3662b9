"""aepo: Agentic Entropy-Balanced Policy Optimization for tool-using LLM agents.

The short API, each name imported on first use so `import aepo` stays cheap (no torch):

    from aepo import load_config, RLTrainer, evaluate          # a run, from Python
    from aepo import register_policy_loss, register_tool       # an extension (docs/algorithms.md section 6)
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute): the facade of the package, loaded by name on first use
_API: dict[str, tuple[str, str]] = {
    "Config": ("aepo.config", "Config"),
    "load_config": ("aepo.config", "load_config"),
    "RLTrainer": ("aepo.train.rl", "RLTrainer"),
    "sft_train": ("aepo.train.sft", "sft_train"),
    "evaluate": ("aepo.eval.runner", "evaluate_tasks"),
    "load_model": ("aepo.models.loading", "load_model"),
    "run_demo": ("aepo.demo.stages", "run_demo"),
    "register_policy_loss": ("aepo.algos.losses", "register_policy_loss"),
    "register_advantage": ("aepo.algos.advantages", "register_advantage"),
    "register_tool": ("aepo.tools.registry", "register_tool"),
    "ToolSpec": ("aepo.tools.registry", "ToolSpec"),
    "register_strategy": ("aepo.rollout.strategies", "register_strategy"),
    "RolloutStrategy": ("aepo.rollout.strategies", "RolloutStrategy"),
    "register_format": ("aepo.formats", "register_format"),
    "register_metric": ("aepo.catalogue", "register_metric"),
    "Metric": ("aepo.catalogue", "Metric"),
    "Registry": ("aepo.registry", "Registry"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """Import `name`'s module on first use and keep the attribute here."""
    if name not in _API:
        raise AttributeError(f"module 'aepo' has no attribute {name!r}; its API: {', '.join(_API)}")
    module, attr = _API[name]
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
