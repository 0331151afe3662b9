"""Bad input at the command line: one `error: <what>; <what to do>` line on stderr, exit status
2, before any model is loaded or anything is written; warnings for likely mistakes."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import aepo.models.loading as loading
from aepo.cli import app

torch.set_num_threads(1)
runner = CliRunner()

QA_ROW = {"question": "who founded molto press?", "answer": ["x"]}
MATH_ROW = {"question": "what is 2 + 3?", "answer": "5"}


def error_line(res, *needles: str, advice: bool = True) -> str:
    """The one line a failed command writes to stderr; it names every needle and (with
    `advice`) says what to do after a "; "."""
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("error: ") and ("; " in line or not advice), line
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# micro_dir: the one-layer micro model of tests/conftest.py


@pytest.fixture
def model_copy(micro_dir, tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    for f in micro_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model (the expensive part)."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(loading, "load_model", boom)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A directory this user cannot create files in (a read-only one; as root, /proc)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        candidates = [d, Path("/proc")]
        for c in candidates:
            try:
                fd, probe = tempfile.mkstemp(dir=c)
            except OSError:
                yield c
                return
            os.close(fd)
            os.unlink(probe)
        pytest.skip("no unwritable directory here")
    finally:
        d.chmod(0o700)


# --------------------------------------------------------------------------- 1. model directories


def _truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _empty(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"")


def _bad_config(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "qwen3", "hidden_size": 32,\n')


def _other_size(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))


def _no_tokenizer_json(d: Path) -> None:
    (d / "tokenizer.json").unlink()


@pytest.mark.parametrize("damage, needles", [
    (_truncate, ["model.safetensors is truncated", "copy"]),
    (_empty, ["model.safetensors is empty", "copy"]),
    (_bad_config, ["config.json is not valid JSON", "line 2"]),
    (_other_size, ["do not match config.json", ", 32] in the weights but", ", 64] per config.json"]),
    (_no_tokenizer_json, ["tokenizer.json is missing", "copy tokenizer.json"]),
])
def test_damaged_model_dir_is_named(model_copy, damage, needles):
    damage(model_copy)
    res = runner.invoke(app, ["model", "info", str(model_copy)])
    line = error_line(res, str(model_copy), *needles)
    assert "sentencepiece" not in line


def test_damaged_model_fails_eval_before_any_output(model_copy, tmp_path):
    _truncate(model_copy)
    data = write_rows(tmp_path / "q.jsonl", [QA_ROW])
    res = runner.invoke(app, ["eval", str(model_copy), "--data", str(data), "--out", str(tmp_path / "ev"),
                              "--search-corpus", str(data), "--device", "cpu"])
    error_line(res, "model.safetensors is truncated")
    assert not (tmp_path / "ev").exists()


# --------------------------------------------------------------------------- 2. output paths


def test_rollout_out_is_a_directory_or_under_a_file(micro_dir, tmp_path, no_model_load):
    data = write_rows(tmp_path / "q.jsonl", [QA_ROW])
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    base = ["rollout", "--model", str(micro_dir), "--data", str(data), "--device", "cpu", "--out"]
    error_line(runner.invoke(app, base + [str(tmp_path / "adir")]), "--out", "is a directory, but a file is needed")
    error_line(runner.invoke(app, base + [str(tmp_path / "afile" / "rows.jsonl")]), "--out", "afile is a file")


def test_eval_out_occupied_by_files(micro_dir, tmp_path, no_model_load):
    data = write_rows(tmp_path / "q.jsonl", [QA_ROW])
    (tmp_path / "afile").write_text("x")
    base = ["eval", str(micro_dir), "--data", str(data), "--device", "cpu", "--out"]
    error_line(runner.invoke(app, base + [str(tmp_path / "afile")]), "--out", "afile is a file")
    out = tmp_path / "ev"
    (out / "q.samples.jsonl").mkdir(parents=True)  # where eval writes its samples
    error_line(runner.invoke(app, base + [str(out)]), "q.samples.jsonl is a directory")


@pytest.mark.parametrize("cmd", ["rollout", "eval"])
def test_unwritable_out_is_reported_before_generation(cmd, micro_dir, tmp_path, unwritable, no_model_load):
    data = write_rows(tmp_path / "q.jsonl", [QA_ROW])
    out = unwritable / "out"
    args = (["rollout", "--model", str(micro_dir), "--data", str(data), "--out", str(out / "r.jsonl")]
            if cmd == "rollout" else ["eval", str(micro_dir), "--data", str(data), "--out", str(out)])
    error_line(runner.invoke(app, args + ["--device", "cpu"]), "--out", "is not writable", str(unwritable))


def train_yaml(tmp_path: Path, micro_dir: Path, out: Path, **extra) -> Path:
    data = write_rows(tmp_path / "train.jsonl", [QA_ROW])
    cfg = {"algo": "grpo", "model": {"path": str(micro_dir), "device": "cpu"}, "data": {"train": str(data)},
           "tools": {"enabled": ["calc"]}, "rollout": {"n": 2, "max_response_tokens": 4},
           "trainer": {"total_steps": 0, "save_every": 1, "prompts_per_step": 1, "ppo_mini_batch_size": 2,
                       "ppo_micro_batch_size": 2},
           "out_dir": str(out), **extra}
    p = tmp_path / "train.yaml"
    p.write_text(json.dumps(cfg))  # JSON is YAML
    return p


def test_train_out_dir_is_a_file(micro_dir, tmp_path, no_model_load):
    (tmp_path / "afile").write_text("x")
    cfg = train_yaml(tmp_path, micro_dir, tmp_path / "afile")
    error_line(runner.invoke(app, ["train", str(cfg)]), "out_dir", "afile is a file")


def test_train_unwritable_out_dir(micro_dir, tmp_path, unwritable, no_model_load):
    cfg = train_yaml(tmp_path, micro_dir, unwritable / "run")
    error_line(runner.invoke(app, ["train", str(cfg)]), "out_dir", "is not writable")


def test_sft_out_is_a_file_or_a_directory_of_other_files(micro_dir, tmp_path, no_model_load):
    data = write_rows(tmp_path / "d.jsonl", [{"prompt": "q", "segments": [["model", "<answer> x </answer>"]]}])
    (tmp_path / "afile").write_text("x")
    base = ["sft", "--model", str(micro_dir), "--data", str(data), "--out"]
    error_line(runner.invoke(app, base + [str(tmp_path / "afile")]), "--out", "afile is a file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    error_line(runner.invoke(app, base + [str(tmp_path / "notes")]), "--out", "holds files but no model")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_demo_checks_before_creating_its_out_dir(tmp_path, monkeypatch):
    import aepo.demo.stages as stages

    monkeypatch.setattr(stages, "stage_world", lambda *a, **k: pytest.fail("the demo started its work"))
    (tmp_path / "afile").write_text("x")
    error_line(runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "afile")]), "--out", "afile is a file")
    out = tmp_path / "new"
    error_line(runner.invoke(app, ["demo", "--quick", "--out", str(out), "trainer.nope=1"]), "trainer.nope")
    error_line(runner.invoke(app, ["demo", "--quick", "--out", str(out), "--algo", "nope"]), "nope")
    assert not out.exists()


def test_compare_out_is_a_file(tmp_path, monkeypatch):
    import aepo.demo.stages as stages

    monkeypatch.setattr(stages, "stage_world", lambda *a, **k: pytest.fail("compare started its work"))
    (tmp_path / "afile").write_text("x")
    error_line(runner.invoke(app, ["compare", "--quick", "--algos", "grpo", "--seeds", "1",
                                   "--out", str(tmp_path / "afile")]), "--out", "afile is a file")
    error_line(runner.invoke(app, ["compare", "--quick", "--algos", "grpo", "--out", str(tmp_path / "c"),
                                   "--from", str(tmp_path / "nowhere")]), "--from", "nowhere")
    assert not (tmp_path / "c").exists() and not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------------------- 3. counts, algorithms, overrides


@pytest.mark.parametrize("n", ["0", "-2"])
def test_eval_n_must_be_positive(micro_dir, tmp_path, n, no_model_load):
    data = write_rows(tmp_path / "q.jsonl", [QA_ROW])
    res = runner.invoke(app, ["eval", str(micro_dir), "--data", str(data), "--n", n, "--out", str(tmp_path / "ev")])
    error_line(res, "--n must be >= 1", f"got {n}")
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("args, needles", [
    (["--seeds", "0"], ["--seeds must be >= 1", "got 0"]),
    (["--algos", "grpo,nope"], ["--algos", "'nope'", "valid: ", "aepo"]),
    (["--algos", "grpo,grpo"], ["--algos", "'grpo'", "more than once"]),
    (["--algos", "grpo", "trainer.nope=1"], ["trainer.nope"]),
    (["--algos", "grpo", "rollout.n=0"], ["rollout.n"]),
])
def test_compare_arguments_are_checked_before_any_work(tmp_path, monkeypatch, args, needles):
    import aepo.demo.stages as stages

    monkeypatch.setattr(stages, "stage_world", lambda *a, **k: pytest.fail("compare started its work"))
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", "--quick", "--out", str(out), *args])
    error_line(res, *needles, advice="rollout.n" not in needles)  # config.validate's wording
    assert not out.exists()


# --------------------------------------------------------------------------- 4. datasets with one name


def test_eval_two_datasets_with_one_stem(micro_dir, tmp_path, no_model_load):
    a = write_rows(tmp_path / "q.jsonl", [QA_ROW])
    (tmp_path / "other").mkdir()
    b = write_rows(tmp_path / "other" / "q.jsonl", [MATH_ROW])
    res = runner.invoke(app, ["eval", str(micro_dir), "--data", str(a), "--data", str(b), "--out", str(tmp_path / "ev")])
    error_line(res, str(a), str(b), "same name 'q'")


# --------------------------------------------------------------------------- 5. model init over a model


def test_model_init_refuses_an_existing_model_without_force(micro_dir, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    for f in micro_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    before = (out / "model.safetensors").read_bytes()
    error_line(runner.invoke(app, ["model", "init", str(out)]), str(out), "already holds a model", "--force")
    assert (out / "model.safetensors").read_bytes() == before
    res = runner.invoke(app, ["model", "init", str(out), "--force", "--max-vocab", "400"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directory left behind


def test_model_init_bad_preset_leaves_nothing(tmp_path):
    error_line(runner.invoke(app, ["model", "init", str(tmp_path / "x"), "--preset", "huge"]),
               "unknown model preset 'huge'", "tiny")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- 6. SFT rows


@pytest.mark.parametrize("text, needles", [
    ("", ["d.jsonl", "no demonstrations", "empty"]),
    ('{"prompt": "q"}\n', ["d.jsonl:1", "'segments'", "'messages'"]),
    ('{"prompt": "q", "segments": [["model", "a"]]}\n\n{"prompt": "q", "segments": [["model", 3]]}\n',
     ["d.jsonl:3", "segments[0]", "must be a string", "int"]),
    ('{"prompt": 7, "segments": [["model", "a"]]}\n', ["d.jsonl:1", "'prompt'", "string"]),
    ('{"prompt": "q", "segments": "model: a"}\n', ["d.jsonl:1", "'segments'", "list"]),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}\n',
     ["d.jsonl:1", "messages[1].content"]),
    ('{"messages": [{"role": "user", "content": "q"}]}\n', ["d.jsonl:1", "no assistant message"]),
])
def test_bad_sft_rows_name_file_line_and_field(micro_dir, tmp_path, text, needles, no_model_load):
    data = tmp_path / "d.jsonl"
    data.write_text(text)
    res = runner.invoke(app, ["sft", "--model", str(micro_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    error_line(res, *needles)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- 7. resume


def fake_checkpoint(micro_dir: Path, cfg_file: Path, out: Path, step: int = 1) -> None:
    """A run in `out`: its config.yaml and a checkpoint at `step`, as the trainer writes them."""
    from aepo.config import load_config, save_config
    from aepo.train.checkpoint import save_checkpoint

    model, tok = loading.load_model(micro_dir, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out.mkdir(parents=True, exist_ok=True)
    save_config(load_config(cfg_file), out / "config.yaml")
    save_checkpoint(out / "checkpoints", step, model, tok, opt, None, {}, keep_last=2)


def test_fresh_train_into_a_run_with_checkpoints_is_refused(micro_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = train_yaml(tmp_path, micro_dir, out)
    fake_checkpoint(micro_dir, cfg, out)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    error_line(runner.invoke(app, ["train", str(cfg)]), str(out), "step_1", "--resume", "--force")
    assert (out / "checkpoints" / "step_1").is_dir()


def test_resume_with_another_config_lists_the_differences(micro_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = train_yaml(tmp_path, micro_dir, out)
    fake_checkpoint(micro_dir, cfg, out)
    saved = (out / "config.yaml").read_text()
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    res = runner.invoke(app, ["train", str(cfg), "algo=aepo", "--resume"])
    error_line(res, "config.yaml", "algo ('grpo' in the run, 'aepo' now)", "--force")
    assert (out / "config.yaml").read_text() == saved


def test_resume_says_where_it_starts(micro_dir, tmp_path):
    out = tmp_path / "run"
    cfg = train_yaml(tmp_path, micro_dir, out, trainer={"total_steps": 1, "save_every": 1, "prompts_per_step": 1})
    # nothing to resume yet: said, then a fresh start at step 0 (total_steps 0: no training)
    res = runner.invoke(app, ["train", str(cfg), "--resume", "trainer.total_steps=0"])
    assert res.exit_code == 0, res.output
    assert f"nothing to resume: no checkpoint in {out / 'checkpoints'}; starting at step 0" in res.stderr
    # a checkpoint at step 1: resumed from it
    fake_checkpoint(micro_dir, cfg, out)
    res = runner.invoke(app, ["train", str(cfg), "--resume"])
    assert res.exit_code == 0, res.output
    assert f"resuming from step 1 ({out / 'checkpoints' / 'step_1'})" in res.stderr
    # --force: a fresh start that deletes the old run's checkpoints
    res = runner.invoke(app, ["train", str(cfg), "--force", "trainer.total_steps=0"])
    assert res.exit_code == 0, res.output
    assert "starting over" in res.stderr and not (out / "checkpoints" / "step_1").exists()


def test_trainer_fit_refuses_a_changed_config_unless_forced(micro_dir, tmp_path):
    from aepo.config import load_config
    from aepo.data.datasets import TaskRow
    from aepo.train.checkpoint import RunDirError
    from aepo.train.rl import RLTrainer

    out = tmp_path / "run"
    cfg_file = train_yaml(tmp_path, micro_dir, out)
    fake_checkpoint(micro_dir, cfg_file, out)
    model, tok = loading.load_model(micro_dir, device="cpu")
    tasks = [TaskRow("0", QA_ROW["question"], ["x"], "q")]
    same = load_config(cfg_file)
    assert RLTrainer(same, model, tok, tasks, lambda calls: [], out).fit(resume=True, progress=False) == []
    other = load_config(cfg_file, ["trainer.lr=0.5"])
    with pytest.raises(RunDirError, match=r"trainer\.lr \(0\.0001 in the run, 0\.5 now\)"):
        RLTrainer(other, model, tok, tasks, lambda calls: [], out).fit(resume=True, progress=False)
    with pytest.raises(RunDirError, match="already holds checkpoints"):
        RLTrainer(same, model, tok, tasks, lambda calls: [], out).fit(progress=False)
    RLTrainer(other, model, tok, tasks, lambda calls: [], out).fit(resume=True, force=True, progress=False)


@pytest.mark.parametrize("cmd", ["demo", "compare"])
def test_demo_and_compare_rerun_with_another_config_is_refused(cmd, micro_dir, tmp_path, monkeypatch):
    """`aepo demo` and `aepo compare` resume an unfinished RL run on a re-run: only with its config."""
    import aepo.demo.stages as stages
    from aepo.config import save_config
    from aepo.demo.compare import _run_key
    from aepo.io import atomic_write_json, claim_keyed_output
    from aepo.train.checkpoint import save_checkpoint

    out = tmp_path / "out"
    rl = out / "rl" if cmd == "demo" else out / "runs" / "aepo_seed0" / "rl"
    model, tok = loading.load_model(micro_dir, device="cpu")
    cfg = stages.demo_config("aepo", 0, quick=True)
    if cmd == "demo":  # an unfinished RL stage, keyed as `aepo demo --quick` keys it
        out.mkdir()
        atomic_write_json(out / stages.STAGES_FILE, {"RL": {"key": stages.stage_keys(cfg, 0)["RL"]}})
    else:
        claim_keyed_output(rl.parent, _run_key(cfg, cfg))
    rl.mkdir(parents=True)
    save_config(cfg, rl / "config.yaml")
    save_checkpoint(rl / "checkpoints", 1, model, tok, torch.optim.AdamW(model.parameters()), None, {})
    monkeypatch.setattr(stages, "stage_world", lambda *a, **k: pytest.fail("the run started its work"))
    args = ["--algo", "aepo"] if cmd == "demo" else ["--algos", "aepo", "--seeds", "1"]
    res = runner.invoke(app, [cmd, "--quick", "--out", str(out), *args, "trainer.lr=0.5"])
    error_line(res, str(out), "made with other settings", "trainer.lr: 0.0001 -> 0.5", "another --out", "--force")
    assert (rl / "checkpoints" / "step_1").exists()  # nothing was removed


# --------------------------------------------------------------------------- 8. search QA without search


def test_eval_warns_when_search_qa_has_no_search_tool(micro_dir, tmp_path):
    qa = write_rows(tmp_path / "trivia.jsonl", [QA_ROW])
    maths = write_rows(tmp_path / "maths.jsonl", [MATH_ROW])
    args = ["eval", str(micro_dir), "--n", "1", "--max-response-tokens", "2", "--device", "cpu"]
    res = runner.invoke(app, args + ["--data", str(qa), "--data", str(maths), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    warnings = [x for x in res.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "no search tool" in warnings[0] and "trivia" in warnings[0]
    assert "maths" not in warnings[0] and "--search-corpus" in warnings[0]
    res = runner.invoke(app, args + ["--data", str(maths), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0 and "warning:" not in res.stderr


# --------------------------------------------------------------------------- 9. progress bars


def test_rollout_shows_progress_and_no_transformers_bars(micro_dir, tmp_path):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process
    data = write_rows(tmp_path / "q.jsonl", [QA_ROW, {"question": "who founded org 2?", "answer": ["y"]}])
    res = runner.invoke(app, ["rollout", "--model", str(micro_dir), "--data", str(data), "--k", "2",
                              "--max-response-tokens", "3", "--batch-prompts", "1", "--out",
                              str(tmp_path / "r.jsonl"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "[rollout aepo] step 2/2" in res.stderr  # the bar, as printed when not on a terminal
    assert "Loading weights" not in res.output
    assert "no search tool" in res.stderr  # search QA rows, no search option
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert "4 rows of 2 prompts" in res.stdout
    summary = json.loads((tmp_path / "r.stats.json").read_text())  # the batch statistics, merged over batches
    assert len(summary["m"]) == 2 and summary["rows_per_prompt"] == [2, 2]


def test_model_info_shows_no_transformers_bar(micro_dir):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    res = runner.invoke(app, ["model", "info", str(micro_dir)])
    assert res.exit_code == 0, res.output
    assert "Loading weights" not in res.output


def test_eval_with_a_retriever_or_judge_that_does_not_answer_stops_before_any_work(micro_dir, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    qa = write_rows(tmp_path / "trivia.jsonl", [QA_ROW])
    out = tmp_path / "out"
    base = ["eval", str(micro_dir), "--data", str(qa), "--out", str(out), "--device", "cpu"]
    res = runner.invoke(app, [*base, "--search-url", f"http://127.0.0.1:{closed}/retrieve"])
    error_line(res, "--search-url", f"127.0.0.1:{closed}", "Connection refused")
    res = runner.invoke(app, [*base, "--judge", f"http://127.0.0.1:{closed}", "--judge-model", "j"])
    error_line(res, "--judge", f"127.0.0.1:{closed}")
    assert not out.exists()  # nothing left behind
