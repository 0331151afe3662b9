"""The command line: help on every command, version, and clear errors for bad input."""
import sys

import pytest
import repo_paths
from typer.testing import CliRunner

import aepo
from aepo.cli import app

runner = CliRunner()
COMMANDS = ["demo", "train", "sft", "eval", "rollout", "compare", "model", "tools", "world",
            "model init", "model import-smollm2", "tools search", "tools python", "tools calc", "world build",
            "data", "data to-verl", "audit"]


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and aepo.__version__ in res.output


def test_top_level_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for c in ("demo", "train", "sft", "eval", "rollout", "compare", "model", "tools", "world"):
        assert c in res.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd):
    res = runner.invoke(app, [*cmd.split(), "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_train_unknown_key_fails_before_work(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algo: grpo\nrollout:\n  nn: 3\n")
    res = runner.invoke(app, ["train", str(cfg)])
    assert res.exit_code == 2
    assert "rollout.nn" in res.output


def test_train_without_model_path(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algo: grpo\n")
    res = runner.invoke(app, ["train", str(cfg), f"out_dir={tmp_path / 'o'}"])
    assert res.exit_code == 2 and "model.path" in res.output
    assert not (tmp_path / "o").exists()


def test_demo_unknown_algo(tmp_path):
    res = runner.invoke(app, ["demo", "--quick", "--algo", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "nope" in res.output and "grpo" in res.output


def test_rollout_unknown_strategy(tmp_path):
    res = runner.invoke(app, ["rollout", "--model", str(tmp_path), "--data", str(tmp_path / "q.jsonl"),
                              "--strategy", "bogus"])
    assert res.exit_code == 2 and "bogus" in res.output


def test_eval_missing_data_file(tmp_path):
    res = runner.invoke(app, ["eval", str(tmp_path), "--data", str(tmp_path / "none.jsonl")])
    assert res.exit_code == 2 and "none.jsonl" in res.output


# ----------------------------------------------------------------- end to end with a micro model
import json  # noqa: E402

SHARED = repo_paths.SHARED / "data"


# micro_dir: the one-layer micro model of tests/conftest.py


def test_rollout_command_writes_one_row_per_sample(micro_dir, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"who founded org {i}?", "answer": ["x"]}) + "\n"
                            for i in range(2)))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "1", "title": "molto press", "text": "founded by x"}) + "\n")
    out = tmp_path / "rows.jsonl"
    res = runner.invoke(app, ["rollout", "--model", str(micro_dir), "--data", str(data), "--strategy", "aepo",
                              "--k", "3", "--max-response-tokens", "16", "--search-corpus", str(corpus),
                              "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6
    assert len({r["prompt_id"] for r in rows}) == 2
    assert sorted(r["row_id"] for r in rows) == [0, 0, 1, 1, 2, 2]
    summary = json.loads((tmp_path / "rows.stats.json").read_text())  # the batch statistics
    assert "6 rows of 2 prompts" in res.output
    prompt_order = list(dict.fromkeys(r["prompt_id"] for r in rows))
    for r in rows:
        assert {"prompt_id", "row_id", "parent_row_id", "branch_position", "text", "segments", "tool_calls",
                "finish_reason", "m", "decisions"} <= set(r)
        assert (r["parent_row_id"] is None) == (r["branch_position"] is None)
        # m: the prompt's global budget, as the rollout's stats report it
        assert isinstance(r["m"], int) and 1 <= r["m"] <= 3
        assert r["m"] == summary["m"][prompt_order.index(r["prompt_id"])]
        assert isinstance(r["decisions"], list)
        for d in r["decisions"]:
            assert {"dH", "l", "p", "branched"} <= set(d)
    own = [d for r in rows for d in r["decisions"] if d["row_id"] == r["row_id"]]
    assert len(own) == len(summary["decisions"])
    assert sum(d["branched"] for d in own) == summary["branches"]


def test_rollout_command_writes_m_and_decisions(micro_dir, tmp_path, monkeypatch):
    """The rows carry each trajectory's m and decisions verbatim (a rollout with a branch)."""
    from aepo.rollout import strategies
    from aepo.types import Trajectory

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "who founded org 0?", "answer": ["x"]}) + "\n")
    d0 = {"dH": 0.75, "l": 0, "p": 0.65, "branched": True, "turn": 1, "row_id": 0}
    d1 = {"dH": -0.5, "l": 1, "p": 0.38, "branched": False, "turn": 2, "row_id": 1}

    def fake_rollout(strategy, prompts, sampler, tok, tool_fn, cfg, rng):
        (pid, ids), = prompts
        trajs = [Trajectory(pid, 0, list(ids), m=1, decisions=[d0]),
                 Trajectory(pid, 1, list(ids), parent_row_id=0, branch_position=0, m=1, decisions=[d0, d1])]
        return trajs, {"m": [1], "branches": 1, "decisions": []}

    monkeypatch.setattr(strategies, "rollout", fake_rollout)
    out = tmp_path / "rows.jsonl"
    res = runner.invoke(app, ["rollout", "--model", str(micro_dir), "--data", str(data), "--k", "2",
                              "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["m"] for r in rows] == [1, 1]
    assert rows[0]["decisions"] == [d0] and rows[1]["decisions"] == [d0, d1]


@pytest.mark.skipif(not (SHARED / "benchmarks").exists(), reason="../shared/data not present")
def test_eval_runs_on_every_bundled_benchmark(micro_dir, tmp_path):
    files = sorted((SHARED / "benchmarks").glob("*.jsonl"))
    assert len(files) >= 8
    args = ["eval", str(micro_dir), "--n", "2", "--limit", "2", "--max-response-tokens", "12",
            "--search-cache", str(SHARED / "search_cache.json"), "--out", str(tmp_path), "--device", "cpu"]
    for f in files:
        args += ["--data", str(f)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {f.stem for f in files}
    for name, s in summary.items():
        assert s["n_questions"] == 2 and s["n_samples"] == 2
        for k in ("pass@1", "pass@2", "em", "f1", "tool_calls"):
            assert 0.0 <= s[k] <= (1.0 if k != "tool_calls" else 100), (name, k)
    assert "| gsm8k |" in (tmp_path / "summary.md").read_text()
    # resumable: a second run finds every question done and leaves the samples as they were
    before = (tmp_path / "gsm8k.samples.jsonl").read_text()
    assert runner.invoke(app, args).exit_code == 0
    assert (tmp_path / "gsm8k.samples.jsonl").read_text() == before


def test_train_and_world_build_use_the_demo_world(tmp_path, monkeypatch):
    """`aepo train` without data.train, and `aepo world build`, give the world `aepo demo` trains
    its SFT model on (same seed, same names), not another one."""
    from aepo.demo.stages import DemoPlan, stage_world
    from aepo.demo.world import World, demo_world
    from aepo.models.factory import init_model
    from aepo.models.tokenizer import build_tokenizer
    from aepo.train import rl

    demo = stage_world(tmp_path / "demo", DemoPlan(), 3)
    res = runner.invoke(app, ["world", "build", str(tmp_path / "built"), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert World.load(tmp_path / "built").train == demo.train

    seen = {}
    monkeypatch.setattr(rl.RLTrainer, "fit", lambda self, **kw: seen.setdefault("tasks", self.tasks) and [])
    tok = build_tokenizer(demo.vocabulary_texts()[:50])
    model_dir = tmp_path / "m"
    init_model(model_dir, tok)
    config = repo_paths.SRC / "aepo" / "configs" / "demo.yaml"
    res = runner.invoke(app, ["train", str(config), f"model.path={model_dir}", "data.world_seed=3",
                              f"out_dir={tmp_path / 'run'}"])
    assert res.exit_code == 0, res.output
    assert [t.question for t in seen["tasks"]] == [r["question"] for r in demo_world(3).train]
    assert seen["tasks"][0].question == demo.train[0]["question"]
    # the world is written beside the run and its corpus named in the run config the model carries,
    # so `aepo eval` of the trained model searches what training searched
    import yaml

    run = tmp_path / "run"
    assert World.load(run / "world").corpus == demo.corpus
    for saved in (run / "config.yaml", run / "final" / "aepo_run.yaml"):
        if saved.exists():
            assert yaml.safe_load(saved.read_text())["tools"]["search_corpus"] == str((run / "world" / "corpus.jsonl").resolve())
    assert (run / "final" / "aepo_run.yaml").exists()


def test_world_demos_writes_the_demos_sft_data(tmp_path):
    """`aepo world demos` writes what the demo's SFT stage trains on (same plan, same rows), in a
    form `aepo sft` reads, from worlds other than the demo world."""
    from aepo.demo.stages import demo_config, expert_demonstrations
    from aepo.demo.world import demo_world
    from aepo.io import read_jsonl
    from aepo.train.sft import check_sft_rows

    out = tmp_path / "demos.jsonl"
    res = runner.invoke(app, ["world", "demos", str(out), "--n", "6", "--worlds", "2", "--seed", "3"])
    assert res.exit_code == 0, res.output
    cfg = demo_config(seed=3, overrides=["demo.n_demos=6", "demo.demo_worlds=2"])
    rows = read_jsonl(out)
    assert rows == json.loads(json.dumps(expert_demonstrations(cfg.demo, 3, cfg.tools)))
    assert len(check_sft_rows(out)) == 6 and f"{sum(r['correct'] for r in rows)} (" in res.output
    world = demo_world(3)
    assert not {r["prompt"] for r in rows} & {q["question"] for q in world.train + world.test}
    for bad, what in ((["--n", "0"], "--n and --worlds must be at least 1"), (["--level", "7"], "--level 7")):
        res = runner.invoke(app, ["world", "demos", str(tmp_path / "x.jsonl"), *bad])
        assert res.exit_code != 0 and what in res.output


def test_ctrl_c_in_train_says_how_to_resume(tmp_path, monkeypatch):
    from aepo.models.factory import init_model
    from aepo.models.tokenizer import build_tokenizer
    from aepo.train import rl

    def interrupted(self, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(rl.RLTrainer, "fit", interrupted)
    model_dir = tmp_path / "m"
    init_model(model_dir, build_tokenizer(["a few words of text"]))
    config = repo_paths.SRC / "aepo" / "configs" / "demo.yaml"
    monkeypatch.setattr("sys.argv", ["aepo", "train", str(config), f"model.path={model_dir}",
                                     f"out_dir={tmp_path / 'run'}"])
    res = runner.invoke(app, sys.argv[1:])
    assert res.exit_code == 130
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output
    assert lines[0].startswith("interrupted: no checkpoint was written yet")
    assert lines[0].endswith(f"continue with: aepo train {config} model.path={model_dir} "
                             f"out_dir={tmp_path / 'run'} --resume")
