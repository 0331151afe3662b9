"""The old-policy token entropies reach the `aepo_entropy` estimator inside verl, with no source edit.

`aepo_entropy` (docs/algorithms.md section 4; adapter in `aepo.integrations.verl`) needs the token
entropies H_t of every response token at advantage time. verl 0.9.1's default trainer (the V1
trainer, `trainer.use_v1=true`) computes them in `PPOTrainer._compute_old_log_prob`, together with
the old log-probs (`calculate_entropy=True`), and stores them in its TransferQueue under the field
"entropy"; but `PPOTrainer._compute_advantage` reads only uid, masks, scores and log-probs from
there and calls the estimator with rewards, mask, uid and config, so the entropies never arrive.

**The hook.** The V1 trainer class is looked up by name, `trainer.v1.trainer_mode`, in verl's
trainer registry (`verl.trainer.ppo.v1.register_trainer`). `register()` adds, for each of verl's
modes (sync, colocate_async, separate_async), a mode `aepo_<mode>`: verl's own trainer class with
one method more, `_compute_advantage`. When `algorithm.adv_estimator` is `aepo_entropy` it reads
the batch's "entropy" field from the TransferQueue (the rows and padding verl's advantage step uses)
and binds it, for the duration of verl's own `_compute_advantage`, as the `entropys` keyword of the
registered estimator (the registry entry is wrapped and restored afterwards; the advantage step runs
in the trainer process only, one batch at a time). Everything else is verl's code. So one config key
selects it on verl's own entry point, and aepo needs no launcher of its own:

    python -m verl.trainer.main_ppo trainer.v1.trainer_mode=aepo_sync algorithm.adv_estimator=aepo_entropy
        +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=aepo.integrations.verl.trainer.register ...

The setup hook runs `register()` in every Ray process (the TaskRunner that builds the trainer, the
actor workers, the agent-loop workers), which registers aepo's losses and estimators, the
`aepo_tree` agent loop and these trainer modes.

verl compares `trainer_mode` with its own names ("sync" or not) in several places (replay buffer,
checkpoints, refills), so an `aepo_<mode>` trainer reports `trainer_mode` as `<mode>` and reads
`trainer.v1.<mode>.*` settings; the configured name is kept in `selected_trainer_mode`.

**Which entropies** (docs/algorithms.md section 1.1). Those of the policy before the update (the
forward pass that gives the old log-probs), at the rollout temperature, over the whole vocabulary,
z-scored over the whole batch once per step; the local trainer uses the update's own forward pass
per micro-batch instead (docs/algorithms.md section 4). With
`algorithm.rollout_correction.bypass_mode` verl skips that forward pass, so `aepo_entropy` is
refused there.

**What else the modes add.** At construction, `check_trainer_config` refuses aepo_tree under an
async mode (a tree must come from one policy version; docs/verl.md) and keys verl's own config
would refuse later. Each step counts the trees that survived: a prompt whose tree failed (after
the loop's retries) reaches verl's batch with no rows and the step trains on the rest, logging
`aepo/rollout/failed_trees` and `aepo/rollout/tree_survival`; below `min_tree_fraction`
(`actor_rollout_ref.rollout.custom.aepo`, default 0.5) the step raises instead. alpha_H of
`aepo_entropy` comes from `custom.aepo.entropy_alpha` there too.

**Not supported.** The legacy trainer (`trainer.use_v1=false`, deprecated in verl 0.9.1): its
TaskRunner constructs `RayPPOTrainer` directly and its `fit` pops the entropies, so no key selects
a subclass; `aepo_entropy` raises its error there and `aepo_grpo` works. verl is imported only
inside the functions here, so `import aepo` never needs it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

__all__ = [
    "ENTROPY_ESTIMATORS",
    "TRAINER_PREFIX",
    "EntropyAdvantageMixin",
    "aepo_settings",
    "bound_entropies",
    "check_trainer_config",
    "mirror_mode_settings",
    "register",
    "register_trainers",
    "trainer_class",
]

logger = logging.getLogger(__name__)

ENTROPY_ESTIMATORS: tuple[str, ...] = ("aepo_entropy",)  # verl estimators that need token entropies
TRAINER_PREFIX = "aepo_"
ENTROPY_FIELD = "entropy"  # the V1 trainer's TransferQueue field for the old-policy entropies

_INSTALL_HINT = ("aepo.integrations.verl.trainer needs verl's V1 trainer (verl >= 0.9 and TransferQueue): "
                 "`pip install aepo[verl]` (docs/verl.md)")
_TRAINER_CLASSES: dict[str, type] = {}


def _trainer_base() -> Any:
    """verl's V1 trainer module (`verl.trainer.ppo.v1.trainer_base`), imported on first use."""
    try:
        from verl.trainer.ppo.v1 import trainer_base
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return trainer_base


@contextmanager
def bound_entropies(name: str, entropys: torch.Tensor, **extra: Any) -> Iterator[None]:
    """While the block runs, verl's registered advantage estimator `name` receives
    `entropys=entropys` ([B, T], checked against the response mask it is called with) and the
    `extra` keywords (such as `aepo_entropy_alpha`) it is not given otherwise."""
    from verl.trainer.ppo import core_algos

    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    original = registry.get(name)
    if original is None:
        raise ValueError(f"advantage estimator {name!r} is not registered in verl; run "
                         "aepo.integrations.verl.trainer.register() in this process (the Ray setup hook)")

    def with_entropies(*args: Any, **kwargs: Any) -> Any:
        mask = kwargs.get("response_mask", args[1] if len(args) > 1 else None)
        if mask is not None and tuple(entropys.shape) != tuple(mask.shape):
            raise ValueError(f"old-policy entropies have shape {tuple(entropys.shape)} but verl's response mask "
                             f"{tuple(mask.shape)}: the advantage step saw other rows than the TransferQueue "
                             "fields read for it (please report this with your verl version)")
        if kwargs.get("entropys") is None:
            kwargs["entropys"] = entropys.to(mask.device) if mask is not None else entropys
        for key, value in extra.items():
            if kwargs.get(key) is None:
                kwargs[key] = value
        return original(*args, **kwargs)

    registry[name] = with_entropies
    try:
        yield
    finally:
        registry[name] = original


class EntropyAdvantageMixin:
    """verl V1 trainer methods that hand the old-policy token entropies to `aepo_entropy`.

    Mixed in front of one of verl's trainer classes by `trainer_class`; `verl_mode` is that class's
    registered name (module docstring)."""

    verl_mode: ClassVar[str] = "sync"
    selected_trainer_mode: str | None = None
    config: Any  # verl's trainer config (set by verl's __init__)
    tree_stats: dict[str, int]

    def __init__(self, config: Any) -> None:
        check_trainer_config(config, self.verl_mode)
        mirror_mode_settings(config, self.verl_mode)
        super().__init__(config)  # type: ignore[call-arg]
        self.tree_stats = {"steps": 0, "trees": 0, "failed": 0}
        self.replay_buffer.sample = _counting_sample(self, self.replay_buffer.sample)

    @property
    def trainer_mode(self) -> str:
        """verl's own mode name: verl compares it with "sync" to choose its replay buffer and refills."""
        return self.verl_mode

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        self.selected_trainer_mode = value

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        name = str(self.config.algorithm.adv_estimator)
        if name not in ENTROPY_ESTIMATORS:
            return super()._compute_advantage(batch, metrics)  # type: ignore[misc]
        entropys = self._old_entropies(batch)
        alpha = aepo_settings(self.config).get("entropy_alpha")
        with bound_entropies(name, entropys, **({} if alpha is None else {"aepo_entropy_alpha": float(alpha)})):
            return super()._compute_advantage(batch, metrics)  # type: ignore[misc]

    def _old_entropies(self, batch: Any) -> torch.Tensor:
        """The batch's old-policy token entropies [B, T], padded as verl pads its advantage inputs."""
        correction = self.config.algorithm.get("rollout_correction", None)
        if correction and correction.get("bypass_mode", False):
            raise ValueError("advantage estimator 'aepo_entropy' needs the token entropies of the old-policy "
                             "forward pass, which verl skips under algorithm.rollout_correction.bypass_mode=true; "
                             "set it to false, or use algorithm.adv_estimator=aepo_grpo")
        tq = _trainer_base().tq  # the TransferQueue client verl's trainer uses
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=[ENTROPY_FIELD, "response_mask"])
        if ENTROPY_FIELD not in data.keys():  # noqa: SIM118 - TensorDict membership
            raise ValueError(f"the TransferQueue has no {ENTROPY_FIELD!r} field for this batch: verl's "
                             "_compute_old_log_prob did not store the old-policy entropies it needs")
        return data.to_padded_tensor()[ENTROPY_FIELD].float()


def aepo_settings(config: Any) -> dict[str, Any]:
    """`actor_rollout_ref.rollout.custom.aepo` as a plain dict (empty when unset)."""
    from aepo.integrations.verl import _cfg_get
    from aepo.integrations.verl.agent_loop import _plain

    value = _plain(_cfg_get(config, "actor_rollout_ref.rollout.custom.aepo", None) or {})
    return dict(value) if isinstance(value, dict) else {}


def uses_tree_loop(config: Any) -> bool:
    """Whether verl's agent loop is aepo_tree for this run (its default agent loop)."""
    from aepo.integrations.verl import _cfg_get
    from aepo.integrations.verl.agent_loop import AGENT_LOOP_NAME

    return str(_cfg_get(config, "actor_rollout_ref.rollout.agent.default_agent_loop", "")) == AGENT_LOOP_NAME


def check_trainer_config(config: Any, verl_mode: str) -> None:
    """ConfigError for settings aepo's trainer modes cannot run: aepo_tree under an async mode
    (docs/verl.md: a tree must come from one policy version) and keys verl's own config refuses."""
    from aepo.errors import ConfigError
    from aepo.integrations.verl import _cfg_get

    if uses_tree_loop(config) and verl_mode != "sync":
        raise ConfigError(
            f"trainer.v1.trainer_mode={TRAINER_PREFIX}{verl_mode} with the aepo_tree agent loop: verl's async modes "
            "abort requests when weights change and resume them under the new policy, so one tree would mix policy "
            "versions with no record of which token came from which; use trainer.v1.trainer_mode=aepo_sync")
    if _cfg_get(config, "algorithm.aepo_entropy_alpha", None) is not None:
        raise ConfigError("algorithm.aepo_entropy_alpha: verl's algorithm config takes no extra keys; set "
                          "actor_rollout_ref.rollout.custom.aepo.entropy_alpha instead")


def mirror_mode_settings(config: Any, verl_mode: str) -> None:
    """Make `trainer.v1.aepo_<mode>` the same settings as `trainer.v1.<mode>`: the trainer reads
    the latter (it reports verl's mode name), while parts of verl that read the configured name
    (rollout skip's `parameter_sync_step`) read the former."""
    from omegaconf import OmegaConf, open_dict

    v1 = OmegaConf.select(config, "trainer.v1") if OmegaConf.is_config(config) else None
    if v1 is None:
        return
    with open_dict(v1):
        if v1.get(verl_mode) is None:
            v1[verl_mode] = {}
        v1[TRAINER_PREFIX + verl_mode] = v1[verl_mode]


def _counting_sample(trainer: EntropyAdvantageMixin, sample: Any) -> Any:
    """verl's ReplayBuffer.sample, counting the trees of the step that survived (a prompt whose tree
    failed reaches the batch with no rows, or is evicted and refilled under verl's
    `sync_refill_failed_groups`), so the step reports them and stops below `min_tree_fraction`."""

    def counted(global_steps: int, partition_id: str, batch_size: int) -> Any:
        batch, metrics = sample(global_steps=global_steps, partition_id=partition_id, batch_size=batch_size)
        if partition_id != "train" or not uses_tree_loop(trainer.config):
            return batch, metrics
        evicted = int(metrics.get("training/rollout_failure/evicted_samples", 0))
        survived = len({str(k).split("_")[0] for k, tag in zip(batch.keys, batch.tags)
                        if not tag.get("is_padding", False)})
        failed = evicted + max(0, batch_size - survived)
        trees = survived + failed
        stats = trainer.tree_stats
        stats["steps"] += 1
        stats["trees"] += trees
        stats["failed"] += failed
        metrics = {**metrics, "aepo/rollout/failed_trees": failed, "aepo/rollout/tree_survival": survived / max(trees, 1)}
        threshold = float(aepo_settings(trainer.config).get("min_tree_fraction", 0.5))
        if trees and survived / trees < threshold:
            raise RuntimeError(
                f"aepo: {failed} of {trees} trees failed in step {global_steps} (survival {survived / trees:.0%} < "
                f"min_tree_fraction={threshold:g}); the agent-loop workers' logs name each tree's error "
                "('aepo_tree'). Lower actor_rollout_ref.rollout.custom.aepo.min_tree_fraction to train on fewer trees")
        return batch, metrics

    return counted


def trainer_class(verl_mode: str) -> type:
    """verl's V1 trainer class registered as `verl_mode`, with `EntropyAdvantageMixin` in front."""
    if verl_mode in _TRAINER_CLASSES:
        return _TRAINER_CLASSES[verl_mode]
    base = _trainer_base()
    if verl_mode not in base.TRAINER_REGISTRY:
        raise ValueError(f"verl has no V1 trainer mode {verl_mode!r}; its modes: {', '.join(sorted(base.TRAINER_REGISTRY))}")
    parent = base.TRAINER_REGISTRY[verl_mode]
    name = f"Aepo{parent.__name__}"
    cls = type(name, (EntropyAdvantageMixin, parent), {
        "verl_mode": verl_mode, "__module__": __name__, "__qualname__": name,
        "__doc__": f"verl's {parent.__name__} (trainer_mode={verl_mode!r}) with aepo's entropy hook "
                   "(aepo.integrations.verl.trainer).",
    })
    globals()[name] = cls  # importable by name, for pickling
    _TRAINER_CLASSES[verl_mode] = cls
    return cls


def register_trainers() -> list[str]:
    """Register `aepo_<mode>` for each of verl's V1 trainer modes (idempotent); returns the names.
    ImportError with an install hint when verl's V1 trainer cannot be imported."""
    base = _trainer_base()
    names = []
    for verl_mode in sorted(base.TRAINER_REGISTRY):
        if verl_mode.startswith(TRAINER_PREFIX):
            continue
        name = TRAINER_PREFIX + verl_mode
        base.register_trainer(name)(trainer_class(verl_mode))  # ValueError if the name is someone else's
        names.append(name)
    return names


def register(*, losses: bool = True, agent_loop: bool = True, trainers: bool = True) -> list[str]:
    """Everything aepo adds to verl, for `worker_process_setup_hook`: the policy losses and advantage
    estimators (`aepo.integrations.verl.register`), the `aepo_tree` agent loop and the `aepo_<mode>`
    trainer modes. Returns the registered names. A process that cannot import verl's V1 trainer
    (no TransferQueue) skips the trainer modes with a warning, so the legacy trainer still works."""
    names: list[str] = []
    if losses:
        from aepo.integrations.verl import register as register_losses

        names += register_losses()
    if agent_loop:
        from aepo.integrations.verl.agent_loop import register as register_loop

        names.append(register_loop(losses=False))
    if trainers:
        try:
            names += register_trainers()
        except ImportError as e:
            logger.warning("aepo: trainer modes aepo_<mode> not registered in this process: %s", e)
    return names
