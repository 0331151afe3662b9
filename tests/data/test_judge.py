"""LLMJudge against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from aepo.data.judge import JudgeError, LLMJudge, parse_verdict


class FakeServer:
    """Answers /v1/chat/completions; `mode` picks the behaviour, requests are recorded."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
                )
                mode = outer.mode
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                if mode == "http500":
                    return self._send(500, b'{"error": "overloaded"}')
                if mode == "http401":
                    return self._send(401, b'{"error": "bad key"}')
                if mode == "slow":
                    time.sleep(1.0)
                if mode == "garbage":
                    return self._send(200, b"<html>not json</html>")
                if mode == "no_choices":
                    return self._send(200, b'{"choices": []}')
                prompt = json.loads(body)["messages"][-1]["content"]
                reply = {
                    "ok": "Correct" if "Predicted answer: Paris" in prompt else "Incorrect",
                    "think": "<think>Is it correct? Maybe not.</think>\nCorrect",
                    "rambling": "I cannot decide.",
                    "slow": "Correct",
                }[mode]
                payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}
                self._send(200, json.dumps(payload).encode())

            def _send(self, code: int, data: bytes) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    srv = FakeServer()
    yield srv
    srv.close()


def test_correct_and_incorrect_verdicts(server: FakeServer) -> None:
    judge = LLMJudge(server.url, model="judge-model", api_key="sk-test", timeout=5)
    good = judge.judge("Capital of France?", "Paris", ["Paris", "City of Paris"])
    assert (good.correct, good.raw, good.error) == (True, "Correct", None)
    bad = judge.judge("Capital of France?", "Lyon", "Paris")
    assert (bad.correct, bad.raw, bad.error) == (False, "Incorrect", None)

    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    user = body["messages"][1]["content"]
    assert "Question: Capital of France?" in user and "Gold answers: Paris | City of Paris" in user


def test_url_forms_and_no_key(server: FakeServer) -> None:
    for url in (server.url, server.url + "/", server.url + "/v1", server.url + "/v1/chat/completions"):
        assert LLMJudge(url, model="m").judge("q", "Paris", ["Paris"]).correct is True
    assert all("Authorization" not in r["headers"] for r in server.requests)


def test_reasoning_reply(server: FakeServer) -> None:
    server.mode = "think"
    assert LLMJudge(server.url, model="m").judge("q", "x", ["x"]).correct is True


def test_errors_give_none_verdict_or_raise(server: FakeServer) -> None:
    judge = LLMJudge(server.url, model="m", timeout=0.3)
    cases = {
        "http500": "answered HTTP 500",
        "http401": "answered HTTP 401",
        "garbage": "sent no choices[0].message.content",
        "no_choices": "sent no choices[0].message.content",
        "slow": "timed out after 0.3s",
        "rambling": "no Correct/Incorrect verdict",
    }
    for mode, message in cases.items():
        server.mode = mode
        verdict = judge.judge("q", "x", ["x"])
        assert verdict.correct is None, mode
        assert message in (verdict.error or ""), (mode, verdict.error)
        with pytest.raises(JudgeError, match=message.replace("[", r"\[").replace(".", r"\.")):
            judge.judge("q", "x", ["x"], raise_on_error=True)


def test_unreachable_endpoint() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    verdict = LLMJudge(f"http://127.0.0.1:{port}", model="m", timeout=1).judge("q", "x", ["x"])
    assert verdict.correct is None and "unreachable" in (verdict.error or "")


def test_retries_on_server_errors_only(server: FakeServer) -> None:
    server.mode = "http500"
    LLMJudge(server.url, model="m", retries=2, retry_wait=0.01).judge("q", "x", ["x"])
    assert len(server.requests) == 3
    server.requests.clear()
    server.mode = "http401"
    LLMJudge(server.url, model="m", retries=2, retry_wait=0.01).judge("q", "x", ["x"])
    assert len(server.requests) == 1


def test_empty_prediction_needs_no_call(server: FakeServer) -> None:
    judge = LLMJudge(server.url, model="m")
    assert judge.judge("q", None, ["x"]).correct is False
    assert judge.judge("q", "   ", ["x"]).correct is False
    assert server.requests == []


def test_judge_many_keeps_order(server: FakeServer) -> None:
    judge = LLMJudge(server.url, model="m")
    items = [("q", p, ["Paris"]) for p in ("Paris", "Lyon", "Paris", "Nice")]
    assert [v.correct for v in judge.judge_many(items, max_workers=3)] == [True, False, True, False]
    assert judge.judge_many([]) == []


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        LLMJudge("localhost:8000", model="m")
    with pytest.raises(ValueError, match="model"):
        LLMJudge("http://localhost:8000", model="")
    with pytest.raises(ValueError, match="timeout"):
        LLMJudge("http://localhost:8000", model="m", timeout=0)


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("Correct", True),
        ("correct.", True),
        ("Incorrect", False),
        ("The prediction is not correct.", False),
        ("Verdict: Correct", True),
        ("Incorrect. The correct answer is Paris.", False),
        ("<think>it says Incorrect?</think> Correct", True),
        ("<think>unfinished reasoning, Correct", None),
        ("Yes", True),
        ("No, it differs.", False),
        ("There is no doubt: Correct", True),
        ("I am unsure", None),
        ("", None),
    ],
)
def test_parse_verdict(reply: str, verdict: bool | None) -> None:
    assert parse_verdict(reply) is verdict


def test_judge_records_and_summary(server: FakeServer) -> None:
    from aepo.eval.runner import judge_records, summarize, summary_markdown

    def sample(answer: str | None, acc: float) -> dict[str, Any]:
        return {"answer": answer, "acc": acc, "em": acc, "f1": acc, "format_ok": True, "tool_calls": 0,
                "length": 3, "finish": "eos", "text": f"<answer>{answer}</answer>"}

    records = [
        {"id": "a", "question": "Capital of France?", "gold": ["Paris"], "n": 2,
         "samples": [sample("Paris", 1.0), sample("paris, france", 0.0)]},
        {"id": "b", "question": "Capital of Spain?", "gold": ["Madrid"], "n": 2,
         "samples": [sample("Lyon", 0.0), sample(None, 0.0)]},
    ]
    counts = judge_records(records, LLMJudge(server.url, model="m"))
    assert counts == {"judged": 3, "failed": 0}  # the sample without an answer needs no call
    assert [s["judge"] for r in records for s in r["samples"]] == [True, False, False, False]
    assert len(server.requests) == 3
    got = summarize(records)
    assert got["judge_accuracy"] == 0.25 and got["judge_failed"] == 0
    assert "judge accuracy" in summary_markdown({"x": got})
    # judged samples keep their verdict: a second pass makes no calls
    assert judge_records(records, LLMJudge(server.url, model="m")) == {"judged": 0, "failed": 0}
    assert len(server.requests) == 3
    # a failing judge leaves None and counts it; accuracy is over the verdicts it gave
    server.mode = "http401"
    for r in records:
        for s in r["samples"]:
            s.pop("judge")
    counts = judge_records(records, LLMJudge(server.url, model="m"))
    assert counts == {"judged": 3, "failed": 3}
    assert summarize(records)["judge_failed"] == 3


def test_eval_cli_checks_the_judge_options_before_any_work(tmp_path) -> None:
    from typer.testing import CliRunner

    from aepo.cli import app

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    runner = CliRunner()
    no_model = runner.invoke(app, ["eval", str(tmp_path / "nomodel"), "--data", str(data),
                                   "--judge", "http://127.0.0.1:9"])
    assert no_model.exit_code == 2 and "--judge-model" in no_model.output
    bad_url = runner.invoke(app, ["eval", str(tmp_path / "nomodel"), "--data", str(data),
                                  "--judge", "ftp://x", "--judge-model", "m"])
    assert bad_url.exit_code == 2 and "http://" in bad_url.output
    assert not (tmp_path / "runs").exists()
