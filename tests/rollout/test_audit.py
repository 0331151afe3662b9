"""`aepo audit` (aepo.rollout.audit): rows of real `aepo rollout` runs pass, in both tool formats,
and each kind of planted violation is found and makes the command exit 1."""
from __future__ import annotations

import copy
import json
import random

import pytest
from chat_templates import QWEN, chat_tokenizer
from scripted_sampler import FakeTools, ScriptedSampler
from tiny_models import save_tiny_qwen3
from typer.testing import CliRunner

from aepo.cli import app
from aepo.data.prompting import encode_prompt
from aepo.rollout.audit import AUDIT_CHECKS, audit_counts, audit_rows, row_record, trajectory_of
from aepo.rollout.config import RolloutConfig
from aepo.rollout.strategies import rollout

runner = CliRunner()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A random one-layer Qwen3 with a Qwen-style chat template (tests/chat_templates.py)."""
    return save_tiny_qwen3(tmp_path_factory.mktemp("chat"), chat_tokenizer(QWEN))


def rollout_rows(model, tmp_path, *extra: str) -> list[dict]:
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"who founded org {i}?", "answer": ["x"]}) + "\n" for i in range(2)))
    out = tmp_path / "rows.jsonl"
    res = runner.invoke(app, ["rollout", "--model", str(model), "--data", str(data), "--strategy", "aepo", "--k", "3",
                              "--max-response-tokens", "48", "--out", str(out), "--device", "cpu", *extra,
                              "tools.enabled=[calc]"])
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in out.read_text().splitlines()]


def run_audit(model, rows, tmp_path):
    f = tmp_path / "audit.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return runner.invoke(app, ["audit", str(f), "--model", str(model)])


def test_rollout_rows_pass_the_audit_in_hermes(chat_model, tmp_path):
    rows = rollout_rows(chat_model, tmp_path, "--tool-format", "hermes", "--chat-template")
    assert {r["tool_format"] for r in rows} == {"hermes"}
    res = run_audit(chat_model, rows, tmp_path)
    assert res.exit_code == 0, res.output
    for check in AUDIT_CHECKS:
        assert f"{check}" in res.output and f"{len(rows)}/{len(rows)} rows ok" in res.output


# ----------------------------------------------------------------------------- planted violations


def scripted_rows() -> tuple[list[dict], object]:
    """Rows with a tool call and an answer (hermes, scripted), as `aepo rollout` writes them."""
    tok = chat_tokenizer(QWEN)

    def script(ctx: str, draw: int) -> str:
        if "<tool_response>" not in ctx:
            return '<think>look</think>\n<tool_call>\n{"name": "calc", "arguments": {"expression": "2*3"}}\n</tool_call>'
        return "<think>ok</think>\n6"

    cfg = RolloutConfig(strategy="independent", n=2, tool_format="hermes", max_response_tokens=300)
    prompt = encode_prompt("2*3?", tok, chat_template=True, tools=["calc"], tool_format="hermes")
    trajs, _ = rollout("independent", [("q", prompt)], ScriptedSampler(tok, script), tok,
                       FakeTools(lambda n, a: "6"), cfg, random.Random(0))
    return [row_record(t, tok, "hermes") for t in trajs], tok


def plant(kind: str, row: dict, tok) -> None:
    tool = next(i for i, s in enumerate(row["segments"]) if s["role"] == "tool")
    seg = row["segments"][tool]
    if kind == "ids_text":  # a tool result whose ids are not the format's rendering of its text
        row["tool_calls"][0]["result"] = "7"
    elif kind == "loss_mask":  # a tool token trained on
        row["response_mask"][seg["start"]] = 1
    elif kind == "reward_input":  # the reward would read the tool result as the model's text
        seg["role"] = "model"
    elif kind == "finish":  # a row cut without a recorded reason
        row["finish_reason"] = ""
    elif kind == "tool_results":  # a call whose result is missing
        row["tool_calls"].append(dict(row["tool_calls"][0]))


@pytest.mark.parametrize("kind", AUDIT_CHECKS)
def test_each_planted_violation_is_found(kind):
    rows, tok = scripted_rows()
    trajs = [trajectory_of(r) for r in rows]
    assert all(not v for v in audit_rows(trajs, tok, "hermes").values())
    bad = copy.deepcopy(rows)
    plant(kind, bad[0], tok)
    found = audit_rows([trajectory_of(r) for r in bad], tok, "hermes")
    assert found[kind], found
    assert found[kind][0].startswith("q/0:")
    assert audit_counts([trajectory_of(r) for r in bad], tok, "hermes")[f"audit/{kind}"] >= 1


@pytest.mark.parametrize("kind", AUDIT_CHECKS)
def test_audit_command_exits_1_on_a_planted_violation(chat_model, tmp_path, kind):
    rows, tok = scripted_rows()
    plant(kind, rows[1], tok)
    res = run_audit(chat_model, rows, tmp_path)
    assert res.exit_code == 1, res.output
    assert f"{kind:<13} 1/2 rows ok, 1 violate it; first: q/1:" in res.output


def test_audit_refuses_rows_without_token_records(chat_model, tmp_path):
    rows, _ = scripted_rows()
    for r in rows:
        del r["response_ids"]
    res = run_audit(chat_model, rows, tmp_path)
    assert res.exit_code == 2 and "response_ids" in res.output and "aepo rollout" in res.output


def test_analyze_branching_prompts_and_scores_in_the_models_tool_format(chat_model, tmp_path, monkeypatch):
    """`aepo analyze branching` builds prompts with the run's one prompt builder and scores rows
    with the run's tool format (hermes here), as rollout, eval and training do."""
    from aepo.eval import branching
    from aepo.formats import get_format
    from aepo.models.loading import load_tokenizer
    from aepo.types import SegmentRecord, Trajectory

    seen = {}

    def fake(sampler, tok, tool_fn, prompts, score, cfg, **kw):
        seen.update(prompts=prompts, score=score, cfg=cfg)
        return {"states": 0, "auroc_dH_vs_uncertainty": None, "arms": {}}

    monkeypatch.setattr(branching, "analyze_branching", fake)
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "2*3?", "answer": ["6"]}) + "\n")
    res = runner.invoke(app, ["analyze", "branching", "--model", str(chat_model), "--data", str(data), "--k", "2",
                              "--continuations", "2", "--out", str(tmp_path / "b.json"), "--device", "cpu",
                              "--chat-template", "rollout.tool_format=hermes", "tools.enabled=[calc]"])
    assert res.exit_code == 0, res.output
    tok = load_tokenizer(chat_model)
    assert seen["cfg"].tool_format == "hermes"
    assert [ids for _, ids in seen["prompts"]] == [encode_prompt("2*3?", tok, chat_template=True, tools=["calc"],
                                                                 tool_format="hermes")]
    call = '<tool_call>\n{"name": "calc", "arguments": {"expression": "2*3"}}\n</tool_call>'
    parts = [call, get_format("hermes").result_text(tok, "6"), "6"]
    text, segments = "", []
    for role, piece in zip(("model", "tool", "model"), parts):
        segments.append(SegmentRecord(role, len(text), len(text) + len(piece), None, piece))
        text += piece
    traj = Trajectory(prompt_id=seen["prompts"][0][0], row_id=0, prompt_ids=[], segments=segments, text=text,
                      finish_reason="answer")
    s = seen["score"](traj)
    assert s["format_ok"] and s["acc"] == 1.0, s
