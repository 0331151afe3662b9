"""Typed run configuration: dataclasses loaded from YAML with dotted command-line overrides.

Names follow verl where the concept is the same (`rollout.n`, `clip_ratio_low`,
`clip_ratio_high`, `loss_agg_mode`, `ppo_mini_batch_size`, `ppo_epochs`), so moving between
the two feels familiar. Every unknown key or bad value fails before any work, naming the key
and the valid choices.

    cfg = load_config("configs/demo.yaml", ["algo=grpo", "rollout.n=8"])
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from aepo.errors import ConfigError
from aepo.rollout.config import RolloutConfig
from aepo.tools.config import ToolsConfig

__all__ = ["EVAL_KEYS", "LOGGER_PACKAGES", "QUICK_DEMO", "RUN_CONFIG_FILE", "AlgoConfig", "Config", "ConfigError",
           "DataConfig", "DemoConfig", "EvalConfig", "LoraConfig", "ModelConfig", "RewardConfig", "RolloutConfig", "SFTConfig",
           "ToolsConfig", "TrainerConfig", "apply_mapping", "apply_preset", "check_loggers", "config_value", "config_yaml",
           "import_plugins", "load_config", "model_config", "parse_override", "run_config_files", "save_config",
           "to_dict", "validate"]


@dataclass
class ModelConfig:
    path: str = ""  # local HF directory; empty: the demo builds its own tiny model
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights and compute
    device: str = "auto"  # auto (CUDA when there is one) | cpu | cuda | cuda:N
    gradient_checkpointing: bool = False  # recompute activations in the update: less memory, more time
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template


@dataclass
class LoraConfig:
    """LoRA adapters on the policy (`actor.lora`, built with peft): with rank > 0, training (RL
    and SFT) updates only the adapters, the KL reference is the same model with its adapters
    disabled, and saved models are adapter directories (README, "LoRA")."""

    rank: int = 0  # adapter rank r; 0: off (full fine-tuning)
    alpha: float = 16.0  # scaling numerator: the update is (alpha / rank) B A
    dropout: float = 0.0  # dropout on the adapters' input while training
    # module names (or name suffixes) to adapt; empty: the architecture's default
    # (aepo.models.lora.DEFAULT_TARGETS: attention and MLP projections of Llama/Qwen/Mistral/...)
    target_modules: list[str] = field(default_factory=list)


@dataclass
class AlgoConfig:
    """Advantage, policy loss and regularisers. `algo=NAME` fills these from a preset."""

    # names are the registries' (`aepo.algos`): adv_estimator grpo | rloo | reinforce_pp | aepo;
    # policy_loss ppo | dapo | gppo | cispo | aepo | clip_cov | kl_cov, plus any registered later
    adv_estimator: str = "grpo"
    norm_adv_by_std_in_grpo: bool = True
    # alpha_H of the aepo estimator (A_i (1 + alpha_H z(H_t)), docs/algorithms.md section 4)
    entropy_adv_alpha: float = 0.2
    # where z(H_t) of that estimator is taken: "batch" over the whole step's batch, with the
    # entropies of the policy before the update (one extra no-grad forward pass; the memory
    # setting ppo_micro_batch_size no longer changes the algorithm), or "micro" over each
    # micro-batch of the training pass (the released actor)
    adv_entropy_scope: Literal["batch", "micro"] = "batch"
    # tree rollouts (ARPO/AEPO branching): "soft" trains a shared prefix once per row that holds
    # it; "hard" trains it once, with the mean advantage of those rows (docs/algorithms.md section 4)
    tree_attribution: Literal["soft", "hard"] = "soft"
    policy_loss: str = "ppo"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum(-norm)
    cispo_clip_low: float = 1.0  # CISPO importance-weight clip (eps_l_is, eps_h_is)
    cispo_clip_high: float = 0.28
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.002
    kl_cov_coef: float = 1.0
    epo: bool = False
    epo_entropy_coef: float = 0.001  # lambda_H
    epo_band_low: float = 0.5  # kappa_l
    epo_band_high: float = 1.5  # kappa_r
    epo_band_coef: float = 1.0
    # the first training step (0-based) whose loss gets the EPO regulariser; the entropy history
    # is kept from step 0 either way. 0: from the start (the paper); the released code waits
    # until step 25 (docs/algorithms.md section 5)
    epo_start_step: int = 0
    # re-score each rollout with the trainer's model before the update (verl's old_log_prob):
    # needed when the sampler is not the trainer's own fp32 model (vLLM, bf16 kernels)
    recompute_old_log_prob: bool = False
    kl_coef: float = 0.0  # KL to the reference policy; 0 = no reference model
    kl_type: str = "k3"  # k1 | k2 | k3
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    # DAPO overlong reward shaping, 0 = off (the dapo preset: 64): a row whose generated tokens L
    # (tool results not counted) exceed rollout.max_response_tokens - buffer loses
    # overlong_penalty * min(1, (L - (max - buffer)) / buffer) reward
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # options of a registered loss / estimator that have no field above: {option: value}
    # (each function's keyword-only parameters; checked against them before any work)
    policy_loss_options: dict[str, Any] = field(default_factory=dict)
    adv_estimator_options: dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters instead of full fine-tuning


@dataclass
class TrainerConfig:
    total_steps: int = 60
    prompts_per_step: int = 16
    ppo_mini_batch_size: int = 64  # rows per optimizer step
    ppo_micro_batch_size: int = 64  # rows per forward/backward (gradient accumulation)
    ppo_epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    seed: int = 0
    save_every: int = 20
    keep_last: int = 2
    # torch threads; 0: OMP_NUM_THREADS when set, else the cores this process may use (aepo.train.threads.set_threads)
    threads: int = 0
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])


@dataclass
class DataConfig:
    train: str = ""  # JSONL/parquet; empty: the demo world's train split
    prompt_key: str = ""  # empty: auto-detect (question, problem, prompt, query)
    answer_key: str = ""  # empty: auto-detect (answer, answers, golden_answers, target)
    world_seed: int = 0
    world_level: int = 2


@dataclass
class RewardConfig:
    multi_tool_bonus: float = 0.0
    format_penalty: float = -1.0
    # QA reward: token F1 (the paper's; pays 0.67 for "Paris London" against gold "Paris") or
    # exact match (em: 1 only for a committed correct answer); docs/algorithms.md section 7
    qa_metric: Literal["f1", "em"] = "f1"


@dataclass
class SFTConfig:
    """`aepo sft` and the demo's SFT stage. The defaults are the demo's: small batches, one pass
    (a small model learns to copy from search results only after enough optimizer steps;
    benchmarks/RESULTS.md, "SFT batch size")."""

    epochs: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    batch_size: int = 8  # examples per optimizer step
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_len: int = 512  # tokens per example; longer ones are cut
    seed: int = 0


@dataclass
class EvalConfig:
    """`aepo eval` and the demo's evaluations: samples per question and which questions."""

    n: int = 1  # samples per question (pass@k for k <= n)
    limit: int = 0  # the first `limit` questions of each file; 0: all of them
    seed: int = 0
    batch_prompts: int = 32  # questions rolled out together


@dataclass
class DemoConfig:
    """The demo's sizes (`aepo demo`, `aepo compare`); `aepo demo --quick` is the about-a-minute
    variant (QUICK_DEMO). Its SFT, RL and evaluation settings are the `sft`, `trainer` and
    `eval` sections."""

    world_size: str = "small"
    world_level: int = 2
    world_kinds: str = ""  # e.g. "fork,fork_run,alias,multi_hop": only these kinds (aepo.demo.world.kinds_spec)
    # Two layers: SFT steps 2.2x cheaper than "tiny"'s four, and a better SFT model after the same
    # 1,600 steps (29% held-out pass@1 against 24%; benchmarks/RESULTS.md, "Demo: learning status").
    model_preset: str = "micro"
    n_demos: int = 10400  # expert demonstrations, from `demo_worlds` sample worlds
    vocab_size: int = 2400
    demo_worlds: int = 40
    tokenizer_worlds: int = 4
    recall_drills: int = 2400  # name -> number recall drills mixed into SFT (aepo.train.sft.recall_drills)


QUICK_DEMO = ["demo.n_demos=200", "demo.tokenizer_worlds=2", "demo.demo_worlds=2", "demo.recall_drills=50",
              "trainer.total_steps=2", "eval.n=2", "eval.limit=16"]
"""What `--quick` changes (before the command line's own overrides): about a minute in all."""


@dataclass
class Config:
    algo: str = "aepo"  # a preset (aepo.algos.presets) that fills rollout.strategy and the actor section first
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    out_dir: str = "runs/default"  # aepo train: checkpoints, metrics.jsonl, config.yaml and final/
    # modules (dotted names or .py paths) imported before the config is checked, so the losses,
    # estimators, tools and strategies they register can be named in it (examples/extend/)
    plugins: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- loading


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors) or f"{key}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        out = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_mapping(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Set the fields of dataclass `obj` (a section, or a whole Config) from a nested mapping,
    each value converted to the field's type; ConfigError names an unknown key or a bad value
    (`prefix` is how keys are named in it). The verl agent loop reads its settings with it."""
    hints = _hints(type(obj))
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in hints:
            valid = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {valid}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of {type(cur).__name__} fields, got {v!r}")
            apply_mapping(cur, v, key + ".")
        else:
            setattr(obj, k, _convert(v, hints[k], key))


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. rollout.n=8")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding one key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(f"holds the key {key!r} twice in one mapping (lines {seen[key]} "
                                            f"and {line}); YAML would keep only the last, so delete one of them")
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    pass


_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _config_text(p: Path) -> str:
    """The text of a config file: UTF-8, or UTF-16/32 when a byte-order mark says so; any other
    encoding is a ConfigError naming the file and the first byte that is not UTF-8."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read ({e.strerror or e}); check its permissions") from None
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding).removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {str(p)!r} is not {encoding.upper()} text (byte {e.start} on line {line} "
                          f"cannot be decoded: {e.reason}); save it as UTF-8") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                loggers: bool = True) -> Config:
    """Build a Config from defaults, then the preset named by `algo`, then YAML, then overrides.

    With `loggers` (a config to train with), the packages `trainer.logger` names must be
    installed; a config read to evaluate a model (`model_config`) does not log, so does not check."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a directory; give a YAML file (e.g. "
                              "src/aepo/configs/demo.yaml)")
        try:
            loaded = yaml.load(_config_text(p), Loader=_UniqueKeyLoader) or {}  # a SafeLoader
        except _DuplicateKey as e:
            raise ConfigError(f"config file {str(p)!r} {e}") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise ConfigError(f"config file {str(p)!r} is not valid YAML{at}: "
                              f"{getattr(e, 'problem', None) or e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        data = loaded
    for ov in overrides or []:
        data = _merge(data, _nest(*parse_override(ov)))
    cfg = Config()
    import_plugins(_convert(data.get("plugins") or [], list[str], "plugins"))
    algo = data.get("algo", cfg.algo)
    apply_preset(cfg, str(algo))
    apply_mapping(cfg, data)
    validate(cfg)
    if loggers:
        check_loggers(cfg.trainer.logger)
    return cfg


LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""The `trainer.logger` entries that need a package (the `tracking` extra): entry -> module."""


def check_loggers(names: list[str] | tuple[str, ...]) -> None:
    """ConfigError naming the package a `trainer.logger` entry needs when it is not installed,
    so a run fails before it writes anything (checked by `load_config` and
    `aepo.train.records.MetricsLogger`)."""
    import importlib.util

    for name in names:
        module = LOGGER_PACKAGES.get(name)
        if module is None:
            continue
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"trainer.logger includes {name}, but the {module} package is not installed; "
                              f"install it with: pip install 'aepo[tracking]' (or drop {name} from "
                              f"trainer.logger, e.g. trainer.logger=console,jsonl)")


def import_plugins(names: list[str]) -> None:
    """Import each plugin once: a dotted module name, or a path to a .py file (relative to the
    working directory). ConfigError names a plugin that cannot be found or fails to import."""
    import importlib
    import importlib.util
    import sys

    for name in names:
        name = str(name)
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                if not path.is_file():
                    raise ConfigError(f"plugins: {name!r} is not a file")
                mod_name = f"aepo_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
                if mod_name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(mod_name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_name]
                    raise
            else:
                importlib.import_module(name)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"plugins: importing {name!r} failed: {type(e).__name__}: {e}") from None


def apply_preset(cfg: Config, algo: str) -> None:
    """Set the rollout/advantage/loss fields of the preset `algo` (docs/algorithms.md section 6)."""
    from aepo.algos.presets import get_preset

    preset = get_preset(algo)
    cfg.algo = algo
    apply_mapping(cfg, preset)


def _check(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {want}, got {value!r}; set it in the config file or as {key}=VALUE")


def _check_name(key: str, value: str, names: Any) -> None:
    names = list(names)
    if value not in names:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, names))} "
                          "(a name registered by a plugin needs plugins=[module or file.py])")


def validate(cfg: Config) -> None:
    """Every value in range and every name registered, before any work; ConfigError names the
    key, the value and what is accepted."""
    from aepo import algos
    from aepo.rollout.strategies import strategy_names
    from aepo.tools import tool_names

    r, t, a, tl = cfg.rollout, cfg.trainer, cfg.actor, cfg.tools
    _check_name("rollout.strategy", r.strategy, strategy_names())
    from aepo.formats import format_names

    _check_name("rollout.tool_format", r.tool_format, format_names())
    _check_name("actor.adv_estimator", a.adv_estimator, algos.advantage_names())
    _check_name("actor.policy_loss", a.policy_loss, algos.policy_loss_names())
    _check_name("actor.loss_agg_mode", a.loss_agg_mode, algos.AGG_MODES)
    _check_name("actor.kl_type", a.kl_type, algos.KL_KINDS)
    for i, name in enumerate(tl.enabled):
        _check_name(f"tools.enabled[{i}]", name, tool_names())
    try:
        algos.policy_loss_config(a)
        algos.advantage_config(a)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(r.n >= 1, "rollout.n", r.n, ">= 1")
    _check(0 <= r.initial_rollouts <= r.n, "rollout.initial_rollouts", r.initial_rollouts, f"in [0, rollout.n={r.n}]")
    _check(r.temperature > 0, "rollout.temperature", r.temperature, "> 0")
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "in (0, 1]")
    _check(r.top_k >= 0, "rollout.top_k", r.top_k, ">= 0 (0: off)")
    _check(r.sync_tolerance >= 0, "rollout.sync_tolerance", r.sync_tolerance, ">= 0 (0: no check)")
    _check(0 <= r.pause_below < 1, "rollout.pause_below", r.pause_below, "in [0, 1) (0: off)")
    _check(0 <= r.random_branch_p <= 1, "rollout.random_branch_p", r.random_branch_p, "in [0, 1]")
    for key in ("max_response_tokens", "n_probe", "branch_children", "entropy_top_k"):
        _check(getattr(r, key) >= 1, f"rollout.{key}", getattr(r, key), ">= 1")
    for key in ("max_tool_calls", "max_result_tokens"):
        _check(getattr(r, key) >= 0, f"rollout.{key}", getattr(r, key), ">= 0")
    for key in ("clip_ratio_low", "clip_ratio_high"):
        _check(0 <= getattr(a, key) < 1, f"actor.{key}", getattr(a, key), "in [0, 1) (a clip width around ratio 1)")
    _check(a.clip_ratio_c > 1, "actor.clip_ratio_c", a.clip_ratio_c, "> 1 (the dual-clip constant)")
    _check(a.kl_coef >= 0, "actor.kl_coef", a.kl_coef, ">= 0")
    lo = a.lora
    _check(lo.rank >= 0, "actor.lora.rank", lo.rank, ">= 0 (0: no adapters, full fine-tuning)")
    _check(lo.alpha > 0, "actor.lora.alpha", lo.alpha, "> 0")
    _check(0 <= lo.dropout < 1, "actor.lora.dropout", lo.dropout, "in [0, 1)")
    _check(all(isinstance(m, str) and m for m in lo.target_modules), "actor.lora.target_modules",
           lo.target_modules, "a list of module names, e.g. q_proj,v_proj (empty: the architecture's default)")
    _check(a.epo_start_step >= 0, "actor.epo_start_step", a.epo_start_step, ">= 0 (0: from the first step)")
    _check(0 <= a.overlong_buffer <= r.max_response_tokens, "actor.overlong_buffer", a.overlong_buffer,
           f"in [0, rollout.max_response_tokens={r.max_response_tokens}] (0: off)")
    _check(a.overlong_penalty >= 0, "actor.overlong_penalty", a.overlong_penalty, ">= 0")
    _check(t.total_steps >= 0, "trainer.total_steps", t.total_steps, ">= 0")
    for key in ("prompts_per_step", "ppo_mini_batch_size", "ppo_micro_batch_size", "ppo_epochs"):
        _check(getattr(t, key) >= 1, f"trainer.{key}", getattr(t, key), ">= 1")
    _check(t.lr > 0, "trainer.lr", t.lr, "> 0")
    _check(t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay, ">= 0")
    _check(all(0 <= b < 1 for b in t.betas), "trainer.betas", list(t.betas), "two numbers in [0, 1)")
    _check(t.grad_clip > 0, "trainer.grad_clip", t.grad_clip, "> 0")
    _check(t.warmup_steps >= 0, "trainer.warmup_steps", t.warmup_steps, ">= 0")
    _check(t.save_every >= 0, "trainer.save_every", t.save_every, ">= 0 (0: no checkpoints)")
    _check(t.keep_last >= 0, "trainer.keep_last", t.keep_last, ">= 0 (0: keep all)")
    _check(t.threads >= 0, "trainer.threads", t.threads, ">= 0 (0: the cores this process may use)")
    _check(tl.timeout > 0, "tools.timeout", tl.timeout, "> 0")
    _check(isinstance(tl.max_workers, int) and tl.max_workers >= 1, "tools.max_workers", tl.max_workers, "an int >= 1")
    _check(tl.python_timeout > 0, "tools.python_timeout", tl.python_timeout, "> 0")
    _check(tl.python_memory_mb >= 16, "tools.python_memory_mb", tl.python_memory_mb, ">= 16")
    _check(tl.search_topk >= 1, "tools.search_topk", tl.search_topk, ">= 1")
    sf, ev, dm = cfg.sft, cfg.eval, cfg.demo
    _check(sf.epochs >= 1, "sft.epochs", sf.epochs, ">= 1")
    _check(sf.lr > 0, "sft.lr", sf.lr, "> 0")
    _check(sf.batch_size >= 1, "sft.batch_size", sf.batch_size, ">= 1")
    _check(sf.max_len >= 2, "sft.max_len", sf.max_len, ">= 2")
    _check(ev.n >= 1, "eval.n", ev.n, ">= 1 (samples per question)")
    _check(ev.limit >= 0, "eval.limit", ev.limit, ">= 0 (0: every question)")
    _check(ev.batch_prompts >= 1, "eval.batch_prompts", ev.batch_prompts, ">= 1")
    from aepo.models.factory import PRESETS

    _check_name("demo.model_preset", dm.model_preset, PRESETS)
    for key, value in (("demo.n_demos", dm.n_demos), ("demo.demo_worlds", dm.demo_worlds),
                       ("demo.tokenizer_worlds", dm.tokenizer_worlds), ("demo.vocab_size", dm.vocab_size)):
        _check(value >= 1, key, value, ">= 1")
    _check(dm.recall_drills >= 0, "demo.recall_drills", dm.recall_drills, ">= 0")
    if r.backend == "vllm":
        import importlib.util

        try:
            found = importlib.util.find_spec("vllm") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError("rollout.backend=vllm, but vLLM is not installed in this environment; install it "
                              "with `AEPO_EXTRAS=vllm python3 quickstart.py test` (README, 'vLLM backend'), or "
                              "sample with the built-in engine: rollout.backend=torch (--backend torch)")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The YAML text of `cfg`, loadable by `load_config`."""
    d = to_dict(cfg)
    d["trainer"]["betas"] = list(d["trainer"]["betas"])
    return yaml.safe_dump(d, sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    from aepo.io import atomic_write_text

    atomic_write_text(path, config_yaml(cfg))


# ----------------------------------------------------------------------------- a model's own settings

from aepo.io import RUN_CONFIG_FILE  # noqa: E402 - the name a model directory's run config has

EVAL_KEYS = (
    "model.chat_template", "model.dtype",
    "rollout.temperature", "rollout.top_p", "rollout.top_k", "rollout.max_response_tokens",
    "rollout.max_tool_calls", "rollout.max_result_tokens", "rollout.tool_format",
    "tools.enabled", "tools.search_cache", "tools.search_corpus", "tools.search_url", "tools.search_topk",
    "tools.search_max_chars", "tools.timeout", "tools.python_timeout", "tools.python_memory_mb",
    "reward.multi_tool_bonus", "reward.format_penalty", "reward.qa_metric",
    "eval.n", "eval.limit", "eval.seed", "eval.batch_prompts",
)
"""The settings that decide what a model's answers and their scores are: `aepo eval` and
`aepo rollout` take them from the model's RUN_CONFIG_FILE unless told otherwise."""


def run_config_files(cfg: Config) -> dict[str, str]:
    """{RUN_CONFIG_FILE: YAML} for `save_model_dir(..., text_files=...)`. Relative search paths
    are made absolute, so the model's settings still find them from another directory; so is
    `model.path` of a LoRA run, the base model its adapter directories load onto."""
    cfg = dataclasses.replace(cfg, tools=dataclasses.replace(cfg.tools), model=dataclasses.replace(cfg.model))
    for name in ("search_cache", "search_corpus"):
        value = getattr(cfg.tools, name)
        if value:
            setattr(cfg.tools, name, str(Path(value).resolve()))
    if cfg.actor.lora.rank > 0 and cfg.model.path:
        cfg.model.path = str(Path(cfg.model.path).resolve())
    return {RUN_CONFIG_FILE: config_yaml(cfg)}


def config_value(cfg: Any, key: str) -> Any:
    """The value of dotted `key` ("rollout.temperature") in `cfg`."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def model_config(model_dir: str | Path, overrides: list[str] | None = None) -> tuple[Config, str]:
    """The settings to run `model_dir` with: its RUN_CONFIG_FILE (a model aepo did not make:
    the defaults of this schema), then `overrides`. Returns the config and one line saying
    which EVAL_KEYS came from the model and which were overridden."""
    path = Path(model_dir) / RUN_CONFIG_FILE
    own = path.is_file()
    try:
        cfg = load_config(path if own else None, overrides, loggers=False)
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path} or the command line)" if own else str(e)) from None
    given = {parse_override(o)[0] for o in overrides or []}

    def show(key: str) -> str:
        value = config_value(cfg, key)
        return f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}"

    source = f"from {path}" if own else "the defaults (the model has no " + RUN_CONFIG_FILE + ")"
    line = f"settings {source}: " + " ".join(show(k) for k in EVAL_KEYS if k not in given)
    if given:
        line += "; overridden: " + " ".join(show(k) if _has_key(cfg, k) else k for k in sorted(given))
    return cfg, line


def _has_key(cfg: Any, key: str) -> bool:
    try:
        config_value(cfg, key)
        return True
    except AttributeError:
        return False


# ----------------------------------------------------------------------------- reference

_FIELD_RE = re.compile(r"^    (\w+): [^=]+?(?:= (.*?))?(?:\s+#\s?(.*))?$")


def field_docs(cls: type) -> dict[str, str]:
    """{field: its comment} from the dataclass's source: the comment at the end of the field's
    line, after the comment lines just above it (the schema documents itself in one place)."""
    import inspect

    docs: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD_RE.match(line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            docs[m.group(1)] = " ".join([*above, m.group(3) or ""]).strip()
        above = []
    return docs


def config_reference() -> str:
    """docs/config.md: every key of the schema with its type, default and description."""
    lines = ["# Configuration reference", "",
             "Every command reads this one schema (`aepo.config.Config`): YAML files and dotted",
             "overrides (`rollout.n=8`) set its keys, and a command's flags are aliases of them",
             "(`aepo.cli.common.FLAGS`). Generated from the dataclasses by",
             "`python -c \"from aepo.config import config_reference; print(config_reference(), end='')\" > docs/config.md`.",
             ""]
    cfg = Config()
    top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(getattr(cfg, f.name))]
    lines += ["## Top level", "", "| key | default | description |", "|---|---|---|"]
    docs = field_docs(Config)
    for f in top:
        lines.append(f"| `{f.name}` | `{_default_text(getattr(cfg, f.name))}` | {docs.get(f.name, '')} |")
    for f in dataclasses.fields(Config):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        cls = type(section)
        lines += ["", f"## `{f.name}` ({cls.__name__})", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            lines += [" ".join(cls.__doc__.split()), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        lines += _reference_rows(section, f.name)
    return "\n".join(lines) + "\n"


def _reference_rows(section: Any, prefix: str) -> list[str]:
    """The reference table's rows for the fields of dataclass `section`, keys under `prefix`;
    a nested section (actor.lora) gets one row per field of its own."""
    cls = type(section)
    docs = field_docs(cls)
    hints = _hints(cls)
    rows = []
    for sub in dataclasses.fields(cls):
        value = getattr(section, sub.name)
        if dataclasses.is_dataclass(value):
            rows += _reference_rows(value, f"{prefix}.{sub.name}")
            continue
        kind = str(hints[sub.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
        rows.append(f"| `{prefix}.{sub.name}` | {kind.replace('|', '&#124;')} | "
                    f"`{_default_text(value)}` | {docs.get(sub.name, '').replace('|', '&#124;')} |")
    return rows


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, (list, dict, bool)) or value is None or value == "":
        return json.dumps(value)
    return str(value)
