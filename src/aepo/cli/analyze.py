"""`aepo analyze branching`: the algorithms' mechanisms measured on a fixed policy."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from aepo.cli.common import BAD_INPUT, check_min, fail, flag, flag_overrides
from aepo.cli.settings import (
    _check_data_file,
    _check_search_url,
    _check_temperature,
    _load_for_sampling,
    _run_settings,
    _warn_without_search,
)

app = typer.Typer(no_args_is_help=True)


@app.command("branching")
def analyze_branching_cmd(
    model: Path = typer.Option(..., "--model", help="Local HF model directory (the fixed policy)."),
    data: Path = typer.Option(..., "--data", help="Questions: JSONL or parquet."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides of the model's own settings "
                                                 "(its aepo_run.yaml), e.g. rollout.branch_alpha=0.5"),
    k: int = typer.Option(8, "--k", help="Rows per prompt (every arm gets exactly k)."),
    continuations: int = typer.Option(8, "--continuations", help="Monte-Carlo continuations per branch "
                                      "decision, to estimate its success probability q."),
    out: Path = typer.Option(Path("branching.json"), "--out"),
    limit: int | None = typer.Option(32, "--limit", help="First N questions (default 32)."),
    lambdas: str = typer.Option("0.05,0.1,0.2", "--lambdas", help="AEPO penalties lambda_pen measured at fixed "
                                "m = k/2 (comma-separated; empty for none)."),
    temperature: float | None = flag("temperature", "--temperature"),
    max_response_tokens: int | None = flag("max_response_tokens", "--max-response-tokens"),
    search_corpus: Path | None = flag("search_corpus", "--search-corpus"),
    search_cache: Path | None = flag("search_cache", "--search-cache"),
    search_url: str | None = flag("search_url", "--search-url"),
    chat_template: bool | None = flag("chat_template", "--chat-template/--no-chat-template"),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed"),
    batch_prompts: int = typer.Option(16, "--batch-prompts", help="Prompts rolled out together."),
) -> None:
    """Does AEPO's branching pay? At every branch decision of ARPO / AEPO trees from a fixed
    policy, estimate the state's success probability q by continuations; report whether dH
    ranks states by q(1 - q) (AUROC) and the independent / arpo / aepo / random / oracle arms at
    equal rows per prompt (docs/algorithms.md section 8)."""
    import time

    import torch

    from aepo.config import ConfigError
    from aepo.data.datasets import load_dataset
    from aepo.data.prompting import run_prompt
    from aepo.eval.branching import analyze_branching
    from aepo.io import atomic_write_json, check_output_file
    from aepo.models.loading import check_model_dir, resolve_device
    from aepo.rewards import score_trajectory
    from aepo.tools import build_tool_runner

    try:
        check_min("--k", k, 2, "rows per prompt")
        check_min("--continuations", continuations, 2, "continuations per decision")
        check_min("--limit", limit, 1, "questions")
        check_min("--batch-prompts", batch_prompts, 1, "prompts rolled out together")
        if temperature is not None:
            _check_temperature(temperature)
        try:
            lams = [float(x) for x in lambdas.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--lambdas {lambdas!r} must be comma-separated numbers, e.g. 0.05,0.1,0.2") from None
        if any(x < 0 for x in lams):
            raise ValueError(f"--lambdas {lambdas!r}: a penalty lambda_pen must be >= 0")
        _check_data_file(data)
        check_model_dir(model)
        flags = flag_overrides({"temperature": temperature, "max_response_tokens": max_response_tokens,
                                "search_cache": search_cache, "search_corpus": search_corpus, "search_url": search_url,
                                "chat_template": chat_template})
        cfg, settings_line = _run_settings(model, ["rollout.backend=torch", *flags], overrides)
        resolve_device(device)
        check_output_file(out, "--out")
        tasks = load_dataset(data, limit=limit)
        if not tasks:
            raise ValueError(f"--data {data} holds no questions; give a file with at least one row")
        typer.echo(settings_line, err=True)
        _warn_without_search({data.stem: tasks}, "search" in cfg.tools.enabled)
        _check_search_url(cfg)
        runner = build_tool_runner(cfg.tools)
        _, tok, engine = _load_for_sampling(model, device, cfg.rollout, dtype=cfg.model.dtype)
    except (ConfigError, *BAD_INPUT) as e:
        fail(str(e))
    by_id = {t.id: t for t in tasks}

    def score(traj: Any) -> dict[str, float]:
        task = by_id[traj.prompt_id]
        return score_trajectory(traj, task.answers, task.data_source, multi_tool_bonus=cfg.reward.multi_tool_bonus,
                                format_penalty=cfg.reward.format_penalty, qa_metric=cfg.reward.qa_metric,
                                tool_format=cfg.rollout.tool_format)

    prompts = [(t.id, run_prompt(t.question, tok, cfg)) for t in tasks]
    t0 = time.time()
    try:
        with torch.no_grad():
            report = analyze_branching(engine.sampler(seed), tok, runner.run, prompts, score, cfg.rollout, k=k,
                                       continuations_per_state=continuations, seed=seed, lambdas=lams,
                                       batch_prompts=batch_prompts, progress=lambda m: typer.echo(m, err=True))
    except ValueError as e:
        fail(str(e))
    finally:
        runner.close()
        engine.close()
    report = {"command": "aepo analyze branching " + " ".join(sys.argv[3:]), "model": str(model), "data": str(data),
              "seconds": time.time() - t0, **report}
    atomic_write_json(out, report)
    a = report["arms"]
    typer.echo(f"{report['states']} decision states; AUROC of dH vs q(1-q): {report['auroc_dH_vs_uncertainty']}")
    for name, met in a.items():
        typer.echo(f"  {name:11s} learnable {met['learnable_groups']}, sibling disagreement "
                   f"{met['sibling_disagreement']}, tokens {met['tokens']}, tool paths {met['distinct_tool_paths']}")
    typer.echo(f"wrote {out}")
