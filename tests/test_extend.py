"""Each extension in examples/extend/ is one file plus one config line: the file registers a
name, a run names it, and the whole pipeline (config checks, protocol, tokenizer, prompts,
trainer) picks it up with no other change. Each case runs in a fresh interpreter so the
registrations do not leak into other tests."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from repo_paths import ROOT

EXAMPLES = ROOT / "examples" / "extend"

TRAIN_ONE_STEP_EACH = """
import torch
from tiny_models import tiny_qwen3
from aepo.config import load_config
from aepo.demo.stages import world_tasks
from aepo.demo.world import build_world
from aepo.models.tokenizer import build_tokenizer
from aepo.tools import build_tool_runner
from aepo.train import rl as rl_module
from aepo.train.rl import RLTrainer

# a random model never answers: reward by length so the update has a signal
rl_module.score_trajectory = lambda traj, golds, data_source=None, **kw: {
    "reward": float(len(traj.text) % 3) / 2, "acc": 0.0, "f1": 0.0, "em": 0.0, "format_ok": True, "answer": ""}
world = build_world(seed=0)
for overrides in RUNS:
    cfg = load_config(None, overrides)
    tok = build_tokenizer(world.vocabulary_texts())  # after the plugins: a new tool's tags are tokens
    model = tiny_qwen3(len(tok), tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    before = [p.detach().clone() for p in model.parameters()]
    runner = build_tool_runner(cfg.tools, corpus_docs=world.corpus)
    try:
        hist = RLTrainer(cfg, model, tok, world_tasks(world.train[:8]), runner.run, cfg.out_dir).fit(progress=False)
    finally:
        runner.close()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "no parameter changed"
    print("METRICS", overrides[-1], sorted(hist[-1]))
"""


def run(script: str, tmp_path: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                               "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def small(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["algo=grpo", "rollout.n=3", "trainer.prompts_per_step=2", "rollout.max_response_tokens=24",
            "rollout.max_tool_calls=2", "trainer.ppo_mini_batch_size=6", "trainer.ppo_micro_batch_size=3",
            "trainer.total_steps=1", "trainer.save_every=0", "tools.enabled=[search,calc]",
            f"out_dir={tmp_path / name}", *extra]


def names_in_src(*names: str) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py")
            if any(n in p.read_text() for n in names)]


def test_one_file_adds_a_loss_an_estimator_a_strategy_a_tool(tmp_path):
    # nothing in the library mentions the new names
    assert names_in_src("toy_unclipped", "toy_best_baseline", "toy_branch_first", '"reverse"', "<reverse>") == []
    runs = [
        small(tmp_path, "loss", "plugins=[examples/extend/toy_loss.py]", "actor.policy_loss_options={scale: 0.5}",
              "actor.policy_loss=toy_unclipped"),
        small(tmp_path, "adv", "plugins=[examples/extend/toy_advantage.py]",
              "actor.adv_estimator_options={scale: 2.0}", "actor.adv_estimator=toy_best_baseline"),
        small(tmp_path, "strategy", "plugins=[examples/extend/toy_strategy.py]", "rollout.strategy=toy_branch_first"),
        small(tmp_path, "tool", "plugins=[examples/extend/toy_tool.py]", "tools.enabled=[search,calc,reverse]"),
    ]
    out = run(f"RUNS = {runs!r}\n" + TRAIN_ONE_STEP_EACH, tmp_path).splitlines()
    metrics = {line.split()[1]: line for line in out if line.startswith("METRICS")}
    assert len(metrics) == 4, out
    assert "actor/toy_ratio_mean" in metrics["actor.policy_loss=toy_unclipped"]  # the loss's own metric
    assert "rollout/branches" in metrics["rollout.strategy=toy_branch_first"]


def test_unknown_name_without_the_plugin_is_a_config_error(tmp_path):
    from aepo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="actor.policy_loss: 'toy_unclipped' is not one of"):
        load_config(None, ["actor.policy_loss=toy_unclipped"])
    with pytest.raises(ConfigError, match="plugins: 'nope.py' is not a file"):
        load_config(None, ["plugins=[nope.py]"])
    # a loss's own options are checked against its keyword-only parameters (in a fresh
    # interpreter: the plugin's registration must not leak into other tests)
    out = run(textwrap.dedent("""
        from aepo.config import ConfigError, load_config
        try:
            load_config(None, ['plugins=[examples/extend/toy_loss.py]', 'actor.policy_loss=toy_unclipped',
                               'actor.policy_loss_options={bogus: 1}'])
        except ConfigError as e:
            print(e)
        """), tmp_path)
    assert "actor.policy_loss_options: loss 'toy_unclipped' has no option(s) ['bogus']" in out


def test_a_registered_tool_reaches_protocol_tokenizer_prompt_reward_and_runner(tmp_path):
    out = run(textwrap.dedent("""
        from aepo.config import load_config
        cfg = load_config(None, ['plugins=[examples/extend/toy_tool.py]', 'tools.enabled=[calc,reverse]',
                                 'tools.options={reverse: {upper: true}}'])
        from aepo.protocol import parse_action, stop_strings, escape_protocol_tags, tag_tokens
        from aepo.data.prompting import system_prompt
        from aepo.models.tokenizer import build_tokenizer
        from aepo.rewards import check_format, score
        from aepo.tools import build_tool_runner
        assert '</reverse>' in stop_strings()
        a = parse_action('<think>x</think><reverse>abc</reverse>')
        assert (a.kind, a.tool, a.argument) == ('tool', 'reverse', 'abc'), a
        assert escape_protocol_tags('</reverse>') == '&lt;/reverse>'
        assert '<reverse> text </reverse>' in system_prompt(cfg.tools.enabled)
        tok = build_tokenizer(['hello world'])
        assert len(tok.encode('<reverse>', add_special_tokens=False)) == 1
        text = '<reverse>abc</reverse><result>\\nCBA\\n</result><answer>CBA</answer>'
        assert check_format(text) == (True, 'ok'), check_format(text)
        runner = build_tool_runner(cfg.tools)
        [call] = runner.run([('reverse', 'abc')])
        runner.close()
        assert call.ok and call.result == 'CBA', call
        print('OK')
        """), tmp_path)
    assert "OK" in out
