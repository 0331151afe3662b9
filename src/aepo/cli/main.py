"""`aepo` demo, train, sft, eval, rollout, audit, compare and data to-verl; the sub-apps model, tools, world."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

import aepo
from aepo.cli.common import BAD_INPUT, check_min, fail, flag, flag_overrides, warn
from aepo.cli.model import app as model_app
from aepo.cli.tools import app as tools_app
from aepo.cli.world import app as world_app

app = typer.Typer(
    name="aepo",
    help="Train tool-using LLM agents with AEPO and the methods it is compared with.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(model_app, name="model", help="Create or import models.")
app.add_typer(tools_app, name="tools", help="Run the agent's tools by hand.")
app.add_typer(world_app, name="world", help="Build the synthetic demo world.")
data_app = typer.Typer(no_args_is_help=True)
app.add_typer(data_app, name="data", help="Convert datasets for other trainers.")
analyze_app = typer.Typer(no_args_is_help=True)
app.add_typer(analyze_app, name="analyze", help="Measure the algorithms' mechanisms on a fixed policy.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aepo {aepo.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool | None = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """aepo: Agentic Entropy-Balanced Policy Optimization."""
    # transformers' own "Loading weights" / "Writing model shards" bars: off in every command
    # (read when transformers is imported; `load_model` also turns them off)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory (cached stages are reused)."),
    quick: bool = typer.Option(False, "--quick", help="About a minute: tiny sizes, for smoke tests."),
    algo: str = typer.Option("aepo", "--algo", help="Algorithm preset for the RL stage."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Redo the stages in --out that were made with other "
                               "settings (without it they are refused, never reported as this run's)."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted config overrides, e.g. trainer.lr=1e-4"),
) -> None:
    """Build the demo world, train a tiny agent (SFT, then RL), evaluate both and write a report."""
    from aepo.config import ConfigError
    from aepo.demo.stages import run_demo

    try:
        summary = run_demo(out, quick=quick, algo=algo, seed=seed, overrides=overrides, force=force)
    except (ConfigError, *BAD_INPUT) as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.secho(f"interrupted: finished stages are kept in {out} and RL resumes from its newest checkpoint; "
                    f"continue with: aepo {' '.join(sys.argv[1:])}", fg="yellow", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"SFT accuracy {100 * summary['sft_accuracy']:.1f}%  ->  RL accuracy "
               f"{100 * summary['rl_accuracy']:.1f}%   report: {Path(out) / 'summary.md'}")


def _interrupted(checkpoints: Path, argv: list[str]) -> None:
    """Ctrl-C: one line saying where the run stands and the command that continues it; exit 130."""
    from aepo.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(checkpoints)
    again = " ".join(argv) + ("" if "--resume" in argv else " --resume")
    where = (f"the newest checkpoint is {last}" if last is not None
             else "no checkpoint was written yet (trainer.save_every), so it starts over")
    typer.secho(f"interrupted: {where}; continue with: {again}", fg="yellow", err=True)
    raise typer.Exit(130)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config (see src/aepo/configs/)."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides: algo=grpo rollout.n=8 ..."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in out_dir "
                                "(with none there, say so and start at step 0)."),
    force: bool = typer.Option(False, "--force", help="With --resume: resume even though the config differs "
                               "from the run's config.yaml. Without: start over in an out_dir that holds "
                               "checkpoints (they are deleted)."),
    tool_format: str | None = flag("tool_format", "--tool-format"),
) -> None:
    """RL-train a model (model.path) on a dataset (data.train) or the demo world."""
    from aepo.config import ConfigError, load_config
    from aepo.data.datasets import load_dataset
    from aepo.demo.stages import world_tasks
    from aepo.io import check_output_dir
    from aepo.models.loading import check_model_dir, load_model, resolve_device, save_model_dir
    from aepo.tools import build_tool_runner
    from aepo.train.checkpoint import check_run_dir
    from aepo.train.rl import RLTrainer
    from aepo.train.threads import set_threads

    try:
        cfg = load_config(config, [*(overrides or []), *flag_overrides({"tool_format": tool_format})])
        if not cfg.model.path:
            raise ConfigError("model.path is empty; give a local HF model directory, e.g. model.path=runs/demo/sft")
        check_model_dir(cfg.model.path)
        _check_lora(cfg, cfg.model.path, "model.path")
        resolve_device(cfg.model.device)
        out_dir = Path(cfg.out_dir)
        check_output_dir(out_dir, "out_dir")
        check_output_dir(out_dir / "final", "out_dir")
        corpus, world = None, None
        if cfg.data.train:
            tasks = load_dataset(cfg.data.train, prompt_key=cfg.data.prompt_key or None,
                                 answer_key=cfg.data.answer_key or None)
            if not tasks:
                raise ValueError(f"data.train {cfg.data.train} holds no rows; give a file with at least one question")
        else:
            from aepo.demo.world import demo_world

            world = demo_world(cfg.data.world_seed, level=cfg.data.world_level)
            tasks, corpus = world_tasks(world.train), world.corpus
            t = cfg.tools
            if "search" in t.enabled and not (t.search_corpus or t.search_cache or t.search_url):
                # the run searches the world's corpus: written beside the run (out_dir/world/), and
                # named in the run config, so the trained model is evaluated with the same search
                t.search_corpus = str((out_dir / "world" / "corpus.jsonl").resolve())
        check_run_dir(out_dir, cfg, resume=resume, force=force)
        if world is not None:
            world.save(out_dir / "world")  # corpus, train and test splits (the held-out questions)
        runner = build_tool_runner(cfg.tools, corpus_docs=corpus)
        set_threads(cfg.trainer.threads)
        model, tok = load_model(cfg.model.path, device=cfg.model.device, dtype=cfg.model.dtype)
    except (ConfigError, *BAD_INPUT) as e:
        fail(str(e))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.actor.lora.rank > 0:  # frozen embeddings: checkpointed layers still need a grad path
            model.enable_input_require_grads()
    from aepo.rollout.sampler.sync_check import SyncError
    from aepo.train.checkpoint import CheckpointError, RunDirError

    try:
        trainer = RLTrainer(cfg, model, tok, tasks, runner.run, cfg.out_dir)
        model = trainer.model  # with actor.lora: the adapter-wrapped model, saved as an adapter directory
        trainer.fit(resume=resume, force=force)
    except (CheckpointError, RunDirError) as e:
        fail(str(e))
    except SyncError as e:  # the engine serves another policy than the one trained: stop, loudly
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _interrupted(Path(cfg.out_dir) / "checkpoints", ["aepo", *sys.argv[1:]])
    finally:
        runner.close()
    from aepo.config import run_config_files

    save_model_dir(Path(cfg.out_dir) / "final", model, tok, text_files=run_config_files(cfg))
    kind = "LoRA adapter" if cfg.actor.lora.rank > 0 else "model"
    typer.echo(f"done: {kind} in {Path(cfg.out_dir) / 'final'}, metrics in {Path(cfg.out_dir) / 'metrics.jsonl'}")


@app.command()
def sft(
    model: Path = typer.Option(..., "--model", help="Local HF model directory to start from."),
    data: Path = typer.Option(..., "--data", help="JSONL demonstrations: {prompt, segments}, {messages}, or token "
                              "rows {input_ids, loss_mask} (the demo's sft_examples.jsonl)."),
    out: Path = typer.Option(..., "--out", help="Where to save the trained model."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. sft.warmup_steps=50 "
                                                 "sft.max_len=1024 (the sft section of the config)."),
    epochs: int | None = flag("epochs", "--epochs"),
    lr: float | None = flag("lr", "--lr"),
    batch_size: int | None = flag("batch_size", "--batch-size"),
    chat_template: bool | None = flag("chat_template", "--chat-template/--no-chat-template"),
    tool_format: str | None = flag("tool_format", "--tool-format"),
    device: str = typer.Option("auto", "--device"),
    sft_seed: int | None = flag("sft_seed", "--seed"),
) -> None:
    """Supervised cold start on tool-use demonstrations (tool results masked out of the loss),
    with the `sft` section of the config (its defaults are the demo's recipe). The model it
    starts from passes its own settings on (its aepo_run.yaml, or the defaults)."""
    from aepo.config import ConfigError, model_config, run_config_files
    from aepo.io import check_output_dir
    from aepo.models.loading import check_model_dir, load_model, resolve_device, save_model_dir
    from aepo.train.sft import check_sft_rows, load_sft_jsonl, sft_train
    from aepo.train.threads import set_threads

    try:
        check_sft_rows(data)
        check_model_dir(model)
        flags = flag_overrides({"epochs": epochs, "lr": lr, "batch_size": batch_size, "chat_template": chat_template,
                                "tool_format": tool_format,
                                "sft_seed": sft_seed})
        # the demonstrations' prompts are built with these settings, as RL and evaluation will build them
        run_cfg, settings_line = model_config(model, [*flags, *(overrides or [])])
        resolve_device(device)
        check_output_dir(out, "--out")
        if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
            raise ValueError(f"--out {out} is a directory that holds files but no model, and saving replaces the "
                             f"whole directory; give a new or empty directory (or a model directory to overwrite)")
        _check_lora(run_cfg, model, "--model")
        set_threads(0, cap=4)  # as the demo's SFT stage: the same model from the same data
        m, tok = load_model(model, device=device, dtype=run_cfg.model.dtype)
        if run_cfg.actor.lora.rank > 0:  # only the adapters are trained; --out becomes an adapter directory
            from aepo.models.lora import apply_lora

            m = apply_lora(m, run_cfg.actor.lora, model)
            run_cfg.model.path = str(model.resolve())
        examples = load_sft_jsonl(data, tok, chat_template=run_cfg.model.chat_template, tools=run_cfg.tools.enabled,
                                  max_tool_calls=run_cfg.rollout.max_tool_calls,
                                  tool_format=run_cfg.rollout.tool_format)
    except (ConfigError, *BAD_INPUT) as e:
        fail(str(e))
    s = run_cfg.sft
    typer.echo(f"sft: epochs={s.epochs} lr={s.lr:g} batch_size={s.batch_size} seed={s.seed}; {settings_line}", err=True)
    hist = sft_train(m, tok, examples, run_cfg.sft)
    save_model_dir(out, m, tok, jsonl_files={"sft_history.jsonl": hist}, text_files=run_config_files(run_cfg))
    typer.echo(f"saved {out} (final loss {hist[-1]['loss']:.4f})")


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


@app.command("eval")
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


@app.command("rollout")
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


@app.command()
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


@app.command()
def compare(
    algos: str = typer.Option("grpo,dapo,gppo,cispo,arpo,aepo", "--algos", help="Comma-separated presets."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds per algorithm (0..N-1)."),
    out: Path = typer.Option(Path("runs/compare"), "--out"),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes, for smoke tests."),
    base: Path | None = typer.Option(None, "--from", help="Reuse the world and SFT model of this run "
                                        "directory (e.g. runs/demo) instead of building them in OUT/base."),
    jobs: int = typer.Option(1, "--jobs", help="Runs at once, each in its own process with cores/jobs threads."),
    force: bool = typer.Option(False, "--force", help="Redo runs in --out that were made with other settings "
                               "(without it they are refused, never reported as this command's)."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides applied to every run."),
) -> None:
    """Train each algorithm on the demo world from one SFT model, evaluate, and write compare.md."""
    from aepo.demo.compare import run_compare

    names = [a.strip() for a in algos.split(",") if a.strip()]
    cmd = "aepo compare " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "aepo compare"
    try:
        check_min("--seeds", seeds, 1, "seeds per algorithm")
        check_min("--jobs", jobs, 1, "runs at once")
        report = run_compare(names, seeds, out, quick=quick, overrides=overrides, command=cmd, base=base, jobs=jobs,
                             force=force)
    except BAD_INPUT as e:
        fail(str(e))
    except RuntimeError as e:  # a run failed (its log is named); the others' results are kept
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(report.read_text())
    typer.echo(f"report: {report}")


@data_app.command("to-verl")
def data_to_verl(
    data: Path = typer.Argument(..., help="Questions: JSONL, JSON or parquet (any format `aepo eval` reads)."),
    out: Path = typer.Argument(..., help="verl RL parquet to write."),
    tools: str = typer.Option("search,calc,python", "--tools", help="Tools the system prompt describes."),
    max_tool_calls: int = typer.Option(6, "--max-tool-calls"),
    split: str = typer.Option("train", "--split", help="Stored in extra_info.split."),
    limit: int | None = typer.Option(None, "--limit", help="First N questions."),
) -> None:
    """Benchmark rows as verl's RL parquet (data_source, prompt, ability, reward_model,
    extra_info), with the system prompt the local trainer uses; reward them in verl with
    aepo.integrations.verl.task.compute_score."""
    from aepo.data.datasets import load_dataset
    from aepo.integrations.verl.task import write_verl_parquet
    from aepo.io import check_output_file
    from aepo.tools import tool_names

    try:
        names = [t.strip() for t in tools.split(",") if t.strip()]
        unknown = [t for t in names if t not in tool_names()]
        if unknown:
            raise ValueError(f"--tools: {', '.join(unknown)} not among the registered tools "
                             f"({', '.join(tool_names())})")
        check_min("--max-tool-calls", max_tool_calls, 0, "tool calls per answer")
        check_min("--limit", limit, 1, "questions")
        _check_data_file(data)
        if out.suffix != ".parquet":
            raise ValueError(f"OUT {out} must end in .parquet (verl reads parquet)")
        check_output_file(out, "OUT")
        tasks = load_dataset(data, limit=limit)
        if not tasks:
            raise ValueError(f"{data} holds no questions; give a file with at least one row")
    except BAD_INPUT as e:
        fail(str(e))
    write_verl_parquet(tasks, out, tools=names, max_tool_calls=max_tool_calls, split=split)
    typer.echo(f"wrote {out}: {len(tasks)} rows ({', '.join(sorted({t.data_source for t in tasks}))})")




@analyze_app.command("branching")
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
