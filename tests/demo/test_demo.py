"""`aepo demo --quick` and `aepo compare --quick` end to end: files, summary keys, caching, CLI."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from aepo.cli import app
from aepo.demo.compare import compare_table, run_compare


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output or "summary.md" in res.output
    return out


def test_demo_writes_report_and_summary(demo_dir):
    s = json.loads((demo_dir / "summary.json").read_text())
    for k in ("sft_accuracy", "rl_accuracy", "algo", "steps", "wall_seconds"):
        assert k in s
    assert s["algo"] == "aepo" and s["steps"] == 2
    assert 0.0 <= s["sft_accuracy"] <= 1.0 and 0.0 <= s["rl_accuracy"] <= 1.0
    md = (demo_dir / "summary.md").read_text()
    assert "pass@1" in md and "accuracy.png" in md
    for f in ("accuracy.png", "training_curves.png", "rl/metrics.jsonl", "sft/config.json", "rl/final/config.json",
              "world/corpus.jsonl", "eval_sft_samples.jsonl"):
        assert (demo_dir / f).exists(), f
    assert (demo_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = s["stage_seconds"]
    assert list(stages) == ["world", "demonstrations", "SFT", "SFT eval", "RL", "RL eval"]
    assert all(v is not None and 0 <= v <= s["wall_seconds"] for v in stages.values()), stages
    assert f"SFT {stages['SFT']:.0f} s" in md
    rows = [json.loads(x) for x in (demo_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_report_seconds_agree_with_the_summary(demo_dir, tmp_path):
    """summary.md prints the stage seconds summary.json holds, also at a rounding edge (2.54 s
    is 2.5 in the JSON, which prints as 2 s, not the 3 s the raw value would)."""
    import shutil

    from aepo.demo.stages import demo_config, write_report

    out = tmp_path / "demo"
    shutil.copytree(demo_dir, out)
    sft = json.loads((out / "eval_sft.json").read_text())
    rl = json.loads((out / "eval_rl.json").read_text())
    stages = {"world": None, "demonstrations": 0.26, "SFT": 2.54, "SFT eval": 1.45, "RL": 10.5, "RL eval": 0.04}
    write_report(out, demo_config("aepo", 0), sft, rl, 20.0, stages, {"world", "SFT"})
    summary = json.loads((out / "summary.json").read_text())
    md = (out / "summary.md").read_text()
    assert summary["stage_seconds"]["SFT"] == 2.5
    assert "world - cached, demonstrations 0 s, SFT 2 s cached, SFT eval 1 s, RL 10 s, RL eval 0 s" in md


def test_demo_sections_are_overridable_after_quick():
    from aepo.demo.stages import demo_config

    quick = demo_config("grpo", 3, ["demo.n_demos=30", "eval.n=5"], quick=True)
    assert (quick.demo.n_demos, quick.demo.demo_worlds, quick.eval.n, quick.eval.limit) == (30, 2, 5, 16)
    assert (quick.trainer.seed, quick.sft.seed, quick.eval.seed, quick.trainer.total_steps) == (3, 3, 3, 2)
    full = demo_config()
    assert (full.demo.n_demos, full.eval.n, full.eval.limit, full.trainer.total_steps) == (10400, 4, 200, 30)


def test_demo_sft_data_comes_from_other_worlds(monkeypatch):
    """SFT never sees the demo world (seed S): its train and test entities are both new."""
    import aepo.demo.world as world_mod
    from aepo.demo.stages import DemoPlan, expert_demonstrations

    seeds, real = [], world_mod.build_world

    def spy(*args, **kwargs):
        seeds.append((kwargs["seed"], kwargs.get("name_seed")))
        return real(*args, **kwargs)

    monkeypatch.setattr(world_mod, "build_world", spy)
    demos = expert_demonstrations(DemoPlan(n_demos=30, demo_worlds=3), seed=5)
    assert len(demos) == 30 and len({s for s, _ in seeds}) == 3
    assert all(s != 5 and name_seed == 5 for s, name_seed in seeds)


def _pages_per_search(demos: list[dict]) -> list[int]:
    return [text.count("Page ") for d in demos for role, text in d["segments"]
            if role == "tool" and text.startswith("Page 1:")]


def test_demo_demonstrations_search_with_the_runs_tools_settings():
    """SFT sees search results rendered as RL and evaluation render them (`tools.search_topk`)."""
    from aepo.config import ToolsConfig
    from aepo.demo.stages import DemoPlan, expert_demonstrations

    plan = DemoPlan(n_demos=30, demo_worlds=3)
    two = _pages_per_search(expert_demonstrations(plan, seed=5, tools=ToolsConfig(search_topk=2)))
    three = _pages_per_search(expert_demonstrations(plan, seed=5, tools=ToolsConfig(search_topk=3)))
    assert two and max(two) == 2
    assert max(three) == 3


def test_demo_run_uses_its_config_for_the_demonstrations(demo_dir):
    from aepo.io import read_jsonl

    pages = _pages_per_search(read_jsonl(demo_dir / "sft_data.jsonl"))
    assert pages and max(pages) == 2  # demo.yaml: tools.search_topk 2


def test_demo_tokenizer_keeps_numbers_whole(demo_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "model_init")
    for number in ("1952", "37", "2031"):
        ids = tok.encode(number, add_special_tokens=False)
        assert len(ids) == 1, number
        # the same token in a sentence and on a calculator's result line
        assert tok.encode(f"born in {number}.", add_special_tokens=False)[-2] == ids[0]
        assert tok.encode(f"\n{number}\n", add_special_tokens=False)[1] == ids[0]


def test_demo_rerun_reuses_finished_stages_and_keeps_their_times(demo_dir):
    before = (demo_dir / "sft" / "model.safetensors").stat().st_mtime_ns
    first = json.loads((demo_dir / "summary.json").read_text())
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(demo_dir)])
    assert res.exit_code == 0, res.output
    assert (demo_dir / "sft" / "model.safetensors").stat().st_mtime_ns == before
    again = json.loads((demo_dir / "summary.json").read_text())
    assert again["cached"] == sorted(first["stage_seconds"])  # every stage reused ...
    assert again["stage_seconds"] == first["stage_seconds"]  # ... and shown with the time it took when made
    assert again["rl_accuracy"] == first["rl_accuracy"]
    assert f"SFT {first['stage_seconds']['SFT']:.0f} s cached" in (demo_dir / "summary.md").read_text()


@pytest.mark.parametrize("options", [["--algo", "grpo"], ["--seed", "1"], [], ["rollout.temperature=0.9"]])
def test_demo_never_reports_a_result_made_with_other_settings(demo_dir, options):
    """Over a finished quick aepo run: another algo, another seed, the full-size plan (no
    --quick) or another config value is refused before any work, naming what differs."""
    args = ["demo", "--out", str(demo_dir), *options] + (["--quick"] if options else [])
    summary = (demo_dir / "summary.json").read_bytes()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "made with other settings" in res.output and "--force" in res.output
    assert (demo_dir / "summary.json").read_bytes() == summary  # nothing was rewritten


def test_demo_force_redoes_only_what_the_change_touches(demo_dir, tmp_path):
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(demo_dir, out)
    sft_before = (out / "sft" / "model.safetensors").stat().st_mtime_ns
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--algo", "grpo", "--force"])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["algo"] == "grpo" and set(s["cached"]) == {"world", "demonstrations", "SFT", "SFT eval"}
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == sft_before
    assert "grpo" in (out / "rl" / "final" / "aepo_run.yaml").read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_demo_asking_for_cuda_without_cuda_is_one_line_before_any_work(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "d"), "model.device=cuda"])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "CUDA is not available" in res.output
    assert not (tmp_path / "d").exists()


def test_eval_of_a_demo_model_reproduces_the_demos_numbers(demo_dir, tmp_path):
    """`aepo eval` of the demo's models, with only the data, n and limit, gives the demo's own
    held-out numbers: the prompt, tools, sampling and reward come from the model directory."""
    for stage, model in (("sft", demo_dir / "sft"), ("rl", demo_dir / "rl" / "final")):
        out = tmp_path / stage
        # no --n / --limit: the model's own eval.n=2, eval.limit=16 (QUICK_DEMO)
        res = CliRunner().invoke(app, ["eval", str(model), "--data", str(demo_dir / "world" / "test.jsonl"),
                                       "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert "settings from" in res.output and "tools.search_topk=2" in res.output
        assert "eval.n=2 eval.limit=16" in res.output
        got = json.loads((out / "summary.json").read_text())["test"]
        want = json.loads((demo_dir / f"eval_{stage}.json").read_text())
        for key in ("pass@1", "pass@2", "f1", "tool_calls", "response_length"):
            assert got[key] == pytest.approx(want[key]), (stage, key)


def test_the_readme_sft_line_reproduces_the_demos_sft_model(demo_dir, tmp_path):
    """`aepo sft` with its defaults on the demo's own SFT set trains the demo's SFT model."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "sft"
    res = CliRunner().invoke(app, ["sft", "--model", str(demo_dir / "model_init"), "--data",
                                   str(demo_dir / "sft_examples.jsonl"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    mine, demo = load_file(out / "model.safetensors"), load_file(demo_dir / "sft" / "model.safetensors")
    assert mine.keys() == demo.keys()
    assert all(torch.equal(mine[k], demo[k]) for k in demo)


def test_eval_never_reuses_samples_of_another_model_or_other_settings(demo_dir, tmp_path):
    data = ["--data", str(demo_dir / "world" / "test.jsonl"), "--limit", "2", "--out", str(tmp_path / "e")]
    runner = CliRunner()
    first = runner.invoke(app, ["eval", str(demo_dir / "sft"), *data])
    assert first.exit_code == 0, first.output
    other_model = runner.invoke(app, ["eval", str(demo_dir / "rl" / "final"), *data])
    assert other_model.exit_code == 2 and "made with other settings" in other_model.output
    assert "model:" in other_model.output
    other_setting = runner.invoke(app, ["eval", str(demo_dir / "sft"), *data, "--temperature", "0.5"])
    assert other_setting.exit_code == 2 and "rollout.temperature" in other_setting.output
    # batching decides the sampling seeds, so it keys the samples too
    other_batching = runner.invoke(app, ["eval", str(demo_dir / "sft"), "eval.batch_prompts=8", *data])
    assert other_batching.exit_code == 2 and "eval.batch_prompts: 32 -> 8" in other_batching.output
    # the tool format decides the prompts, the parsing and the reward
    other_format = runner.invoke(app, ["eval", str(demo_dir / "sft"), *data, "--tool-format", "hermes"])
    assert other_format.exit_code == 2 and "rollout.tool_format" in other_format.output, other_format.output
    same = runner.invoke(app, ["eval", str(demo_dir / "sft"), *data])
    assert same.exit_code == 0, same.output  # the same model and settings: the samples are reused
    forced = runner.invoke(app, ["eval", str(demo_dir / "rl" / "final"), *data, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "Evaluation of " + str(demo_dir / "rl" / "final") in (tmp_path / "e" / "summary.md").read_text()


def test_compare_refuses_runs_made_with_other_settings(demo_dir, tmp_path):
    from aepo.io import StaleOutputError

    run_compare(["grpo"], 1, tmp_path, quick=True, base=demo_dir, progress=False)
    with pytest.raises(StaleOutputError, match="made with other settings"):
        run_compare(["grpo"], 1, tmp_path, quick=True, base=demo_dir, progress=False,
                    overrides=["trainer.lr=3e-4"])
    with pytest.raises(ValueError, match="is not a finished demo run"):
        run_compare(["grpo"], 1, tmp_path / "x", quick=True, base=tmp_path, progress=False)
    with pytest.raises(StaleOutputError, match="--from"):  # the full-size plan over a quick demo's SFT
        run_compare(["grpo"], 1, tmp_path / "y", quick=False, base=demo_dir, progress=False)


def test_compare_quick_from_demo(demo_dir, tmp_path):
    # two runs at once, each in its own process (--jobs 2)
    report = run_compare(["grpo", "aepo"], 1, tmp_path, quick=True, base=demo_dir, progress=False, jobs=2)
    assert (tmp_path / "runs" / "grpo_seed0.log").exists() and (tmp_path / "runs" / "aepo_seed0.log").exists()
    md = report.read_text()
    assert "| grpo | 1 |" in md and "| aepo | 1 |" in md
    assert (tmp_path / "compare_curves.png").exists()
    res = json.loads((tmp_path / "compare.json").read_text())
    assert set(res) == {"grpo", "aepo"} and "pass@1" in res["grpo"][0]
    with pytest.raises(ValueError, match="unknown algorithm"):
        run_compare(["nope"], 1, tmp_path, quick=True, base=demo_dir)


def test_compare_table_mean_and_spread():
    t = compare_table({"a": [{"pass@1": 0.5}, {"pass@1": 0.7}]}, k=4)
    assert "| a | 2 | 60 ± 14 |" in t


def test_a_search_source_on_the_command_line_replaces_the_models(demo_dir):
    """A demo model's world corpus is no fallback for a real benchmark's search cache."""
    from aepo.cli.main import _run_settings

    own, _ = _run_settings(demo_dir / "rl" / "final", [], None)
    assert own.tools.search_corpus == str((demo_dir / "world" / "corpus.jsonl").resolve())
    assert "search" in own.tools.enabled
    given, line = _run_settings(demo_dir / "rl" / "final", ["tools.search_cache=c.json"], None)
    assert (given.tools.search_cache, given.tools.search_corpus, given.tools.search_url) == ("c.json", "", "")
    assert "overridden: tools.search_cache=c.json tools.search_corpus= tools.search_url=" in line


def test_analyze_branching_on_the_quick_demo(demo_dir, tmp_path):
    out = tmp_path / "b.json"
    res = CliRunner().invoke(app, ["analyze", "branching", "--model", str(demo_dir / "rl" / "final"), "--data",
                                   str(demo_dir / "world" / "test.jsonl"), "--limit", "2", "--k", "4",
                                   "--continuations", "2", "--lambdas", "0.1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert set(rep["arms"]) == {"independent", "arpo", "aepo", "random", "oracle"}
    assert rep["prompts"] == 2 and rep["k"] == 4 and "auroc_dH_vs_uncertainty" in rep
    assert list(rep["penalty_at_fixed_m"]) == ["0.1"]
    bad = CliRunner().invoke(app, ["analyze", "branching", "--model", str(demo_dir / "rl" / "final"), "--data",
                                   str(demo_dir / "world" / "test.jsonl"), "--k", "1", "--out", str(out)])
    assert bad.exit_code == 2 and "--k must be >= 2" in bad.output
