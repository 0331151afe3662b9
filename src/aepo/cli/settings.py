"""Checks of a command's model, data and settings before any work, shared by train, eval, rollout,
audit and analyze."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aepo.cli.common import warn


def _check_backend(backend: str) -> str:
    from aepo.rollout.sampler import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def _load_for_sampling(model: Path, device: str, rcfg: Any, dtype: str = "float32") -> tuple[Any, Any, Any]:
    """(torch model or None, tokenizer, sampler backend) for `rcfg.backend`: the vLLM engine
    loads the directory itself, so no torch copy of the weights is made for it."""
    from aepo.models.loading import load_model, load_tokenizer
    from aepo.rollout.sampler import build_backend
    from aepo.train.threads import set_threads

    set_threads(0)
    if rcfg.backend == "vllm":
        tok = load_tokenizer(model)
        return None, tok, build_backend(rcfg, None, tok, model)
    m, tok = load_model(model, device=device, dtype=dtype)
    return m, tok, build_backend(rcfg, m, tok)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {temperature:g}; pass e.g. --temperature 1.0")


def _check_data_file(path: Path) -> None:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"--data {path} {what}; give a dataset file (.jsonl, .json or .parquet)")


def _check_datasets(data: Sequence[Path]) -> dict[str, Path]:
    """Dataset files by stem (results are keyed by it): two files with one stem are an error."""
    by_stem: dict[str, Path] = {}
    for p in data:
        _check_data_file(p)
        if p.stem in by_stem:
            first = by_stem[p.stem]
            if first.resolve() == p.resolve():
                raise ValueError(f"--data {p} is given twice; give each dataset once")
            raise ValueError(f"--data {first} and --data {p} have the same name {p.stem!r}, and results are "
                             f"written per name ({p.stem}.samples.jsonl); rename or copy one of them")
        by_stem[p.stem] = p
    return by_stem


def _warn_without_search(sets: dict[str, list[Any]], has_search: bool) -> None:
    """A one-line warning when no search backend is given but the rows look like search QA."""
    from aepo.eval.runner import search_qa_share

    if has_search:
        return
    names = [name for name, tasks in sets.items() if search_qa_share(tasks) >= 0.5]
    if names:
        warn(f"no search tool is configured, but the rows of {', '.join(names)} look like search QA "
              f"(short factual answers); pass --search-cache, --search-corpus or --search-url so the agent "
              f"can search")


def _merge_rollout_stats(parts: list[dict[str, Any]], trajs: Sequence[Any]) -> dict[str, Any]:
    """The statistics of one rollout over all prompts, from those of its batches: lists are
    concatenated, counts added, means weighted by prompts (mean_l recomputed from l_values)."""
    if len(parts) == 1:
        return parts[0]
    n_prompts = [len(st.get("m") or st.get("rows_per_prompt") or []) or 1 for st in parts]
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for st in parts for k in st):
        vals = [(st[key], w) for st, w in zip(parts, n_prompts) if key in st]
        first = vals[0][0]
        if isinstance(first, list):
            out[key] = [x for v, _ in vals for x in v]
        elif isinstance(first, dict):
            merged: dict[Any, Any] = {}
            for v, _ in vals:
                for k2, x in v.items():
                    both = isinstance(x, (int, float)) and isinstance(merged.get(k2, 0), (int, float))
                    merged[k2] = merged.get(k2, 0) + x if both else x
            out[key] = merged
        elif isinstance(first, bool) or not isinstance(first, (int, float)):
            out[key] = vals[-1][0]
        elif all(isinstance(v, int) for v, _ in vals):
            out[key] = sum(v for v, _ in vals)
        else:
            out[key] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
    all_l = [x for group in out.get("l_values") or [] for x in group]
    if "mean_l" in out:
        out["mean_l"] = sum(all_l) / len(all_l) if all_l else 0.0
    if "tool_calls_per_row" in out and trajs:
        out["tool_calls_per_row"] = sum(t.n_tool_calls for t in trajs) / len(trajs)
    return out


def _check_lora(cfg: Any, model_dir: str | Path, option: str) -> None:
    """With actor.lora.rank > 0: the adapters fit the model in `model_dir` (`check_lora_dir`,
    no weights read); a model to train must not itself be an adapter directory."""
    from aepo.models.lora import check_lora_dir, is_adapter_dir

    if is_adapter_dir(model_dir):
        raise ValueError(f"{option} {model_dir} is a LoRA adapter directory; train from a full model: merge it "
                         f"first (aepo model merge {model_dir} OUT) and give OUT")
    if cfg.actor.lora.rank > 0:
        check_lora_dir(model_dir, cfg.actor.lora)


def _run_settings(model: Path, flags: list[str], overrides: list[str] | None) -> tuple[Any, str]:
    """The model's own settings (its aepo_run.yaml, else the defaults), then the flags, then the
    dotted overrides. A search source given on the command line replaces the model's (a demo
    model's world corpus is no fallback for a real benchmark's cache); search is dropped from
    the tools when no source is known."""
    import dataclasses

    from aepo.config import model_config

    sources = ("tools.search_cache", "tools.search_corpus", "tools.search_url")
    given = {o.split("=", 1)[0] for o in [*flags, *(overrides or [])]}
    if given & set(sources):
        flags = [*(f"{k}=" for k in sources if k not in given), *flags]
    cfg, line = model_config(model, [*flags, *(overrides or [])])
    t = cfg.tools
    has_source = bool(t.search_cache or t.search_corpus or t.search_url)
    if has_source and "search" not in t.enabled:
        cfg.tools = dataclasses.replace(t, enabled=[*t.enabled, "search"])
    elif not has_source and "search" in t.enabled:
        cfg.tools = dataclasses.replace(t, enabled=[x for x in t.enabled if x != "search"])
    return cfg, line


def _check_search_url(cfg: Any) -> None:
    """A retriever that does not answer fails now, not as a whole run of failed searches."""
    if cfg.tools.search_url and "search" in cfg.tools.enabled:
        from aepo.tools.search import check_reachable

        check_reachable(cfg.tools.search_url, "--search-url (tools.search_url)")


def _default_out(model: Path, base: str) -> Path:
    """runs/<base>/<the model's path, joined>: each model gets its own results directory."""
    parts = [p for p in model.parts if p not in ("", ".", "..", "runs", "/")] or ["model"]
    return Path("runs") / base / "-".join(parts[-3:])


def _eval_key(model: Path, data_file: Path, cfg: Any) -> dict[str, Any]:
    """What decides an evaluation's samples: the model's identity, the dataset, the sampler
    engine and every setting of EVAL_KEYS (eval.n, eval.limit and eval.seed among them). A
    samples file is reused only under exactly this key."""
    import hashlib

    from aepo.config import EVAL_KEYS, config_value
    from aepo.models.loading import model_identity

    return {"model": model_identity(model), "data": hashlib.sha256(data_file.read_bytes()).hexdigest()[:16],
            "backend": cfg.rollout.backend, "settings": {k: config_value(cfg, k) for k in EVAL_KEYS}}
