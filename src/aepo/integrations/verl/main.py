"""`python -m aepo.integrations.verl.main`: verl's `main_ppo`, with aepo's checks before Ray starts.

The command line is verl's (`python -m verl.trainer.main_ppo`: hydra overrides, `--config-path`,
`--config-name`), and after the checks verl's own `main` runs unchanged. The checks exist
because verl builds aepo's pieces only inside Ray workers, after the cluster and the models are
up, where a wrong key or a tool that cannot start fails every tree of every step and shows only
in the workers' logs. `preflight(config)` checks, on this node:

- the aepo_tree settings (`actor_rollout_ref.rollout.custom.aepo` and the agent-loop YAML entry),
  as the loop reads them;
- the trainer mode: `aepo_entropy` needs verl's V1 trainer in an `aepo_<mode>` mode, aepo_tree
  needs the sync mode (docs/verl.md);
- the Ray setup hook that registers aepo in every worker;
- the tools: the Python sandbox probes what isolation this node allows and refuses, with the
  fix, where strict isolation is impossible (a Docker/Kubernetes GPU node without user
  namespaces or seccomp), unless `tool_config.python_isolation: limits-only` is named.

A failed check prints one line, `aepo: ...`, and exits with status 2. Each agent-loop worker
checks its own node again when it builds its tools.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from aepo.errors import ConfigError
from aepo.integrations.verl import ADV_ESTIMATOR_NAMES, POLICY_LOSS_NAMES, _cfg_get

__all__ = ["SETUP_HOOKS", "loop_options", "main", "preflight"]

SETUP_HOOKS = ("aepo.integrations.verl.trainer.register", "aepo.integrations.verl.agent_loop.register",
               "aepo.integrations.verl.register",
               # the paths of aepo <= 0.x's flat modules, still in command lines (`verl_alias`)
               "aepo.integrations.verl_trainer.register", "aepo.integrations.verl_agent_loop.register")
_HOOK_KEY = "ray_kwargs.ray_init.runtime_env.worker_process_setup_hook"


def loop_options(config: Any) -> dict[str, Any]:
    """The aepo_tree entry's keys in verl's agent-loop YAML (`rollout.agent.agent_loop_config_path`)."""
    from aepo.integrations.verl.agent_loop import AGENT_LOOP_NAME

    path = _cfg_get(config, "actor_rollout_ref.rollout.agent.agent_loop_config_path", None)
    if not path:
        return {}
    try:
        entries = yaml.safe_load(Path(path).read_text()) or []
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"actor_rollout_ref.rollout.agent.agent_loop_config_path={path}: {e}") from None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("name") == AGENT_LOOP_NAME:
            return {k: v for k, v in entry.items() if k not in ("name", "_target_")}
    return {}


def preflight(config: Any) -> None:
    """Check what aepo's pieces need from `config` and this node (module docstring); ConfigError
    names the key or the node setting and what to do."""
    from aepo.integrations.verl.agent_loop import check_tools, loop_settings
    from aepo.integrations.verl.trainer import TRAINER_PREFIX, check_trainer_config, uses_tree_loop

    mode = str(_cfg_get(config, "trainer.v1.trainer_mode", "sync"))
    use_v1 = bool(_cfg_get(config, "trainer.use_v1", True))
    estimator = str(_cfg_get(config, "algorithm.adv_estimator", ""))
    loss = str(_cfg_get(config, "actor_rollout_ref.actor.policy_loss.loss_mode", ""))
    tree = uses_tree_loop(config)
    if estimator == "aepo_entropy" and not (use_v1 and mode.startswith(TRAINER_PREFIX)):
        raise ConfigError(f"algorithm.adv_estimator=aepo_entropy needs the token entropies, which only aepo's V1 "
                          f"trainer modes pass: set trainer.use_v1=true and trainer.v1.trainer_mode=aepo_sync "
                          f"(now use_v1={use_v1}, trainer_mode={mode})")
    if use_v1 and mode.startswith(TRAINER_PREFIX):
        check_trainer_config(config, mode[len(TRAINER_PREFIX):])
    elif tree and use_v1 and mode != "sync":
        check_trainer_config(config, mode)
    needs_hook = tree or mode.startswith(TRAINER_PREFIX) or estimator in ADV_ESTIMATOR_NAMES or loss in POLICY_LOSS_NAMES
    hook = _cfg_get(config, _HOOK_KEY, None)
    if needs_hook and hook not in SETUP_HOOKS:
        raise ConfigError(f"{_HOOK_KEY} is {hook!r}: aepo's losses, estimators, agent loop and trainer modes "
                          f"exist in a Ray worker only after it runs aepo's setup hook; set "
                          f"+{_HOOK_KEY}={SETUP_HOOKS[0]}")
    if tree:
        settings = loop_settings(loop_options(config), config)
        check_tools(settings.tools)  # probes the Python sandbox on this node: ConfigError with the fix


def main() -> None:
    """verl's main_ppo entry point with `preflight` first."""
    import hydra
    from verl.trainer import main_ppo as verl_main

    config_dir = str(Path(verl_main.__file__).resolve().parent / "config")

    @hydra.main(config_path=config_dir, config_name="ppo_trainer", version_base=None)
    def run(config: Any) -> None:
        try:
            preflight(config)
        except ConfigError as e:
            print(f"aepo: {e}".replace("\n", " "), file=sys.stderr, flush=True)
            sys.exit(2)
        verl_main.main.__wrapped__(config)  # verl's own main, undecorated: same config, same checks

    run()


if __name__ == "__main__":
    main()
