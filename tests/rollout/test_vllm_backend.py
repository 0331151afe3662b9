"""The vLLM backend (rollout.backend=vllm) against the torch sampler, on CPU.

Skipped where vLLM cannot be imported; set it up with `AEPO_EXTRAS=vllm python3 quickstart.py
test tests/rollout/test_vllm_backend.py` (docs/gpu.md, 'vLLM backend'). The engine runs in this process, as
in training; one engine serves the module's tests.
"""
from __future__ import annotations

import dataclasses
import json
import random
import types

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as e:  # noqa: BLE001 - missing, or broken by a mismatched torchvision
    pytest.skip(f"vLLM cannot be imported ({type(e).__name__}: {e})", allow_module_level=True)

from scripted_sampler import FakeTools
from transformers import AutoModelForCausalLM, Qwen3Config
from typer.testing import CliRunner

from aepo.cli import app
from aepo.config import load_config
from aepo.data.prompting import encode_prompt
from aepo.demo.stages import world_tasks
from aepo.demo.world import build_world
from aepo.models.loading import load_model
from aepo.models.tokenizer import build_tokenizer
from aepo.protocol import format_result, stop_strings
from aepo.rollout.config import RolloutConfig
from aepo.rollout.sampler import TorchSampler, build_backend
from aepo.rollout.sampler.vllm_sampler import VLLMSampler
from aepo.rollout.strategies import rollout
from aepo.tools import build_tool_runner
from aepo.train import rl as rl_module
from aepo.train.rl import RLTrainer
from aepo.train.sft import SFTConfig, encode_demonstration, sft_train

pytestmark = pytest.mark.vllm

SEGS = [("model", "<think> look it up. </think> <search> {q} </search>"),
        ("tool", "Page 1: it was founded in tolmere."),
        ("model", "<think> found it. </think> <answer> tolmere </answer>")]


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, world):
    """A micro Qwen3 over the demo world's vocabulary, taught by SFT to call search once and
    answer, so rollouts have tool results to branch at."""
    tok = build_tokenizer(world.vocabulary_texts())
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    qs = [r["question"] for r in world.test[:8]]
    ex = [encode_demonstration(q, [(role, text.format(q=" ".join(q.split()[-3:]))) for role, text in SEGS],
                               tok) for q in qs]
    sft_train(model, tok, ex * 4, SFTConfig(epochs=20, batch_size=8, lr=1e-2, warmup_steps=2), progress=False)
    d = tmp_path_factory.mktemp("vllm_model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return load_model(model_dir, device="cpu")


@pytest.fixture(scope="module")
def engine(model_dir, torch_model):
    _, tok = torch_model
    backend = build_backend(RolloutConfig(backend="vllm", temperature=0.0), None, tok, model_dir)
    yield backend
    backend.close()


def with_temperature(engine, temperature):
    engine.cfg = dataclasses.replace(engine.cfg, temperature=temperature)
    return engine


def prompts(world, tok, n=4):
    return [encode_prompt(r["question"], tok) for r in world.test[:n]]


def test_greedy_tokens_logprobs_and_entropies_agree_with_the_torch_sampler(engine, torch_model, world):
    model, tok = torch_model
    ps = prompts(world, tok)
    vs = with_temperature(engine, 0.0).sampler(0)
    ts = TorchSampler(model, tok, temperature=0.0, seed=0)
    for stop in ((), stop_strings()):
        vr, tr = [vs.new_row(p) for p in ps], [ts.new_row(p) for p in ps]
        gv, gt = vs.generate(vr, 24, stop), ts.generate(tr, 24, stop)
        exact, estimated = [], []
        for a, b, rv, rt in zip(gv, gt, vr, tr):
            assert a.token_ids == b.token_ids
            assert (a.finish, a.stop) == (b.finish, b.stop)
            assert vs.tokens(rv) == ts.tokens(rt)
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 0.05
            exact += b.entropies
            estimated += a.entropies
        err = sum(abs(x - y) for x, y in zip(estimated, exact)) / len(exact)
        assert err < 0.15 * max(sum(exact) / len(exact), 0.05), (err, sum(exact) / len(exact))
    assert any(g.finish == "stop" and g.stop in stop_strings() for g in gv)


def test_length_finish_and_budget_zero(engine, torch_model, world):
    _, tok = torch_model
    s = with_temperature(engine, 1.0).sampler(3)
    rows = [s.new_row(p) for p in prompts(world, tok, 2)]
    a, b = s.generate(rows, [5, 0])
    assert a.finish == "length" and len(a.token_ids) == len(a.logprobs) == len(a.entropies) == 5
    assert b.finish == "length" and b.token_ids == []


def completion(finish_reason, stop_reason, tokens=(5, 6)):
    lp = types.SimpleNamespace
    top = [{t: lp(logprob=-0.1), 9: lp(logprob=-2.5)} for t in tokens]
    out = types.SimpleNamespace(token_ids=list(tokens), logprobs=top, finish_reason=finish_reason,
                                stop_reason=stop_reason)
    return types.SimpleNamespace(outputs=[out])


@pytest.mark.parametrize("finish_reason, stop_reason, finish, stop", [
    ("stop", None, "eos", None),  # EOS token
    ("stop", 7, "eos", None),  # a stop token id (the generation config's extra EOS ids)
    ("stop", "</search>", "stop", "</search>"),
    ("length", None, "length", None),
])
def test_finish_reasons_map_to_eos_stop_length(engine, finish_reason, stop_reason, finish, stop):
    g = VLLMSampler(engine, 0)._generation(completion(finish_reason, stop_reason))
    assert (g.finish, g.stop) == (finish, stop)
    assert g.token_ids == [5, 6] and g.logprobs == [-0.1, -0.1]


def test_an_aborted_request_is_an_error(engine):
    with pytest.raises(RuntimeError, match="abort"):
        VLLMSampler(engine, 0)._generation(completion("abort", None))


def test_a_fork_hits_the_prefix_cache_and_a_sync_resets_it(engine, torch_model, world):
    model, tok = torch_model
    s = with_temperature(engine, 0.0).sampler(0)
    long_prompt = prompts(world, tok, 1)[0] * 3  # several 32-token blocks
    row = s.new_row(long_prompt)
    (first,) = s.generate([row], 8)
    engine.stats()
    child = s.fork(row, len(long_prompt) + 4)
    s.generate([child], 4)
    hit = engine.stats()
    assert hit["prefix_cache_hit_rate"] >= 0.6, hit
    engine.sync(model)  # the same weights: outputs unchanged, but no KV survives the sync
    again = s.new_row(long_prompt)
    (second,) = s.generate([again], 8)
    assert engine.stats()["prefix_cache_tokens"] == 0
    assert second.token_ids == first.token_ids


def test_a_weight_sync_changes_the_outputs_and_syncing_back_restores_them(engine, torch_model, world,
                                                                          model_dir):
    model, tok = torch_model
    ps = prompts(world, tok)
    s = with_temperature(engine, 0.0).sampler(0)

    def greedy():
        return [g.token_ids for g in s.generate([s.new_row(p) for p in ps], 16)]

    before = greedy()
    other, _ = load_model(model_dir, device="cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    engine.sync(other)
    changed = greedy()
    ts = TorchSampler(other, tok, temperature=0.0, seed=0)
    assert changed != before
    assert changed == [g.token_ids for g in ts.generate([ts.new_row(p) for p in ps], 16)]
    engine.sync(model)
    assert greedy() == before


def test_seeded_sampling_is_reproducible(engine, torch_model, world):
    _, tok = torch_model
    ps = prompts(world, tok)
    with_temperature(engine, 1.0)

    def sample(seed):
        s = engine.sampler(seed)
        return [g.token_ids for g in s.generate([s.new_row(p) for p in ps], 16)]

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_a_batch_over_the_token_budget_samples_with_seeds(engine, torch_model, world):
    """More prompt tokens than one engine step takes: on a CPU build a chunked prefill of a
    seeded request fails (its generator cannot rewind; checked to fail with chunked prefill
    on), so whole prompts are scheduled."""
    _, tok = torch_model
    s = with_temperature(engine, 1.0).sampler(9)
    many = prompts(world, tok, 200) * 4  # an eval batch: 800 rows, about 16,000 prompt tokens
    assert sum(map(len, many)) > 8192
    gens = s.generate([s.new_row(p) for p in many], 4)
    assert all(len(g.token_ids) == 4 for g in gens)


def check_tree(trajs, n, n_prompts):
    assert len(trajs) == n * n_prompts
    by_prompt: dict[str, list] = {}
    for t in trajs:
        by_prompt.setdefault(t.prompt_id, []).append(t)
    assert len(by_prompt) == n_prompts
    branched = 0
    for group in by_prompt.values():
        assert sorted(t.row_id for t in group) == list(range(n))
        rows = {t.row_id: t for t in group}
        for t in group:
            assert len(t.response_ids) == len(t.response_mask) == len(t.logprobs) == len(t.entropies)
            for seg in t.segments:
                assert set(t.response_mask[seg.start:seg.end]) <= ({1} if seg.role == "model" else {0})
            if t.parent_row_id is None:
                continue
            branched += 1
            parent, bp = rows[t.parent_row_id], t.branch_position
            assert any(s.role == "tool" and s.end == bp for s in parent.segments)
            assert t.response_ids[:bp] == parent.response_ids[:bp]
            assert t.logprobs[:bp] == parent.logprobs[:bp]
    return branched


@pytest.mark.parametrize("strategy", ["arpo", "aepo"])
def test_tree_rollouts_on_vllm_have_k_rows_and_valid_trees(engine, torch_model, world, strategy):
    _, tok = torch_model
    ps = [(f"q{i}", p) for i, p in enumerate(prompts(world, tok, 6))]
    cfg = RolloutConfig(backend="vllm", strategy=strategy, n=6, temperature=1.0, max_response_tokens=96,
                        max_tool_calls=2, branch_decision="sample")
    engine.cfg = cfg
    tools = FakeTools(lambda name, arg: "it was founded in tolmere.")
    trajs, stats = rollout(strategy, ps, engine.sampler(5), tok, tools, cfg, random.Random(0))
    assert check_tree(trajs, 6, len(ps)) > 0  # the SFT'd model calls search, so rows branch
    assert any(t.n_tool_calls > 0 for t in trajs)
    assert stats["rows_per_prompt"] == [6] * len(ps)
    # continued rows and forks re-use the full KV blocks (32 tokens) of what they re-submit; most
    # forks here are at 30-60 tokens, so the rate is low (0.05-0.2) but never 0
    assert engine.stats()["prefix_cache_hit_rate"] > 0


def test_rollout_command_with_the_vllm_backend(model_dir, world, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                            for r in world.test[:3]))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": d["title"], "text": d["text"]}) + "\n"
                              for i, d in enumerate(world.corpus[:50])))
    out = tmp_path / "rows.jsonl"
    args = ["rollout", "--model", str(model_dir), "--data", str(data), "--strategy", "aepo", "--k", "4",
            "--max-response-tokens", "64", "--search-corpus", str(corpus), "--backend", "vllm",
            "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 12
    for pid in {r["prompt_id"] for r in rows}:
        group = {r["row_id"]: r for r in rows if r["prompt_id"] == pid}
        assert sorted(group) == [0, 1, 2, 3]
        for r in group.values():
            assert isinstance(r["m"], int) and isinstance(r["decisions"], list)
            if r["parent_row_id"] is not None:
                assert r["parent_row_id"] < r["row_id"] and 0 < r["branch_position"] <= r["n_tokens"]
    stats = json.loads((tmp_path / "rows.stats.json").read_text())
    assert 0.0 <= stats["prefix_cache_hit_rate"] <= 1.0


def test_train_with_the_vllm_backend_syncs_weights_every_step(model_dir, world, tmp_path, monkeypatch):
    """A short RL run on the demo world: pi_old is re-scored by the trainer, the engine is
    re-synced after each update (so the sampler's log-probs stay those of the current policy),
    and the prefix-cache hit rate is logged."""
    def varied_score(traj, golds, data_source=None, **kw):  # rewards that differ, so updates happen
        r = float(len(traj.text) % 3) / 2
        return {"reward": r, "acc": float(r > 0.5), "f1": r, "em": 0.0, "format_ok": True, "answer": ""}

    monkeypatch.setattr(rl_module, "score_trajectory", varied_score)
    cfg = load_config(None, ["algo=aepo", "rollout.backend=vllm", "rollout.n=4", "rollout.max_tool_calls=1",
                             "rollout.max_response_tokens=48", "rollout.temperature=1.0",
                             "trainer.total_steps=3", "trainer.prompts_per_step=4",
                             "trainer.ppo_mini_batch_size=16", "trainer.lr=3e-3",
                             "trainer.save_every=0", f"out_dir={tmp_path}"])
    tok = load_model(model_dir, device="cpu")[1]
    runner = build_tool_runner(cfg.tools, corpus_docs=world.corpus)
    diffs = {}
    try:
        for synced in (True, False):
            trainer = RLTrainer(cfg, load_model(model_dir, device="cpu")[0], tok, world_tasks(world.train),
                                runner.run, tmp_path / f"run_{synced}",
                                backend=build_backend(cfg.rollout, None, tok, model_dir))
            if not synced:
                trainer.backend.sync = lambda m: None  # the engine keeps the step-0 weights
            hist = trainer.fit(progress=False)
            trainer.backend.close()
            assert len(hist) == 3 and not any(h.get("actor/skipped_update") for h in hist)
            assert trainer.recompute_old_log_prob
            for h in hist:
                assert 0.0 <= h["rollout/prefix_cache_hit_rate"] <= 1.0
            diffs[synced] = hist[-1]["actor/rollout_logprob_diff"]
    finally:
        runner.close()
    assert diffs[True] < 0.02, diffs
    assert diffs[False] > 2 * diffs[True], diffs


def test_a_missing_vllm_is_reported_with_what_to_do(monkeypatch, torch_model, model_dir):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kw):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(RuntimeError, match="AEPO_EXTRAS=vllm"):
        build_backend(RolloutConfig(backend="vllm"), None, torch_model[1], model_dir)


def test_format_result_tokens_reach_the_engine_unchanged(engine, torch_model):
    """Appended tool tokens are submitted as ids, never re-tokenized from text."""
    _, tok = torch_model
    s = with_temperature(engine, 0.0).sampler(0)
    ids = tok.encode("question: who founded it?", add_special_tokens=False)
    row = s.new_row(ids)
    result = tok.encode(format_result("Page 1: tolmere"), add_special_tokens=False)
    s.append(row, result)
    (g,) = s.generate([row], 3)
    assert s.tokens(row) == ids + result + g.token_ids
