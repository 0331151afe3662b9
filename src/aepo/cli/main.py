"""The `aepo` app: demo and compare here, the other commands from train.py and evaluate.py, and the
sub-apps model, tools, world, data, analyze."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

import aepo
from aepo.cli.analyze import app as analyze_app
from aepo.cli.common import BAD_INPUT, check_min, fail
from aepo.cli.data import app as data_app
from aepo.cli.evaluate import audit, eval_cmd, rollout_cmd
from aepo.cli.model import app as model_app
from aepo.cli.settings import _run_settings  # noqa: F401 - tests read it here
from aepo.cli.tools import app as tools_app
from aepo.cli.train import sft, train
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
app.add_typer(data_app, name="data", help="Convert datasets for other trainers.")
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


# the commands, in the order `aepo --help` lists them (train.py, evaluate.py hold most of them)
app.command()(demo)
app.command()(train)
app.command()(sft)
app.command("eval")(eval_cmd)
app.command("rollout")(rollout_cmd)
app.command()(audit)
app.command()(compare)
