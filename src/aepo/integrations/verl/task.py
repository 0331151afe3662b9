"""A task in verl's terms: its row of verl's RL parquet, and its reward function.

`aepo data to-verl IN OUT.parquet` writes benchmark rows in the schema verl's `RLHFDataset`
and reward managers read:

    data_source   the row's source (selects the scorer: QA F1 or math equivalence)
    prompt        chat messages: aepo's system prompt (the tag protocol and the tools, exactly
                  as the local trainer builds it with model.chat_template=true) and the question
    ability       "math" or "fact-reasoning"
    reward_model  {"style": "rule", "ground_truth": [gold answers]}
    extra_info    {"index", "id", "split", "question"}

`compute_score(data_source, solution_str, ground_truth, extra_info)` is aepo's reward (the
format gate, then F1 / exact match / math equivalence; docs/algorithms.md section 7) in the
signature of verl's `custom_reward_function`; tool output inside `<result>` blocks never
counts as the model's answer. Point verl at it with
`reward.custom_reward_function.path=<this file> reward.custom_reward_function.name=compute_score`
(examples/verl/run.sh); aepo's `reward.*` settings go in `reward.custom_reward_function.reward_kwargs`,
which verl passes to it as keywords: `+reward.custom_reward_function.reward_kwargs.qa_metric=em`
(exact match instead of token F1 as the QA reward), `...reward_kwargs.multi_tool_bonus=0.1`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aepo.data.datasets import TaskRow, gold_answers
from aepo.data.prompting import chat_messages
from aepo.io import atomic_write_bytes
from aepo.rewards.scoring import get_scorer, math_scorer, score

__all__ = ["compute_score", "verl_rows", "write_verl_parquet"]


def verl_rows(tasks: Sequence[TaskRow], *, tools: Sequence[str], max_tool_calls: int = 6,
              split: str = "train") -> list[dict[str, Any]]:
    """One verl RL row per task (see the module docstring)."""
    rows = []
    for i, t in enumerate(tasks):
        math = get_scorer(t.data_source, t.answers) is math_scorer
        rows.append({
            "data_source": t.data_source,
            "prompt": chat_messages(t.question, tools=list(tools), max_tool_calls=max_tool_calls),
            "ability": "math" if math else "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": list(t.answers)},
            "extra_info": {"index": i, "id": t.id, "split": split, "question": t.question},
        })
    return rows


def write_verl_parquet(tasks: Sequence[TaskRow], out: str | Path, *, tools: Sequence[str],
                       max_tool_calls: int = 6, split: str = "train") -> Path:
    """Write `verl_rows(tasks)` as a parquet file, atomically; returns its path."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(verl_rows(tasks, tools=tools, max_tool_calls=max_tool_calls, split=split))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


def compute_score(data_source: str, solution_str: str, ground_truth: Any,
                  extra_info: dict[str, Any] | None = None, *, qa_metric: str = "f1",
                  multi_tool_bonus: float = 0.0, format_penalty: float = -1.0, **_: Any) -> dict[str, float]:
    """aepo's reward for one verl response: `score` is the format-gated reward, and acc / f1 /
    em / format_ok go to verl's reward metrics. `ground_truth` may be a string, a list or
    numpy array of answers (from parquet), or a Search-R1 style {"target": [...]}; empty
    answers are dropped, and a row with none left is a ValueError. `qa_metric`,
    `multi_tool_bonus` and `format_penalty` are aepo's `reward.*` settings (verl passes them
    from `reward.custom_reward_function.reward_kwargs`)."""
    golds = [g for g in gold_answers(ground_truth) if g.strip()]
    if not golds:
        raise ValueError(f"compute_score: no gold answer in ground_truth {ground_truth!r} ({data_source}); "
                         "empty answers do not count")
    s = score(solution_str if isinstance(solution_str, str) else str(solution_str), golds, data_source,
              qa_metric=qa_metric, multi_tool_bonus=float(multi_tool_bonus), format_penalty=float(format_penalty))
    return {"score": float(s["reward"]), "acc": float(s["acc"]), "f1": float(s["f1"]), "em": float(s["em"]),
            "format_ok": float(bool(s["format_ok"]))}
