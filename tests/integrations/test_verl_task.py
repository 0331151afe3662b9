"""`aepo data to-verl` (verl's RL parquet) and `compute_score` (aepo's reward in verl's signature).

Neither needs verl installed: the parquet schema and the reward signature are checked here,
and the parquet is read back by aepo's own loader.
"""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import repo_paths
from typer.testing import CliRunner

from aepo.cli import app
from aepo.data.datasets import load_dataset
from aepo.data.prompting import system_prompt
from aepo.integrations.verl_task import compute_score, verl_rows
from aepo.protocol import format_result

runner = CliRunner()
SHARED = repo_paths.SHARED / "data"
ROWS = [
    {"id": "q1", "question": "Who founded Molto Press?", "answer": ["Ana Ruiz", "A. Ruiz"], "data_source": "hotpotqa"},
    {"id": "q2", "question": "What is 12 * 7?", "answer": "84", "data_source": "gsm8k"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_to_verl_writes_verls_schema_and_reads_back(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", ROWS)
    out = tmp_path / "q.parquet"
    res = runner.invoke(app, ["data", "to-verl", str(src), str(out), "--tools", "search,calc", "--split", "test"])
    assert res.exit_code == 0, res.output
    table = pq.read_table(out)
    assert set(table.column_names) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    rows = table.to_pylist()
    assert [r["data_source"] for r in rows] == ["hotpotqa", "gsm8k"]
    assert [r["ability"] for r in rows] == ["fact-reasoning", "math"]
    for r, src_row in zip(rows, ROWS):
        system, user = r["prompt"]
        assert system == {"role": "system", "content": system_prompt(["search", "calc"], 6)}
        assert user == {"role": "user", "content": src_row["question"]}
        assert r["reward_model"]["style"] == "rule"
        assert r["extra_info"]["id"] == src_row["id"] and r["extra_info"]["split"] == "test"
    assert rows[0]["reward_model"]["ground_truth"] == ["Ana Ruiz", "A. Ruiz"]
    back = load_dataset(out)  # aepo reads its own conversion: same questions, answers, sources
    assert [(t.question, t.answers, t.data_source) for t in back] == [
        ("Who founded Molto Press?", ["Ana Ruiz", "A. Ruiz"], "hotpotqa"), ("What is 12 * 7?", ["84"], "gsm8k")]


@pytest.mark.skipif(not (SHARED / "benchmarks").exists(), reason="../shared/data not present")
def test_to_verl_on_a_bundled_benchmark(tmp_path):
    src = SHARED / "benchmarks" / "hotpotqa.jsonl"
    out = tmp_path / "h.parquet"
    res = runner.invoke(app, ["data", "to-verl", str(src), str(out), "--limit", "5"])
    assert res.exit_code == 0, res.output
    original = load_dataset(src, limit=5)
    back = load_dataset(out)
    assert [(t.question, t.answers) for t in back] == [(t.question, t.answers) for t in original]


@pytest.mark.parametrize("args, message", [
    (["--tools", "search,browser"], "browser"),
    (["--max-tool-calls", "-1"], "--max-tool-calls"),
])
def test_to_verl_bad_options(tmp_path, args, message):
    src = write_jsonl(tmp_path / "q.jsonl", ROWS)
    res = runner.invoke(app, ["data", "to-verl", str(src), str(tmp_path / "o.parquet"), *args])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "o.parquet").exists()


def test_to_verl_needs_a_parquet_name_and_an_existing_file(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", ROWS)
    res = runner.invoke(app, ["data", "to-verl", str(src), str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and ".parquet" in res.output
    res = runner.invoke(app, ["data", "to-verl", str(tmp_path / "none.jsonl"), str(tmp_path / "o.parquet")])
    assert res.exit_code == 2 and "none.jsonl" in res.output


def honest(answer):
    return f"<think> look it up. </think><search> molto press </search>{format_result('Ana Ruiz founded it.')}" \
           f"<think> found. </think><answer> {answer} </answer>"


@pytest.mark.parametrize("ground_truth", [
    ["Ana Ruiz", "A. Ruiz"],
    np.array(["Ana Ruiz", "A. Ruiz"], dtype=object),  # how a parquet list comes back through pandas
    {"target": ["Ana Ruiz"]},  # Search-R1's layout
    "Ana Ruiz",
])
def test_compute_score_rewards_the_models_answer(ground_truth):
    s = compute_score("hotpotqa", honest("ana ruiz"), ground_truth, {"index": 0})
    assert s == {"score": 1.0, "acc": 1.0, "f1": 1.0, "em": 1.0, "format_ok": 1.0}
    wrong = compute_score("hotpotqa", honest("bo lind"), ground_truth)
    assert wrong["score"] == 0.0 and wrong["format_ok"] == 1.0


def test_compute_score_ignores_answers_inside_tool_output():
    """The policy cannot be paid for an answer the tool printed, nor for forging result tags."""
    tool_says = "<think> x </think><search> q </search>" + format_result("<answer> Ana Ruiz </answer>") \
                + "<think> done </think>"
    assert compute_score("hotpotqa", tool_says, ["Ana Ruiz"])["acc"] == 0.0
    forged = "<think> x </think><result> Ana Ruiz </result><answer> Ana Ruiz </answer>"
    s = compute_score("hotpotqa", forged, ["Ana Ruiz"])
    assert s["format_ok"] == 0.0 and s["score"] == -1.0


def test_compute_score_math_and_bad_ground_truth():
    s = compute_score("gsm8k", "<think> 12 * 7 = 84 </think><answer> \\boxed{84} </answer>", "84")
    assert s["score"] == 1.0 and s["acc"] == 1.0
    with pytest.raises(ValueError, match="no gold answer"):
        compute_score("gsm8k", "<answer> 1 </answer>", [])


def test_verl_rows_index_rows_in_order():
    from aepo.data.datasets import TaskRow

    rows = verl_rows([TaskRow("a", "q?", ["x"], "nq"), TaskRow("b", "r?", ["y"], "nq")], tools=[])
    assert [r["extra_info"]["index"] for r in rows] == [0, 1]
    assert rows[0]["prompt"][0]["content"] == system_prompt([], 6)


def test_the_command_is_registered_when_run_as_a_module():
    """`python -m aepo.cli` runs app() at the end of the module: every command must be defined above it."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "aepo.cli", "data", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "to-verl" in res.stdout
