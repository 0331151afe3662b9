"""Loading a run configuration: YAML files and dotted overrides onto the schema (`aepo.config.schema`),
presets, plugins, validation, saving, and a model directory's own settings (RUN_CONFIG_FILE)."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from aepo.config.schema import Config
from aepo.errors import ConfigError
from aepo.io import RUN_CONFIG_FILE


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
    from aepo.models.factory import MODEL_PRESETS

    _check_name("demo.model_preset", dm.model_preset, MODEL_PRESETS)
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
                              "with `AEPO_EXTRAS=vllm python3 quickstart.py test` (docs/gpu.md, 'vLLM backend'), or "
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

EVAL_KEYS = (
    "model.chat_template", "model.dtype",
    "rollout.temperature", "rollout.top_p", "rollout.top_k", "rollout.max_response_tokens",
    "rollout.max_tool_calls", "rollout.max_result_tokens", "rollout.tool_format", "rollout.scheduler",
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
