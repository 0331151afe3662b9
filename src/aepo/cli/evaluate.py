"""`aepo eval`, `aepo rollout` and `aepo audit`: a fixed policy on questions, its rows, their token audit."""
from __future__ import annotations

import os
from pathlib import Path

import typer

from aepo.cli.common import BAD_INPUT, check_min, fail, flag, flag_overrides, warn
from aepo.cli.settings import (
    _check_backend,
    _check_data_file,
    _check_datasets,
    _check_search_url,
    _check_temperature,
    _default_out,
    _eval_key,
    _load_for_sampling,
    _merge_rollout_stats,
    _run_settings,
    _warn_without_search,
)


def eval_cmd(
    model: Path = typer.Argument(..., help="Local HF model directory."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides of the model's own settings "
                                                 "(its aepo_run.yaml), e.g. rollout.temperature=1.0 tools.search_topk=3"),
    data: list[Path] = typer.Option(..., "--data", help="Dataset file(s): JSONL or parquet. Repeatable."),
    samples: int | None = flag("samples", "--n"),
    out: Path | None = typer.Option(None, "--out", help="Results directory (default: runs/eval/<model path>)."),
    limit: int | None = flag("limit", "--limit"),
    temperature: float | None = flag("temperature", "--temperature"),
    max_response_tokens: int | None = flag("max_response_tokens", "--max-response-tokens"),
    max_tool_calls: int | None = flag("max_tool_calls", "--max-tool-calls"),
    backend: str | None = flag("backend", "--backend"),
    search_cache: Path | None = flag("search_cache", "--search-cache"),
    search_corpus: Path | None = flag("search_corpus", "--search-corpus"),
    search_url: str | None = flag("search_url", "--search-url"),
    chat_template: bool | None = flag("chat_template", "--chat-template/--no-chat-template"),
    tool_format: str | None = flag("tool_format", "--tool-format"),
    device: str = typer.Option("auto", "--device"),
    eval_seed: int | None = flag("eval_seed", "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace samples in --out that were made with other "
                               "settings or another model (without it, such samples are refused)."),
    judge: str | None = typer.Option(None, "--judge", help="OpenAI-compatible endpoint of an LLM judge "
                                        "(e.g. http://127.0.0.1:8000): also grade each answer with it."),
    judge_model: str = typer.Option("", "--judge-model", help="Model name served at --judge."),
    judge_key_env: str = typer.Option("AEPO_JUDGE_API_KEY", "--judge-key-env",
                                      help="Environment variable holding the judge's API key, if any."),
) -> None:
    """Answer every question N times with tools, as the model was trained (its aepo_run.yaml:
    prompt, tools, sampling, reward; flags and overrides change them); report pass@k, EM/F1,
    tool calls per dataset (and the LLM judge's accuracy with --judge)."""
    import dataclasses

    from aepo.config import ConfigError
    from aepo.data.datasets import load_dataset
    from aepo.eval.runner import evaluate_tasks, judge_records, rewrite_samples, summarize, write_summary
    from aepo.io import check_output_dir, check_output_file, claim_keyed_output
    from aepo.models.loading import check_model_dir, resolve_device
    from aepo.tools import build_tool_runner

    try:
        check_min("--n", samples, 1, "samples per question")
        check_min("--limit", limit, 1, "questions per file", "leave --limit out to use every question")
        check_min("--max-response-tokens", max_response_tokens, 1, "tokens per answer")
        check_min("--max-tool-calls", max_tool_calls, 0, "tool calls per answer")
        if temperature is not None:
            _check_temperature(temperature)
        if backend is not None:
            _check_backend(backend)
        grader = None
        if judge is not None:
            from aepo.data.judge import LLMJudge

            if not judge_model:
                raise ValueError("--judge needs --judge-model, the model name served at the endpoint")
            from aepo.data.judge import check_reachable as judge_reachable

            api_key = os.environ.get(judge_key_env) or None
            judge_reachable(judge, "--judge", model=judge_model, api_key=api_key)  # before a whole eval of failures
            grader = LLMJudge(judge, judge_model, api_key=api_key, retries=2)
        elif judge_model:
            raise ValueError("--judge-model without --judge; give the judge's endpoint with --judge URL")
        files = _check_datasets(data)
        check_model_dir(model)
        flags = flag_overrides({"samples": samples, "limit": limit, "temperature": temperature,
                                "max_response_tokens": max_response_tokens, "max_tool_calls": max_tool_calls,
                                "backend": backend, "search_cache": search_cache, "search_corpus": search_corpus,
                                "search_url": search_url, "chat_template": chat_template, "eval_seed": eval_seed,
                                "tool_format": tool_format})
        cfg, settings_line = _run_settings(model, flags, overrides)
        _check_search_url(cfg)
        n, seed, limit = cfg.eval.n, cfg.eval.seed, cfg.eval.limit or None
        rcfg = dataclasses.replace(cfg.rollout, strategy="independent", n=n)
        resolve_device(device)
        out = out or _default_out(model, "eval")
        check_output_dir(out, "--out")
        for name in files:
            check_output_file(out / f"{name}.samples.jsonl", "--out")
        for name in ("summary.json", "summary.md"):
            check_output_file(out / name, "--out")
        sets = {name: load_dataset(p, limit=limit) for name, p in files.items()}
        for name, p in files.items():
            claim_keyed_output(out / f"{name}.samples.jsonl", _eval_key(model, p, cfg),
                               force=force, what=f"--out holds {name} samples, but",
                               hint="give another --out (the default is one directory per model)")
        typer.echo(settings_line, err=True)
        _warn_without_search(sets, "search" in cfg.tools.enabled)
        runner = build_tool_runner(cfg.tools)
        m, tok, engine = _load_for_sampling(model, device, rcfg, dtype=cfg.model.dtype)
    except (ConfigError, *BAD_INPUT) as e:
        fail(str(e))
    summary = {}
    try:
        for name, tasks in sets.items():
            recs = evaluate_tasks(m, tok, tasks, runner.run, n=n, rollout_cfg=rcfg, seed=seed,
                                  batch_prompts=cfg.eval.batch_prompts,
                                  samples_path=out / f"{name}.samples.jsonl", chat_template=cfg.model.chat_template,
                                  tools=cfg.tools.enabled, title=f"eval {name}", backend=engine,
                                  reward_cfg=cfg.reward)
            if grader is not None:
                counts = judge_records(recs, grader)
                rewrite_samples(out / f"{name}.samples.jsonl", recs)
                if counts["failed"]:
                    warn(f"the judge at {judge} gave no verdict for {counts['failed']} of {counts['judged']} "
                          f"answers in {name} (see 'judge_error' in {name}.samples.jsonl)")
            summary[name] = summarize(recs)
            write_summary(out, summary, title=f"Evaluation of {model}")
    finally:
        runner.close()
        engine.close()
    typer.echo((out / "summary.md").read_text())
    typer.echo(f"written: {out / 'summary.json'}, {out / 'summary.md'}, per-sample {out}/*.samples.jsonl")


def rollout_cmd(
    model: Path = typer.Option(..., "--model", help="Local HF model directory."),
    data: Path = typer.Option(..., "--data", help="Questions: JSONL or parquet."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides of the model's own settings "
                                                 "(its aepo_run.yaml), e.g. rollout.branch_tau=0.3"),
    strategy: str | None = flag("strategy", "--strategy"),
    rows: int | None = flag("rows", "--n", "--k"),
    out: Path = typer.Option(Path("rollouts.jsonl"), "--out"),
    limit: int | None = typer.Option(8, "--limit", help="First N questions (default 8)."),
    temperature: float | None = flag("temperature", "--temperature"),
    max_response_tokens: int | None = flag("max_response_tokens", "--max-response-tokens"),
    search_corpus: Path | None = flag("search_corpus", "--search-corpus"),
    search_cache: Path | None = flag("search_cache", "--search-cache"),
    search_url: str | None = flag("search_url", "--search-url"),
    chat_template: bool | None = flag("chat_template", "--chat-template/--no-chat-template"),
    tool_format: str | None = flag("tool_format", "--tool-format"),
    device: str = typer.Option("auto", "--device"),
    backend: str | None = flag("backend", "--backend"),
    seed: int = typer.Option(0, "--seed"),
    batch_prompts: int = typer.Option(32, "--batch-prompts", help="Prompts rolled out together (one step "
                                      "of the progress bar)."),
) -> None:
    """Roll out a strategy as the model was trained (its aepo_run.yaml) and write one JSON object
    per row, to see what the agent did."""
    import random

    import torch

    from aepo.config import ConfigError
    from aepo.console import StepProgress
    from aepo.data.datasets import load_dataset
    from aepo.data.prompting import run_prompt
    from aepo.io import check_output_file, write_jsonl
    from aepo.models.loading import check_model_dir, resolve_device
    from aepo.rollout.audit import row_record
    from aepo.rollout.strategies import rollout, strategy_names
    from aepo.tools import build_tool_runner

    try:
        if strategy is not None and strategy not in strategy_names():
            raise ValueError(f"--strategy {strategy!r} is not one of {', '.join(strategy_names())}; pick one of those")
        check_min("--n", rows, 1, "rows per prompt")
        check_min("--limit", limit, 1, "questions")
        check_min("--max-response-tokens", max_response_tokens, 1, "tokens per row")
        check_min("--batch-prompts", batch_prompts, 1, "prompts rolled out together")
        if temperature is not None:
            _check_temperature(temperature)
        if backend is not None:
            _check_backend(backend)
        _check_data_file(data)
        check_model_dir(model)
        flags = flag_overrides({"strategy": strategy, "rows": rows, "temperature": temperature,
                                "max_response_tokens": max_response_tokens, "backend": backend,
                                "search_cache": search_cache, "search_corpus": search_corpus, "search_url": search_url,
                                "chat_template": chat_template, "tool_format": tool_format})
        cfg, settings_line = _run_settings(model, flags, overrides)
        rcfg = cfg.rollout
        strategy = rcfg.strategy
        resolve_device(device)
        check_output_file(out, "--out")
        if out.resolve() == data.resolve():
            raise ValueError(f"--out {out} is the --data file; writing rows there would replace the questions. "
                             f"Give another --out")
        check_output_file(out.with_name(out.stem + ".stats.json"), "--out")
        tasks = load_dataset(data, limit=limit)
        if not tasks:
            raise ValueError(f"--data {data} holds no questions; give a file with at least one row")
        typer.echo(settings_line, err=True)
        _warn_without_search({data.stem: tasks}, "search" in cfg.tools.enabled)
        _check_search_url(cfg)
        runner = build_tool_runner(cfg.tools)
        _, tok, engine = _load_for_sampling(model, device, rcfg, dtype=cfg.model.dtype)
    except (ConfigError, *BAD_INPUT) as e:
        fail(str(e))
    sampler = engine.sampler(seed)
    prompts = [(t.id, run_prompt(t.question, tok, cfg)) for t in tasks]
    batches = [prompts[i : i + batch_prompts] for i in range(0, len(prompts), batch_prompts)]
    rng = random.Random(seed)
    trajs, parts = [], []
    try:
        with torch.no_grad(), StepProgress(len(batches), 0, title=f"rollout {strategy}") as bar:
            for batch in batches:
                batch_trajs, batch_stats = rollout(strategy, batch, sampler, tok, runner.run, rcfg, rng)
                trajs += batch_trajs
                parts.append(batch_stats)
                shown = {"tool_calls": batch_stats.get("tool_calls_per_row"), "branches": batch_stats.get("branches")}
                # under the trainer's metric names as well as the plain ones, whichever the bar shows
                bar.advance({**shown, **{f"rollout/{key}": v for key, v in shown.items()}})
    finally:
        runner.close()
        engine.close()
    stats = {**_merge_rollout_stats(parts, trajs), **engine.stats()}
    rows = [row_record(tr, tok, rcfg.tool_format) for tr in trajs]
    write_jsonl(out, rows)
    stats_path = out.with_name(out.stem + ".stats.json")
    from aepo.io import atomic_write_json

    atomic_write_json(stats_path, {k2: v for k2, v in stats.items() if isinstance(v, (int, float, list, dict))})
    m = [x for x in stats.get("m") or [] if isinstance(x, (int, float))]
    typer.echo(f"{len(rows)} rows of {len(set(tr.prompt_id for tr in trajs))} prompts; "
               + (f"m {min(m)}..{max(m)}; " if m else "") + f"branches {stats.get('branches', 0)}; "
               f"tool calls per row {stats.get('tool_calls_per_row', 0):.2f}; finish {stats.get('finish_reasons')}")
    limited = f"; the first {limit} questions of {data}, --limit N for more" if limit and len(tasks) == limit else ""
    typer.echo(f"wrote {out} (rows{limited}) and {stats_path} (batch statistics: m, l, H_root/H_tool, every "
               f"decision)")


def audit(
    rows_file: Path = typer.Argument(..., metavar="ROWS", help="Rows written by `aepo rollout` (JSONL)."),
    model: Path = typer.Option(..., "--model", help="The model directory whose tokenizer made the rows."),
    tool_format: str | None = typer.Option(None, "--tool-format", help="Tool format of the rows (default: the "
                                           "rows' own tool_format field)."),
) -> None:
    """Check every row's token-level record (docs/algorithms.md section 2.1): ids and text agree, the
    loss mask covers exactly the model's tokens, the reward reads no tool text as the model's, every
    turn has a finish reason and every call a result. One line per check; exit 1 on any violation."""
    from aepo.io import iter_jsonl
    from aepo.models.loading import check_model_dir, load_tokenizer
    from aepo.rollout.audit import AUDIT_CHECKS, audit_rows, trajectory_of

    try:
        if not rows_file.is_file():
            raise FileNotFoundError(f"ROWS {rows_file} {'is a directory' if rows_file.is_dir() else 'does not exist'}; "
                                    "give the --out file of `aepo rollout`")
        check_model_dir(model)
        records = [row for _, row in iter_jsonl(rows_file)]
        if not records:
            raise ValueError(f"{rows_file} holds no rows; give the --out file of `aepo rollout`")
        formats = {tool_format or r.get("tool_format", "tags") for r in records}
        if len(formats) != 1:
            raise ValueError(f"{rows_file} mixes tool formats {sorted(formats)}; audit one format at a time")
        fmt = formats.pop()
        trajs = [trajectory_of(r) for r in records]
        tok = load_tokenizer(model)
        found = audit_rows(trajs, tok, fmt)
    except (KeyError, *BAD_INPUT) as e:
        fail(str(e).strip("'\""))
    total = len(trajs)
    for check in AUDIT_CHECKS:
        bad = found[check]
        line = f"{check:<13} {total - len(bad)}/{total} rows ok"
        typer.echo(line + (f", {len(bad)} violate it; first: {bad[0]}" if bad else ""))
    if any(found.values()):
        raise typer.Exit(1)
