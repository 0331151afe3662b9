"""`aepo train` (RL) and `aepo sft`."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from aepo.cli.common import BAD_INPUT, fail, flag, flag_overrides
from aepo.cli.settings import _check_lora


def _interrupted(checkpoints: Path, argv: list[str]) -> None:
    """Ctrl-C: one line saying where the run stands and the command that continues it; exit 130."""
    from aepo.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(checkpoints)
    again = " ".join(argv) + ("" if "--resume" in argv else " --resume")
    where = (f"the newest checkpoint is {last}" if last is not None
             else "no checkpoint was written yet (trainer.save_every), so it starts over")
    typer.secho(f"interrupted: {where}; continue with: {again}", fg="yellow", err=True)
    raise typer.Exit(130)


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
