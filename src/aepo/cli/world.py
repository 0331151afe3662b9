"""`aepo world ...`: build the synthetic demo world and write it to a directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from aepo.cli.common import fail
from aepo.demo.world import ALL_KINDS, LEVELS, SIZES, World, demo_world, parse_kinds

app = typer.Typer(no_args_is_help=True, add_completion=False)


def world_table(world: World) -> Table:
    """Questions per split and kind, with the corpus and vocabulary sizes in the caption."""
    counts = world.counts()
    table = Table(title=f"demo world (seed {world.seed}, size {world.size}, level {world.level})")
    table.add_column("split")
    kinds = [k for k in ALL_KINDS if k in world.spec.train_mix or k in world.spec.test_mix]
    for kind in kinds:
        table.add_column(kind, justify="right")
    table.add_column("total", justify="right")
    for split in ("train", "test"):
        c = counts[split]
        table.add_row(split, *(str(c.get(k, 0)) for k in kinds), str(sum(c.values())))
    table.caption = (
        f"{len(world.corpus)} documents, {len(world.people)} people, {len(world.orgs)} organisations, "
        f"{len(world.cities)} cities, {len(world.vocabulary())} distinct words"
    )
    return table


def _check_size_level(size: str, level: int) -> None:
    """ValueError naming the option when --size or --level is not one the world generator has."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r} is not one of {', '.join(SIZES)}; pick one of those")
    if level not in LEVELS:
        raise ValueError(f"--level {level} is not one of {', '.join(map(str, LEVELS))}; pick one of those")


@app.command("build")
def build(
    out: Path = typer.Argument(
        ..., help="Directory to write corpus.jsonl, train.jsonl, test.jsonl, world.json."
    ),
    seed: int = typer.Option(0, "--seed", help="World seed; the same seed writes identical files."),
    size: str = typer.Option("small", "--size", help=f"One of: {', '.join(SIZES)}."),
    level: int = typer.Option(2, "--level", help=f"Difficulty, one of: {', '.join(map(str, LEVELS))}."),
    kinds: str = typer.Option(
        "",
        "--kinds",
        help=f"Only these question kinds, comma-separated, from: {', '.join(ALL_KINDS)} (default: the "
        "level's mix). With fork, fork_run or alias the rest of the world is quiet (docs/algorithms.md, 'Fork worlds').",
    ),
) -> None:
    """Generate the demo world and write it to OUT."""
    from aepo.io import check_output_dir

    try:
        _check_size_level(size, level)
        if kinds:
            try:
                parse_kinds(kinds)
            except ValueError as e:
                raise ValueError(f"--{e}") from None
        check_output_dir(out, "OUT")
        world = demo_world(seed, size=size, level=level, kinds=kinds)
    except ValueError as e:
        fail(str(e))
    world.save(out)
    console = Console()
    console.print(world_table(world))
    console.print(f"wrote {out}")


@app.command("demos")
def demos(
    out: Path = typer.Argument(..., help="JSONL file to write: one {prompt, segments, answer, ...} row per demonstration."),
    n: int = typer.Option(200, "--n", help="Demonstrations in all."),
    worlds: int = typer.Option(2, "--worlds", help="Sample worlds they come from (none is the demo world itself)."),
    seed: int = typer.Option(0, "--seed", help="Demo seed: the world the demonstrations prepare for (its name pool)."),
    size: str = typer.Option("small", "--size", help=f"One of: {', '.join(SIZES)}."),
    level: int = typer.Option(2, "--level", help=f"Difficulty, one of: {', '.join(map(str, LEVELS))}."),
) -> None:
    """Write expert tool-use demonstrations for `aepo sft` (the demo's SFT data): noisy expert
    episodes on sample worlds that share the demo world's names but none of its facts, written
    in the tags format; `aepo sft --tool-format hermes` rewrites them into the model's own format."""
    from aepo.demo.stages import demo_config, expert_demonstrations
    from aepo.io import write_jsonl

    try:
        if n < 1 or worlds < 1:
            raise ValueError(f"--n and --worlds must be at least 1, got --n {n} --worlds {worlds}")
        _check_size_level(size, level)
        if out.is_dir():
            raise ValueError(f"OUT {out} is a directory; give a .jsonl file name")
    except ValueError as e:
        fail(str(e))
    cfg = demo_config(seed=seed, overrides=[f"demo.n_demos={n}", f"demo.demo_worlds={worlds}",
                                            f"demo.world_size={size}", f"demo.world_level={level}"])
    rows = expert_demonstrations(cfg.demo, seed, cfg.tools)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, rows)
    right = sum(r["correct"] for r in rows)
    Console().print(f"wrote {out}: {len(rows)} demonstrations from {worlds} sample worlds, "
                    f"{right} ({right / len(rows):.0%}) end with the right answer")
