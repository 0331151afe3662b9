"""What every `aepo` command shares: one way to fail, warn and check a number."""
from __future__ import annotations

from typing import Any

import typer

from aepo.console import printable

BAD_INPUT = (ValueError, FileNotFoundError)
"""What the library raises for bad input: ConfigError, ModelDirError, OutputPathError,
RunDirError and StaleOutputError are ValueErrors; a missing input file is a
FileNotFoundError. At the command line each becomes one `error: ...` line and exit status 2,
never a traceback."""


def fail(message: str) -> None:
    """One line on stderr, `error: <what is wrong>; <what to do>`, and exit status 2."""
    typer.secho(printable(f"error: {message}"), fg="red", err=True)
    raise typer.Exit(2)


def warn(message: str) -> None:
    typer.secho(printable(f"warning: {message}"), fg="yellow", err=True)


def check_min(option: str, value: float | None, low: float, what: str, hint: str = "") -> None:
    """ValueError when an option is below its minimum, naming the option, the value and the range."""
    if value is not None and value < low:
        raise ValueError(f"{option} must be >= {low:g} ({what}), got {value:g}"
                         f"; {hint or f'pass {option} {low:g} or more'}")


FLAGS: dict[str, tuple[str, str]] = {
    # parameter name: (the config key the flag sets, what it is)
    "temperature": ("rollout.temperature", "Sampling temperature."),
    "max_response_tokens": ("rollout.max_response_tokens", "Tokens per answer, tool results included."),
    "max_tool_calls": ("rollout.max_tool_calls", "Tool calls per answer."),
    "backend": ("rollout.backend", "Sampler engine: torch | vllm (the vllm extra)."),
    "strategy": ("rollout.strategy", "Rollout strategy: independent | arpo | aepo."),
    "rows": ("rollout.n", "Rows per prompt (one group)."),
    "chat_template": ("model.chat_template", "Wrap prompts with the tokenizer's chat template."),
    "tool_format": ("rollout.tool_format", "How the model calls tools: tags | hermes (docs/algorithms.md 2.1)."),
    "search_cache": ("tools.search_cache", "JSON cache of search results."),
    "search_corpus": ("tools.search_corpus", "JSONL corpus for BM25 search."),
    "search_url": ("tools.search_url", "Search-R1 style /retrieve endpoint."),
    "samples": ("eval.n", "Samples per question (pass@k for k <= n)."),
    "limit": ("eval.limit", "The first N questions of each file (0: all)."),
    "eval_seed": ("eval.seed", "Sampling seed."),
    "epochs": ("sft.epochs", "Passes over the data."),
    "lr": ("sft.lr", "Peak learning rate."),
    "batch_size": ("sft.batch_size", "Examples per optimizer step."),
    "sft_seed": ("sft.seed", "Shuffling seed."),
}
"""Every flag that sets a config key, declared once: `flag` makes the option (its help names
the key), `flag_overrides` turns the given ones into `key=value` overrides. A flag left out
keeps the value from the model's aepo_run.yaml (eval, rollout, sft) or the config's default."""


def flag(param: str, *names: str, **kwargs: Any) -> Any:
    """The typer option of FLAGS[param]: not given (None) unless set on the command line."""
    key, text = FLAGS[param]
    return typer.Option(None, *names, help=f"{text} [{key}]", **kwargs)


def flag_overrides(values: dict[str, Any]) -> list[str]:
    """`key=value` for each flag that was given ({parameter name: value or None})."""
    import json

    out = []
    for param, value in values.items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, bool) else str(value)
        out.append(f"{FLAGS[param][0]}={text}")
    return out
