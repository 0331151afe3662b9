"""`aepo` command line: demo, sft, train, eval, compare, rollout, model, tools, world."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

import aepo
from aepo.models.cli import app as model_app
from aepo.models.smollm2 import import_smollm2_command
from aepo.tasks.cli import app as world_app
from aepo.tools.cli import app as tools_app

app = typer.Typer(
    name="aepo",
    help="Train tool-using LLM agents with AEPO and the methods it is compared with.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app.command("import-smollm2")(import_smollm2_command)
app.add_typer(model_app, name="model", help="Create or import models.")
app.add_typer(tools_app, name="tools", help="Run the agent's tools by hand.")
app.add_typer(world_app, name="world", help="Build the synthetic demo world.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aepo {aepo.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """aepo: Agentic Entropy-Balanced Policy Optimization."""


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory (cached stages are reused)."),
    quick: bool = typer.Option(False, "--quick", help="About a minute: tiny sizes, for smoke tests."),
    algo: str = typer.Option("aepo", "--algo", help="Algorithm preset for the RL stage."),
    seed: int = typer.Option(0, "--seed"),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted config overrides, e.g. trainer.lr=1e-4"),
) -> None:
    """Build the demo world, train a tiny agent (SFT, then RL), evaluate both and write a report."""
    from aepo.config import ConfigError
    from aepo.demo import run_demo

    try:
        summary = run_demo(out, quick=quick, algo=algo, seed=seed, overrides=overrides)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"SFT accuracy {100 * summary['sft_accuracy']:.1f}%  ->  RL accuracy "
               f"{100 * summary['rl_accuracy']:.1f}%   report: {Path(out) / 'summary.md'}")


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config (see src/aepo/configs/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides: algo=grpo rollout.n=8 ..."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in out_dir."),
) -> None:
    """RL-train a model (model.path) on a dataset (data.train) or the demo world."""
    from aepo.config import ConfigError, load_config
    from aepo.demo import world_tasks
    from aepo.models.loading import load_model, save_model_dir
    from aepo.runtime import build_tool_runner, load_tasks
    from aepo.train.rl import RLTrainer

    try:
        cfg = load_config(config, overrides)
        if not cfg.model.path:
            raise ConfigError("model.path is empty: give a local HF model directory, e.g. model.path=runs/demo/sft")
        corpus = None
        if cfg.data.train:
            tasks = load_tasks(cfg.data.train, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key)
        else:
            from aepo.tasks.world import build_world

            world = build_world(seed=cfg.data.world_seed, level=cfg.data.world_level)
            tasks, corpus = world_tasks(world.train), world.corpus
        runner = build_tool_runner(cfg.tools, corpus_docs=corpus)
        model, tok = load_model(cfg.model.path, device=cfg.model.device, dtype=cfg.model.dtype)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    try:
        RLTrainer(cfg, model, tok, tasks, runner.run, cfg.out_dir).fit(resume=resume)
    finally:
        runner.close()
    save_model_dir(Path(cfg.out_dir) / "final", model, tok)
    typer.echo(f"done: model in {Path(cfg.out_dir) / 'final'}, metrics in {Path(cfg.out_dir) / 'metrics.jsonl'}")


@app.command()
def sft(
    model: Path = typer.Option(..., "--model", help="Local HF model directory to start from."),
    data: Path = typer.Option(..., "--data", help="JSONL demonstrations: {prompt, segments} or {messages}."),
    out: Path = typer.Option(..., "--out", help="Where to save the trained model."),
    epochs: int = typer.Option(3, "--epochs"),
    lr: float = typer.Option(2e-3, "--lr"),
    batch_size: int = typer.Option(32, "--batch-size"),
    chat_template: bool = typer.Option(False, "--chat-template", help="Wrap prompts with the chat template."),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Supervised cold start on tool-use demonstrations (tool results masked out of the loss)."""
    from aepo.models.loading import load_model, save_model_dir
    from aepo.train.sft import SFTConfig, load_sft_jsonl, sft_train

    try:
        m, tok = load_model(model, device=device)
        examples = load_sft_jsonl(data, tok, chat_template=chat_template)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    hist = sft_train(m, tok, examples, SFTConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed))
    save_model_dir(out, m, tok, jsonl_files={"sft_history.jsonl": hist})
    typer.echo(f"saved {out} (final loss {hist[-1]['loss']:.4f})")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="Local HF model directory."),
    data: List[Path] = typer.Option(..., "--data", help="Dataset file(s): JSONL or parquet. Repeatable."),
    n: int = typer.Option(1, "--n", help="Samples per question (pass@k for k <= n)."),
    out: Path = typer.Option(Path("runs/eval"), "--out"),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N questions of each file."),
    temperature: float = typer.Option(1.0, "--temperature"),
    max_response_tokens: int = typer.Option(512, "--max-response-tokens"),
    max_tool_calls: int = typer.Option(6, "--max-tool-calls"),
    search_cache: Optional[Path] = typer.Option(None, "--search-cache", help="JSON cache of search results."),
    search_corpus: Optional[Path] = typer.Option(None, "--search-corpus", help="JSONL corpus for BM25 search."),
    search_url: Optional[str] = typer.Option(None, "--search-url", help="Search-R1 style /retrieve endpoint."),
    chat_template: bool = typer.Option(False, "--chat-template"),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Answer every question N times with tools; report pass@k, EM/F1, tool calls per dataset."""
    from aepo.config import ConfigError, RolloutConfig
    from aepo.eval.runner import evaluate_tasks, summarize, write_summary
    from aepo.models.loading import load_model
    from aepo.runtime import build_tool_runner, load_tasks, search_tools_config

    tcfg = search_tools_config(search_cache, search_corpus, search_url)
    rcfg = RolloutConfig(strategy="independent", n=n, temperature=temperature,
                         max_response_tokens=max_response_tokens, max_tool_calls=max_tool_calls)
    try:
        sets = {p.stem: load_tasks(p, limit=limit) for p in data}
        runner = build_tool_runner(tcfg)
        m, tok = load_model(model, device=device)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    summary = {}
    try:
        for name, tasks in sets.items():
            recs = evaluate_tasks(m, tok, tasks, runner.run, n=n, rollout_cfg=rcfg, seed=seed,
                                  samples_path=out / f"{name}.samples.jsonl", chat_template=chat_template,
                                  title=f"eval {name}")
            summary[name] = summarize(recs)
            write_summary(out, summary, title=f"Evaluation of {model}")
    finally:
        runner.close()
    typer.echo((out / "summary.md").read_text())
    typer.echo(f"written: {out / 'summary.json'}, {out / 'summary.md'}, per-sample {out}/*.samples.jsonl")


@app.command("rollout")
def rollout_cmd(
    model: Path = typer.Option(..., "--model", help="Local HF model directory."),
    data: Path = typer.Option(..., "--data", help="Questions: JSONL or parquet."),
    strategy: str = typer.Option("aepo", "--strategy", help="independent | arpo | aepo"),
    k: int = typer.Option(8, "--k", help="Rows per prompt (one group)."),
    out: Path = typer.Option(Path("rollouts.jsonl"), "--out"),
    limit: Optional[int] = typer.Option(8, "--limit", help="First N questions."),
    temperature: float = typer.Option(1.0, "--temperature"),
    max_response_tokens: int = typer.Option(512, "--max-response-tokens"),
    search_corpus: Optional[Path] = typer.Option(None, "--search-corpus"),
    search_cache: Optional[Path] = typer.Option(None, "--search-cache"),
    search_url: Optional[str] = typer.Option(None, "--search-url"),
    chat_template: bool = typer.Option(False, "--chat-template"),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Roll out a strategy and write one JSON object per row, to see what the agent did."""
    import random

    import torch

    from aepo.config import Config, ConfigError, RolloutConfig, validate
    from aepo.io import write_jsonl
    from aepo.models.loading import load_model
    from aepo.rollout.strategies import rollout, strategy_names
    from aepo.rollout.torch_sampler import TorchSampler
    from aepo.runtime import build_tool_runner, load_tasks, search_tools_config
    from aepo.tasks.prompting import encode_prompt

    if strategy not in strategy_names():
        _fail(f"--strategy {strategy!r} is not one of {', '.join(strategy_names())}")
    tcfg = search_tools_config(search_cache, search_corpus, search_url)
    rcfg = RolloutConfig(strategy=strategy, n=k, temperature=temperature, max_response_tokens=max_response_tokens)
    try:
        validate(Config(rollout=rcfg))
        tasks = load_tasks(data, limit=limit)
        runner = build_tool_runner(tcfg)
        m, tok = load_model(model, device=device)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    sampler = TorchSampler(m, tok, temperature=temperature, seed=seed)
    prompts = [(t.id, encode_prompt(t.question, tok, chat_template=chat_template)) for t in tasks]
    try:
        with torch.no_grad():
            trajs, stats = rollout(strategy, prompts, sampler, tok, runner.run, rcfg, random.Random(seed))
    finally:
        runner.close()
    rows = []
    for tr in trajs:
        rows.append({
            "prompt_id": tr.prompt_id, "row_id": tr.row_id, "parent_row_id": tr.parent_row_id,
            "branch_position": tr.branch_position, "prompt": tok.decode(tr.prompt_ids), "text": tr.text,
            "segments": [{"role": s.role, "entropy": s.entropy, "text": s.text} for s in tr.segments],
            "tool_calls": [{"name": c.name, "argument": c.argument, "ok": c.ok, "result": c.result}
                           for c in tr.tool_calls],
            "finish_reason": tr.finish_reason, "n_tokens": len(tr.response_ids),
            # the prompt's global budget and every branch decision on the row's chain
            "m": tr.m, "decisions": tr.decisions,
        })
    write_jsonl(out, rows)
    summary = {k2: v for k2, v in stats.items() if isinstance(v, (int, float, list, dict))}
    typer.echo(json.dumps(summary, default=str))
    typer.echo(f"wrote {len(rows)} rows to {out}")


@app.command()
def compare(
    algos: str = typer.Option("grpo,dapo,gppo,cispo,arpo,aepo", "--algos", help="Comma-separated presets."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds per algorithm (0..N-1)."),
    out: Path = typer.Option(Path("runs/compare"), "--out"),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes, for smoke tests."),
    base: Optional[Path] = typer.Option(None, "--from", help="Reuse the world and SFT model of this run "
                                        "directory (e.g. runs/demo) instead of building them in OUT/base."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides applied to every run."),
) -> None:
    """Train each algorithm on the demo world from one SFT model, evaluate, and write compare.md."""
    from aepo.eval.compare import run_compare

    names = [a.strip() for a in algos.split(",") if a.strip()]
    cmd = "aepo compare " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "aepo compare"
    try:
        report = run_compare(names, seeds, out, quick=quick, overrides=overrides, command=cmd, base=base)
    except ValueError as e:
        _fail(str(e))
    typer.echo(report.read_text())
    typer.echo(f"report: {report}")


if __name__ == "__main__":
    sys.exit(app())
