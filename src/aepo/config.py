"""Typed run configuration: dataclasses loaded from YAML with dotted command-line overrides.

Names follow verl where the concept is the same (`rollout.n`, `clip_ratio_low`,
`clip_ratio_high`, `loss_agg_mode`, `ppo_mini_batch_size`, `ppo_epochs`), so moving between
the two feels familiar. Every unknown key or bad value fails before any work, naming the key
and the valid choices.

    cfg = load_config("configs/demo.yaml", ["algo=grpo", "rollout.n=8"])
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and what is accepted."""


@dataclass
class ModelConfig:
    path: str = ""  # local HF directory; empty: the demo builds its own tiny model
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    gradient_checkpointing: bool = False
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template


@dataclass
class RolloutConfig:
    strategy: Literal["independent", "arpo", "aepo"] = "aepo"
    n: int = 8  # k: rows per prompt, one group
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_response_tokens: int = 256
    max_tool_calls: int = 6
    max_result_tokens: int = 128
    # a segment's entropy: the sum of its first n_probe token entropies / log|V|, rescaled by
    # n_probe / n when it has n < n_probe tokens (ALGORITHMS.md section 1)
    n_probe: int = 20
    # ARPO entropy-based adaptive branching
    initial_rollouts: int = 0  # m; 0 means n // 2
    branch_alpha: float = 0.5
    branch_beta: float = 0.2  # ARPO beta; AEPO's gamma below
    branch_children: int = 1  # Z
    # AEPO dynamic entropy-balanced rollout
    premonitor: bool = True
    beta_pm: float = 0.5
    reuse_probe: bool = True
    branch_gamma: float = 0.2
    branch_penalty: float = 0.05  # lambda_pen
    branch_tau: float = 0.5
    # ARPO and AEPO branch rule (ALGORITHMS.md 3.3): "threshold" the paper, "released" the
    # authors' code (random base U), "sample" Bernoulli(P); the default is chosen from demo
    # measurements given in rollout.strategies.branch_decision
    branch_decision: Literal["threshold", "released", "sample"] = "threshold"
    penalty_scope: Literal["chain", "prompt"] = "chain"  # "prompt" is the released behaviour
    m_compat: bool = False  # released code: int(k * sigmoid) + 1
    segment_entropy_compat: bool = False  # released code: plain sum over n_probe, no length rescale


@dataclass
class AlgoConfig:
    """Advantage, policy loss and regularisers. `algo=NAME` fills these from a preset."""

    adv_estimator: Literal["grpo", "rloo", "reinforce_pp", "aepo"] = "grpo"
    norm_adv_by_std_in_grpo: bool = True
    # alpha_H of the aepo estimator; z(H) uses the training forward pass, per micro-batch
    entropy_adv_alpha: float = 0.2
    # tree rollouts (ARPO/AEPO branching): "soft" trains a shared prefix once per row that holds
    # it; "hard" trains it once, with the mean advantage of those rows (ALGORITHMS.md section 4)
    tree_attribution: Literal["soft", "hard"] = "soft"
    policy_loss: Literal["ppo", "dapo", "gppo", "cispo", "aepo", "clip_cov", "kl_cov"] = "ppo"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    loss_agg_mode: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"
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
    # re-score each rollout with the trainer's model before the update (verl's old_log_prob):
    # needed when the sampler is not the trainer's own fp32 model (vLLM, bf16 kernels)
    recompute_old_log_prob: bool = False
    kl_coef: float = 0.0  # KL to the reference policy; 0 = no reference model
    kl_type: Literal["k1", "k2", "k3"] = "k3"
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    overlong_buffer: int = 0  # DAPO overlong reward shaping; 0 = off
    overlong_penalty: float = 1.0


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
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])


@dataclass
class DataConfig:
    train: str = ""  # JSONL/parquet; empty: the demo world's train split
    prompt_key: str = ""  # empty: auto-detect (question, problem, prompt, query)
    answer_key: str = ""  # empty: auto-detect (answer, answers, golden_answers, target)
    world_seed: int = 0
    world_level: int = 2


@dataclass
class ToolsConfig:
    enabled: list[str] = field(default_factory=lambda: ["search", "calc", "python"])
    search_cache: str = ""
    search_corpus: str = ""
    search_url: str = ""
    search_topk: int = 3
    search_max_chars: int = 600
    timeout: float = 10.0  # per tool call
    python_timeout: float = 10.0  # the sandbox's own wall-clock limit (at most `timeout`)
    python_memory_mb: int = 512
    # "strict": namespaces, a minimal root and a system-call filter, or refuse to run;
    # "limits-only": resource limits only, the program can read host files (README "Security")
    python_isolation: Literal["strict", "limits-only"] = "strict"


@dataclass
class RewardConfig:
    multi_tool_bonus: float = 0.0
    format_penalty: float = -1.0


@dataclass
class Config:
    algo: str = "aepo"
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    out_dir: str = "runs/default"


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


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
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
            _apply(cur, v, key + ".")
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a Config from defaults, then the preset named by `algo`, then YAML, then overrides."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        data = loaded
    for ov in overrides or []:
        data = _merge(data, _nest(*parse_override(ov)))
    cfg = Config()
    algo = data.get("algo", cfg.algo)
    apply_preset(cfg, str(algo))
    _apply(cfg, data)
    validate(cfg)
    return cfg


def apply_preset(cfg: Config, algo: str) -> None:
    """Set the rollout/advantage/loss fields of the preset `algo` (ALGORITHMS.md section 6)."""
    from aepo.algos.presets import get_preset

    preset = get_preset(algo)
    cfg.algo = algo
    _apply(cfg, preset)


def validate(cfg: Config) -> None:
    r, t = cfg.rollout, cfg.trainer
    if r.n < 1:
        raise ConfigError(f"rollout.n must be >= 1, got {r.n}")
    if r.initial_rollouts < 0 or r.initial_rollouts > r.n:
        raise ConfigError(f"rollout.initial_rollouts must be in [0, rollout.n={r.n}], got {r.initial_rollouts}")
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature must be > 0, got {r.temperature}")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if t.ppo_micro_batch_size < 1 or t.ppo_mini_batch_size < 1:
        raise ConfigError("trainer.ppo_mini_batch_size and trainer.ppo_micro_batch_size must be >= 1")
    if t.total_steps < 0:
        raise ConfigError(f"trainer.total_steps must be >= 0, got {t.total_steps}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    from aepo.io import atomic_write_text

    d = to_dict(cfg)
    d["trainer"]["betas"] = list(d["trainer"]["betas"])
    atomic_write_text(path, yaml.safe_dump(d, sort_keys=False))
