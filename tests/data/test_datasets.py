"""Dataset loading: bundled benchmarks, field detection, verl-style parquet, named errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from repo_paths import SHARED

from aepo.data.datasets import TaskRow, load_dataset

BENCH = SHARED / "data" / "benchmarks"
BUNDLED = ["2wiki", "hotpotqa", "musique", "bamboogle", "gsm8k", "math500", "aime24", "aime25"]


def _bench(name: str) -> Path:
    path = BENCH / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"bundled benchmark {path} not found")
    return path


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- bundled files


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_benchmark_loads(name: str) -> None:
    path = _bench(name)
    rows = load_dataset(path)
    n_lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    assert len(rows) == n_lines
    assert len({r.id for r in rows}) == len(rows)
    for r in rows:
        assert isinstance(r, TaskRow)
        assert r.question.strip() and r.data_source == name
        assert r.answers and all(isinstance(a, str) and a.strip() for a in r.answers)


def test_gsm8k_gold_is_the_final_answer() -> None:
    rows = load_dataset(_bench("gsm8k"))
    assert rows[0].answers == ["18"]
    assert rows[0].extra["solution"].endswith("#### 18")
    assert rows[0].id == "0"  # from the "idx" field
    for r in rows:
        assert len(r.answers) == 1 and "####" not in r.answers[0] and "," not in r.answers[0]
        float(r.answers[0])  # every GSM8K gold is a number once thousands separators are gone


def test_qa_and_math_field_shapes() -> None:
    wiki = load_dataset(_bench("2wiki"), limit=1)[0]
    assert wiki.answers[:3] == ["the five boroughs", "City of New York", "New York"]
    aime25 = load_dataset(_bench("aime25"), limit=2)
    assert [r.answers for r in aime25] == [["70"], ["588"]]  # integer answers become strings
    aime24 = load_dataset(_bench("aime24"), limit=1)[0]
    assert aime24.answers == ["204"] and aime24.id == "60" and "solution" in aime24.extra
    math500 = load_dataset(_bench("math500"), limit=1)[0]
    assert math500.answers == ["\\left( 3, \\frac{\\pi}{2} \\right)"]


def test_limit_and_data_source_override() -> None:
    rows = load_dataset(_bench("hotpotqa"), limit=3, data_source="my_qa")
    assert len(rows) == 3 and {r.data_source for r in rows} == {"my_qa"}
    assert rows[1].answers == ["1.95 m"]


# ----------------------------------------------------------------------------- detection


def test_field_detection_and_answer_types(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"problem": "p1", "answer": 7},
            {"prompt": "p2", "answers": ["a", "b", None]},
            {"query": "p3", "golden_answers": "g"},
            {"question": "p4", "target": 2.5},
            {"question": "p5", "answer": 3.0, "id": 99, "source": "x"},
            {"question": "p6", "answer": {"target": ["t1", "t2"]}},
            {"question": "p7", "answer": "Solution...\n#### 1,234"},
        ],
    )
    rows = load_dataset(path)
    assert [r.question for r in rows] == ["p1", "p2", "p3", "p4", "p5", "p6", "p7"]
    assert [r.answers for r in rows] == [["7"], ["a", "b"], ["g"], ["2.5"], ["3"], ["t1", "t2"], ["1234"]]
    assert [r.id for r in rows] == ["mixed-0", "mixed-1", "mixed-2", "mixed-3", "99", "mixed-5", "mixed-6"]
    assert rows[4].extra == {"id": 99, "source": "x"}
    assert {r.data_source for r in rows} == {"mixed"}


def test_explicit_and_dotted_keys(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "nested.jsonl",
        [{"question": "ignored", "meta": {"q": "real question"}, "label": ["x"], "answer": "not this"}],
    )
    row = load_dataset(path, prompt_key="meta.q", answer_key="label")[0]
    assert (row.question, row.answers) == ("real question", ["x"])
    with pytest.raises(ValueError, match=r"nested\.jsonl:1: no question field 'meta\.nope'"):
        load_dataset(path, prompt_key="meta.nope")


def test_json_list_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"question": "a?", "answer": "b"}, {"question": "c?", "answer": ["d"]}]))
    rows = load_dataset(path)
    assert [(r.question, r.answers, r.data_source) for r in rows] == [
        ("a?", ["b"], "rows"),
        ("c?", ["d"], "rows"),
    ]


# ----------------------------------------------------------------------------- errors


def test_missing_question_names_file_line_and_field(tmp_path: Path) -> None:
    rows: list[object] = [{"question": f"q{i}", "answer": ["a"]} for i in range(16)]
    rows.append({"text": "no question here", "answer": ["a"]})
    path = _write_jsonl(tmp_path / "hotpotqa.jsonl", rows)
    with pytest.raises(ValueError) as err:
        load_dataset(path)
    assert (
        str(err.value) == "hotpotqa.jsonl:17: no question field (looked for question, problem, prompt, query)"
    )


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"question": "q"}',
            r"bad\.jsonl:2: no answer field \(looked for answer, answers, golden_answers, target, reward_model\)",
        ),
        ('{"question": "q", "answer": []}', r"bad\.jsonl:2: field 'answer' holds no answer"),
        ('{"question": "q", "answer": [" "]}', r"bad\.jsonl:2: field 'answer' holds no answer"),
        ('{"question": "  ", "answer": "a"}', r"bad\.jsonl:2: field 'question' is empty"),
        ('{"question": 5, "answer": "a"}', r"bad\.jsonl:2: field 'question' must be a string or a list"),
        (
            '{"question": "q", "answer": {"x": 1}}',
            r"bad\.jsonl:2: field 'answer' is a mapping without 'target'",
        ),
        ('{"question": "q", "answer": ', r"bad\.jsonl:2: not valid JSON"),
        ('["q", "a"]', r"bad\.jsonl:2: expected an object, got list"),
    ],
)
def test_malformed_rows(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "fine", "answer": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_dataset(path)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"unsupported dataset format '\.csv'; use one of \.jsonl, \.json, \.parquet"
    ):
        load_dataset(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_dataset(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no rows"):
        load_dataset(empty)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable parquet file"):
        load_dataset(broken)
    with pytest.raises(ValueError, match="limit"):
        load_dataset(_write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "answer": "a"}]), limit=-1)


# ----------------------------------------------------------------------------- parquet


def test_parquet_round_trip_plain_and_verl_rows(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    plain = [
        {"question": "What is 2+2?", "answer": ["4", "four"]},
        {"question": "Capital of France?", "answer": ["Paris"]},
    ]
    pq.write_table(pa.Table.from_pylist(plain), tmp_path / "plain.parquet")
    rows = load_dataset(tmp_path / "plain.parquet")
    assert [(r.question, r.answers, r.data_source) for r in rows] == [
        ("What is 2+2?", ["4", "four"], "plain"),
        ("Capital of France?", ["Paris"], "plain"),
    ]

    def verl_row(i: int, ground_truth: dict, source: str) -> dict:
        return {
            "data_source": source,
            "prompt": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": f"Question {i}?"},
            ],
            "ability": "qa",
            "reward_model": {"style": "rule", "ground_truth": ground_truth},
            "extra_info": {"index": 100 + i, "split": "train"},
        }

    # ground_truth as a string, a list, and a {"target": [...]} mapping (parquet needs one schema
    # per column, so each shape goes in its own file)
    shapes = {
        "gt_str": "42",
        "gt_list": ["Paris", "City of Paris"],
        "gt_target": {"target": ["Ada Lovelace"]},
    }
    expected = {"gt_str": ["42"], "gt_list": ["Paris", "City of Paris"], "gt_target": ["Ada Lovelace"]}
    for stem, gt in shapes.items():
        table = pa.Table.from_pylist([verl_row(0, gt, "nq"), verl_row(1, gt, "hotpotqa")])
        pq.write_table(table, tmp_path / f"{stem}.parquet")
        rows = load_dataset(tmp_path / f"{stem}.parquet")
        assert [r.question for r in rows] == ["Question 0?", "Question 1?"]
        assert [r.answers for r in rows] == [expected[stem], expected[stem]]
        assert [r.data_source for r in rows] == ["nq", "hotpotqa"]  # the row's own data_source wins
        assert [r.id for r in rows] == ["100", "101"]
        assert rows[0].extra["ability"] == "qa" and rows[0].extra["extra_info"]["split"] == "train"
        assert load_dataset(tmp_path / f"{stem}.parquet", data_source="forced")[0].data_source == "forced"
        assert len(load_dataset(tmp_path / f"{stem}.parquet", limit=1)) == 1


def test_parquet_bad_row_names_row_and_field(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_pylist(
        [{"question": "ok?", "answer": "a"}, {"question": "no answer?", "answer": None}]
    )
    pq.write_table(table, tmp_path / "holes.parquet")
    with pytest.raises(ValueError, match=r"holes\.parquet: row 2: no answer field"):
        load_dataset(tmp_path / "holes.parquet")


def test_chat_content_parts(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "parts.jsonl",
        [{"prompt": [{"role": "user", "content": [{"type": "text", "text": "Who?"}]}], "answer": "me"}],
    )
    assert load_dataset(path)[0].question == "Who?"
