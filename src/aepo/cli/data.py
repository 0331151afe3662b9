"""`aepo data to-verl`: datasets converted for other trainers."""
from __future__ import annotations

from pathlib import Path

import typer

from aepo.cli.common import BAD_INPUT, check_min, fail
from aepo.cli.settings import _check_data_file

app = typer.Typer(no_args_is_help=True)


@app.command("to-verl")
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
