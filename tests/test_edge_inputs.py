"""Edge inputs that used to slip through: each gets one clear error (a ValueError, so the CLI
prints one `error: ...` line with exit status 2) naming the problem and what to do, before any
work and with nothing left behind on disk.

Config files (a directory, not UTF-8, a key given twice), weights whose tensor names do not fit
the architecture, rollout.backend=vllm or a tracking logger without its package, dataset rows
sharing one id, and preflight checks for a retriever or judge endpoint that does not answer.
"""
from __future__ import annotations

import importlib.util
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from typer.testing import CliRunner

from aepo.cli import app
from aepo.config import ConfigError, load_config, model_config
from aepo.data import judge as judge_mod
from aepo.data.datasets import load_dataset
from aepo.models import loading
from aepo.models.loading import ModelDirError, check_model_dir, load_model
from aepo.tools import search as search_mod
from aepo.train.records import MetricsLogger

torch.set_num_threads(1)
runner = CliRunner()


def one_error_line(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def hide_modules(monkeypatch, *names: str) -> None:
    """Make importlib.util.find_spec say `names` are not installed (as in a bare environment)."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name.split(".")[0] in names:
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# --------------------------------------------------------------------------- 1. config files


def test_a_config_path_that_is_a_directory_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give a YAML file") as e:
        load_config(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_a_utf16_config_with_a_byte_order_mark_is_read(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algo: grpo\nrollout:\n  n: 3\n", encoding="utf-16")  # BOM first
    assert p.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    cfg = load_config(p)
    assert cfg.algo == "grpo" and cfg.rollout.n == 3


def test_a_utf8_config_with_a_byte_order_mark_is_read(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algo: grpo\n", encoding="utf-8-sig")
    assert load_config(p).algo == "grpo"


def test_a_config_that_is_not_utf8_names_the_file_and_the_encoding(tmp_path):
    p = tmp_path / "latin.yaml"
    p.write_bytes("algo: grpo\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "is not UTF-8 text" in msg and "line 2" in msg and "save it as UTF-8" in msg


def test_a_utf16_config_without_a_byte_order_mark_is_refused_by_name(tmp_path):
    p = tmp_path / "c16.yaml"
    p.write_bytes("algo: grpo\n".encode("utf-16-le"))  # no BOM: NUL bytes, not UTF-8 text
    with pytest.raises(ConfigError, match="c16.yaml"):
        load_config(p)


@pytest.mark.parametrize("text, key, lines", [
    ("algo: grpo\nrollout:\n  n: 4\n  top_p: 0.9\n  n: 8\n", "'n'", "lines 3 and 5"),
    ("algo: grpo\nalgo: aepo\n", "'algo'", "lines 1 and 2"),
    ("rollout: {n: 4, n: 8}\n", "'n'", "lines 1 and 1"),
])
def test_a_key_given_twice_is_refused_naming_key_and_lines(tmp_path, text, key, lines):
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and f"holds the key {key} twice" in msg and lines in msg and "delete one" in msg


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("rollout:\n  <<: {n: 4, top_p: 0.9}\n  n: 6\n")
    cfg = load_config(p)
    assert cfg.rollout.n == 6 and cfg.rollout.top_p == 0.9


# --------------------------------------------------------------------------- 2. weights of another architecture


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from aepo.models.factory import init_model
    from aepo.models.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(["question: who founded molto press? <answer> x </answer>"])
    init_model(d, tok, preset="tiny", seed=0)
    return d


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rename_tensors(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    renamed = {k.replace("model.layers.", "transformer.h."): v for k, v in tensors.items()}
    save_file(renamed, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_tied_lm_head_is_not_missing(tiny_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied to the embeddings, not saved
    check_model_dir(tiny_dir)
    model, _ = load_model(tiny_dir, device="cpu")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_weights_with_other_tensor_names_are_refused_before_loading(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "renamed")
    rename_tensors(d)
    with pytest.raises(ModelDirError) as e:
        check_model_dir(d)
    msg = str(e.value)
    assert str(d) in msg and "does not hold weights for this architecture (Qwen3ForCausalLM" in msg
    assert "model.layers.0." in msg and "transformer.h.0." in msg and "randomly initialised" in msg
    assert "lm_head.weight" not in msg


def test_load_model_refuses_weights_transformers_would_leave_random(tiny_dir, tmp_path, monkeypatch):
    """The load itself checks what transformers reports missing (for architectures whose names
    the header check leaves alone)."""
    d = copy_dir(tiny_dir, tmp_path / "renamed")
    rename_tensors(d)
    monkeypatch.setattr(loading, "_renames_checkpoint_keys", lambda model: True)
    check_model_dir(d)  # the header check is skipped now
    with pytest.raises(ModelDirError, match="does not hold weights for this architecture") as e:
        load_model(d, device="cpu")
    assert "model.layers.0." in str(e.value) and "lm_head.weight" not in str(e.value)


def test_eval_of_renamed_weights_is_one_line_and_writes_nothing(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "renamed")
    rename_tensors(d)
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "who?", "answer": "x"}) + "\n")
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", str(d), "--data", str(data), "--out", str(out)])
    one_error_line(res, "does not hold weights for this architecture", "transformer.h.0.")
    assert not out.exists()


# --------------------------------------------------------------------------- 3. vLLM not installed


def train_yaml(tmp_path: Path, model_dir: Path, out: Path) -> Path:
    p = tmp_path / "train.yaml"
    p.write_text(f"algo: grpo\nmodel:\n  path: {model_dir}\nout_dir: {out}\ntrainer:\n  total_steps: 1\n")
    return p


def test_the_vllm_backend_without_vllm_says_how_to_install_it(monkeypatch):
    hide_modules(monkeypatch, "vllm")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.backend=vllm"])
    msg = str(e.value)
    assert "vLLM is not installed" in msg and "AEPO_EXTRAS=vllm python3 quickstart.py" in msg
    assert "rollout.backend=torch" in msg
    load_config(None, ["rollout.backend=torch"])


def test_train_with_the_vllm_backend_without_vllm_fails_before_the_model(tiny_dir, tmp_path, monkeypatch):
    hide_modules(monkeypatch, "vllm")

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(loading, "load_model", boom)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(train_yaml(tmp_path, tiny_dir, out)), "rollout.backend=vllm"])
    one_error_line(res, "vLLM is not installed", "AEPO_EXTRAS=vllm")
    assert not out.exists()


# --------------------------------------------------------------------------- 4. tracking loggers not installed


@pytest.mark.parametrize("name", ["wandb", "tensorboard"])
def test_a_logger_without_its_package_is_a_config_error(monkeypatch, name):
    hide_modules(monkeypatch, name)
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"trainer.logger=console,{name}"])
    msg = str(e.value)
    assert f"the {name} package is not installed" in msg and "pip install 'aepo[tracking]'" in msg


def test_metrics_logger_checks_before_writing(monkeypatch, tmp_path):
    hide_modules(monkeypatch, "wandb")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="aepo\\[tracking\\]"):
        MetricsLogger(out, ["wandb"])
    assert not out.exists()


def test_train_with_wandb_missing_writes_nothing(tiny_dir, tmp_path, monkeypatch):
    hide_modules(monkeypatch, "wandb")
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(train_yaml(tmp_path, tiny_dir, out)), "trainer.logger=console,wandb"])
    one_error_line(res, "trainer.logger includes wandb", "pip install 'aepo[tracking]'")
    assert not out.exists()


def test_a_model_trained_with_wandb_can_be_evaluated_without_it(monkeypatch, tmp_path):
    """Evaluation does not log: a model's own run config naming wandb is no error there."""
    hide_modules(monkeypatch, "wandb")
    (tmp_path / "aepo_run.yaml").write_text("trainer:\n  logger: [console, wandb]\n")
    cfg, _ = model_config(tmp_path)
    assert "wandb" in cfg.trainer.logger


# --------------------------------------------------------------------------- 5. dataset rows sharing an id


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_rows_sharing_an_id_are_refused_with_their_lines(tmp_path):
    p = write_rows(tmp_path / "qa.jsonl", [
        {"id": "q1", "question": "a?", "answer": "x"},
        {"id": "q2", "question": "b?", "answer": "x"},
        {"id": "q1", "question": "c?", "answer": "y"},
        {"id": "q2", "question": "d?", "answer": "y"},
    ])
    with pytest.raises(ValueError) as e:
        load_dataset(p)
    msg = str(e.value)
    assert str(p) in msg and "'q1' on lines 1, 3" in msg and "'q2' on lines 2, 4" in msg
    assert "give every row its own id" in msg
    assert [r.id for r in load_dataset(p, limit=2)] == ["q1", "q2"]  # the first rows alone are fine


def test_a_generated_id_colliding_with_a_given_one_is_refused(tmp_path):
    p = write_rows(tmp_path / "qa.jsonl", [
        {"question": "a?", "answer": "x"},                   # id qa-0 (generated)
        {"id": "qa-0", "question": "b?", "answer": "x"},
    ])
    with pytest.raises(ValueError, match="'qa-0' on lines 1, 2"):
        load_dataset(p)


def test_rows_of_a_json_list_sharing_an_id_name_their_rows(tmp_path):
    p = tmp_path / "qa.json"
    p.write_text(json.dumps([{"idx": 7, "question": "a?", "answer": "x"},
                             {"idx": 7, "question": "b?", "answer": "x"}]))
    with pytest.raises(ValueError, match="'7' on rows 1, 2"):
        load_dataset(p)


def test_rows_without_ids_get_unique_ones(tmp_path):
    p = write_rows(tmp_path / "qa.jsonl", [{"question": f"q{i}?", "answer": "x"} for i in range(5)])
    ids = [r.id for r in load_dataset(p)]
    assert len(set(ids)) == 5


# --------------------------------------------------------------------------- 6. endpoints that do not answer


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[tuple[str, str], tuple[int, object]]] = {}

    def _reply(self, method: str) -> None:
        if method == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, body = self.routes.get((method, self.path), (404, {"error": "not found"}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply("GET")

    def do_POST(self) -> None:
        self._reply("POST")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    """A loopback HTTP server; set `routes[(method, path)] = (status, json body)`."""
    handler = type("Handler", (_Handler,), {"routes": {}})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", handler.routes
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def silent_port():
    """A port that accepts connections but never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


RETRIEVE_REPLY = {"result": [[{"document": {"contents": '"Molto Press"\nfounded by x'}, "score": 1.0}]]}


def test_a_retriever_that_answers_passes(server):
    base, routes = server
    routes[("POST", "/retrieve")] = (200, RETRIEVE_REPLY)
    search_mod.check_reachable(f"{base}/retrieve", "--search-url")


def test_a_retriever_on_a_closed_port_is_refused(closed_port):
    url = f"http://127.0.0.1:{closed_port}/retrieve"
    with pytest.raises(ValueError) as e:
        search_mod.check_reachable(url, "--search-url")
    msg = str(e.value)
    assert msg.startswith(f"--search-url {url}: ") and "refused" in msg.lower() and "start the retriever" in msg


def test_a_retriever_url_with_the_wrong_path_is_refused(server):
    base, routes = server
    routes[("POST", "/retrieve")] = (200, RETRIEVE_REPLY)
    with pytest.raises(ValueError, match="Not Found"):
        search_mod.check_reachable(f"{base}/search", "tools.search_url")


def test_a_retriever_that_never_answers_is_refused_within_the_timeout(silent_port):
    with pytest.raises(ValueError, match="timed out; one test query, at most 0.5 s"):
        search_mod.check_reachable(f"http://127.0.0.1:{silent_port}/retrieve", "--search-url", timeout=0.5)


def test_a_retriever_url_that_is_not_http_is_refused():
    with pytest.raises(ValueError, match="--search-url 'localhost:8000'"):
        search_mod.check_reachable("localhost:8000", "--search-url")


def test_a_judge_that_answers_passes(server):
    base, routes = server
    routes[("GET", "/v1/models")] = (200, {"object": "list", "data": [{"id": "judge-7b"}]})
    judge_mod.check_reachable(base, "--judge", model="judge-7b")
    judge_mod.check_reachable(f"{base}/v1", "--judge")


def test_a_judge_without_a_model_list_still_passes(server):
    base, _ = server  # every path answers 404: reachable, nothing to check the model against
    judge_mod.check_reachable(base, "--judge", model="judge-7b")


def test_a_judge_that_serves_another_model_is_refused(server):
    base, routes = server
    routes[("GET", "/v1/models")] = (200, {"data": [{"id": "other"}]})
    with pytest.raises(ValueError, match="does not serve the model 'judge-7b' \\(it serves 'other'\\)"):
        judge_mod.check_reachable(base, "--judge", model="judge-7b")


def test_a_judge_that_refuses_the_key_is_refused(server):
    base, routes = server
    routes[("GET", "/v1/models")] = (401, {"error": "bad key"})
    with pytest.raises(ValueError, match="refused the API key \\(HTTP 401"):
        judge_mod.check_reachable(base, "--judge", api_key="wrong")


def test_a_judge_on_a_closed_port_is_refused(closed_port):
    url = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(ValueError) as e:
        judge_mod.check_reachable(url, "--judge")
    msg = str(e.value)
    assert msg.startswith(f"--judge {url}: the judge is unreachable") and "refused" in msg.lower()
    assert "start the judge server" in msg


def test_a_judge_that_never_answers_is_refused_within_the_timeout(silent_port):
    with pytest.raises(ValueError, match="within 0.5 s"):
        judge_mod.check_reachable(f"http://127.0.0.1:{silent_port}", "--judge", timeout=0.5)
