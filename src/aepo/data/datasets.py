"""Loading question/answer rows from benchmark and training files (JSONL, JSON, parquet).

One loader for every format the project meets: the bundled benchmark files
(`{"question", "answer": [...]}`, GSM8K's worked solutions ending in `#### 18`, MATH/AIME
`{"problem", "answer"}`) and verl-style parquet rows (`prompt` as chat messages,
`reward_model.ground_truth`, `data_source`). Field names are detected unless given; a row
the loader cannot read raises ValueError naming the file, the line (or row) and the field.

    rows = load_dataset("shared/data/benchmarks/gsm8k.jsonl", limit=100)
    rows[0].question, rows[0].answers, rows[0].data_source  # ..., ["18"], "gsm8k"
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ANSWER_KEYS", "ID_KEYS", "PROMPT_KEYS", "SUFFIXES", "TaskRow", "gold_answers", "load_dataset"]

PROMPT_KEYS: tuple[str, ...] = ("question", "problem", "prompt", "query")
# "reward_model": verl's RL parquet ({"ground_truth": ...}, `aepo data to-verl`)
ANSWER_KEYS: tuple[str, ...] = ("answer", "answers", "golden_answers", "target", "reward_model")
ID_KEYS: tuple[str, ...] = ("id", "idx", "qid", "_id", "uid")
SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")

_GSM8K_FINAL = "####"
_DIGITS_RE = re.compile(r"\d+$")  # the line or row number at the end of a row's place
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


@dataclass
class TaskRow:
    """One task: the question text, every accepted gold answer, and where it came from."""

    id: str
    question: str
    answers: list[str]
    data_source: str
    extra: dict[str, Any] = field(default_factory=dict)  # the row's other fields


class _RowError(ValueError):
    """A problem with one row; the loader adds the file and line."""


def _get(row: dict[str, Any], key: str) -> Any:
    """`row[key]`, following dots into nested mappings ("extra_info.question")."""
    if key in row:
        return row[key]
    cur: Any = row
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(key)
        cur = cur[part]
    return cur


def _question_text(value: Any, key: str) -> str:
    """A question from a string or a chat message list (the last user message's content)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)):
        messages = [m for m in value if isinstance(m, dict)]
        users = [m for m in messages if m.get("role") == "user"] or messages
        if not users:
            raise _RowError(f"field {key!r} is a list without chat messages")
        text = _content_text(users[-1].get("content"), key)
    else:
        raise _RowError(
            f"field {key!r} must be a string or a list of chat messages, got {type(value).__name__}"
        )
    text = text.strip()
    if not text:
        raise _RowError(f"field {key!r} is empty")
    return text


def _content_text(content: Any, key: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # OpenAI content parts
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    raise _RowError(f"field {key!r}: message content must be a string or a list of parts")


def _answer_strings(value: Any, key: str) -> list[str]:
    """Gold answers from a string, number, list, or a mapping with "target"."""
    if isinstance(value, dict):
        for k in ("target", "ground_truth", "answer"):
            if k in value:
                return _answer_strings(value[k], f"{key}.{k}")
        raise _RowError(f"field {key!r} is a mapping without 'target'")
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    if isinstance(value, int):
        return [str(value)]
    if isinstance(value, float):
        return [str(int(value)) if value.is_integer() else repr(value)]
    if isinstance(value, str):
        text = value.strip()
        if _GSM8K_FINAL in text:  # GSM8K: worked solution, final answer after "####"
            text = text.rsplit(_GSM8K_FINAL, 1)[1].strip()
            if _THOUSANDS_RE.fullmatch(text):
                text = text.replace(",", "")
        return [text] if text else []
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for i, v in enumerate(value):
            if v is not None:
                out.extend(_answer_strings(v, f"{key}[{i}]"))
        return out
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        return _answer_strings(value.tolist(), key)
    raise _RowError(f"field {key!r} must be a string, number or list, got {type(value).__name__}")


def gold_answers(value: Any) -> list[str]:
    """Gold answer strings from a string, number, list (or numpy array), or a mapping with
    "target" / "ground_truth" / "answer", as the loader reads an answer field."""
    return _answer_strings(value, "ground_truth")


def _pick(
    row: dict[str, Any], explicit: str | None, candidates: tuple[str, ...], what: str
) -> tuple[str, Any]:
    if explicit is not None:
        try:
            return explicit, _get(row, explicit)
        except KeyError:
            raise _RowError(f"no {what} field {explicit!r}") from None
    for k in candidates:
        if k in row and row[k] is not None:
            return k, row[k]
    raise _RowError(f"no {what} field (looked for {', '.join(candidates)})")


def _parse_row(
    row: Any,
    index: int,
    *,
    prompt_key: str | None,
    answer_key: str | None,
    data_source: str | None,
    stem: str,
) -> TaskRow:
    if not isinstance(row, dict):
        raise _RowError(f"expected an object, got {type(row).__name__}")
    qkey, qval = _pick(row, prompt_key, PROMPT_KEYS, "question")
    question = _question_text(qval, qkey)

    reward_model = row.get("reward_model")
    if answer_key is None and isinstance(reward_model, dict) and "ground_truth" in reward_model:
        akey, aval = "reward_model.ground_truth", reward_model["ground_truth"]
    else:
        akey, aval = _pick(row, answer_key, ANSWER_KEYS, "answer")
    answers = [a for a in (s.strip() for s in _answer_strings(aval, akey)) if a]
    if not answers:
        raise _RowError(f"field {akey!r} holds no answer")

    used = {qkey.split(".")[0], akey.split(".")[0], "data_source"}
    extra = {k: v for k, v in row.items() if k not in used}
    raw_answer = row.get(akey) if akey in row else None
    if isinstance(raw_answer, str) and _GSM8K_FINAL in raw_answer:
        extra.setdefault("solution", raw_answer)

    source = data_source or (str(row["data_source"]) if row.get("data_source") else stem)
    return TaskRow(
        id=_row_id(row, index, stem), question=question, answers=answers, data_source=source, extra=extra
    )


def _row_id(row: dict[str, Any], index: int, stem: str) -> str:
    for k in ID_KEYS:
        if row.get(k) is not None:
            return str(row[k])
    info = row.get("extra_info")
    if isinstance(info, dict) and info.get("index") is not None:
        return str(info["index"])
    return f"{stem}-{index}"


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path.name}:{lineno}: not valid JSON ({e.msg})") from None


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path.name}: a .json dataset must hold a list of rows, got {type(data).__name__}")
    for i, row in enumerate(data, 1):
        yield f"{path.name}: row {i}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise ImportError("reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"{path.name}: not a readable parquet file ({e})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield f"{path.name}: row {n}", row


_READERS = {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet}


def load_dataset(
    path: str | Path,
    *,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    data_source: str | None = None,
    limit: int | None = None,
) -> list[TaskRow]:
    """Read task rows from a .jsonl, .json (list of rows) or .parquet file.

    Question field: `prompt_key` when given (dots reach nested fields), else the first of
    question/problem/prompt/query. Gold answers: `answer_key` when given, else verl's
    `reward_model.ground_truth`, else the first of answer/answers/golden_answers/target; a
    string containing "####" (GSM8K) keeps only the final answer after it. `data_source`
    overrides the row's own `data_source`, which overrides the file stem. `limit` keeps the
    first rows only. Raises ValueError naming the file, line/row and field on a bad row.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in _READERS:
        raise ValueError(
            f"{p.name}: unsupported dataset format {suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}"
        )
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {str(p)!r} does not exist")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    rows: list[TaskRow] = []
    if limit == 0:
        return rows
    seen: dict[str, list[str]] = {}  # id -> where each row with it is
    for index, (where, raw) in enumerate(_READERS[suffix](p)):
        try:
            rows.append(
                _parse_row(
                    raw,
                    index,
                    prompt_key=prompt_key,
                    answer_key=answer_key,
                    data_source=data_source,
                    stem=p.stem,
                )
            )
        except _RowError as e:
            raise ValueError(f"{where}: {e}") from None
        seen.setdefault(rows[-1].id, []).append(where)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{p.name}: no rows")
    _check_unique_ids(p, seen)
    return rows


def _check_unique_ids(path: Path, seen: dict[str, list[str]]) -> None:
    """ValueError naming the ids that several rows share (results are kept per id, so their
    samples would mix), with where each of those rows is."""
    dups = {k: v for k, v in seen.items() if len(v) > 1}
    if not dups:
        return
    unit = "lines" if path.suffix.lower() == ".jsonl" else "rows"
    shown = "; ".join(f"{k!r} on {unit} {', '.join(_DIGITS_RE.search(w).group() for w in v)}"
                      for k, v in list(dups.items())[:5])
    more = f" (and {len(dups) - 5} more ids)" if len(dups) > 5 else ""
    raise ValueError(f"dataset file {str(path)!r}: rows share an id, so their results would mix: {shown}{more}; "
                     f"give every row its own id (field {' / '.join(ID_KEYS)}), or remove the repeated rows")
