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
from aepo.rollout.sampler.sync_check import SyncError
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


def test_a_stop_string_of_several_tokens_ends_the_segment_where_the_torch_sampler_ends_it(
        engine, torch_model, world):
    """The engine matches no stop strings (it detokenizes nothing); the batch matches them on
    the decoded tail, so a stop spanning two tokens ends both samplers' rows at the same token."""
    model, tok = torch_model
    ps = prompts(world, tok)
    vs = with_temperature(engine, 0.0).sampler(0)
    ts = TorchSampler(model, tok, temperature=0.0, seed=0, eos_token_ids=[])
    free = ts.generate([ts.new_row(p) for p in ps], 24)[0].token_ids
    text = tok.decode(free[5:7])
    assert len(tok.encode(text, add_special_tokens=False)) > 1  # a text stop, not a token stop
    gv = vs.generate([vs.new_row(p) for p in ps], 24, [text])
    gt = ts.generate([ts.new_row(p) for p in ps], 24, [text])
    assert gv[0].finish == "stop" and gv[0].stop == text and len(gv[0].token_ids) <= 7
    for a, b in zip(gv, gt):
        assert (a.token_ids, a.finish, a.stop) == (b.token_ids, b.finish, b.stop)


def test_length_finish_and_budget_zero(engine, torch_model, world):
    _, tok = torch_model
    s = with_temperature(engine, 1.0).sampler(3)
    rows = [s.new_row(p) for p in prompts(world, tok, 2)]
    a, b = s.generate(rows, [5, 0])
    assert a.finish == "length" and len(a.token_ids) == len(a.logprobs) == len(a.entropies) == 5
    assert b.finish == "length" and b.token_ids == []


def completion(finish_reason, stop_reason, tokens=(5, 6)):
    """A finished completion as the engine returns it, with flat top-k log-probs (per token the
    sampled token first, then the top 2: itself and token 9)."""
    ids = [x for t in tokens for x in (t, t, 9)]
    starts = list(range(0, len(ids), 3))
    flat = types.SimpleNamespace(token_ids=ids, logprobs=[-0.1, -0.1, -2.5] * len(tokens),
                                 start_indices=starts, end_indices=[a + 3 for a in starts])
    return types.SimpleNamespace(token_ids=list(tokens), logprobs=flat, finish_reason=finish_reason,
                                 stop_reason=stop_reason)


@pytest.mark.parametrize("finish_reason, stop_reason, finish, stop", [
    ("stop", None, "eos", None),  # EOS token
    ("stop", 7, "eos", None),  # a stop token id (the generation config's extra EOS ids)
    ("stop", "</search>", "stop", "</search>"),
    ("length", None, "length", None),
])
def test_finish_reasons_map_to_eos_stop_length(engine, finish_reason, stop_reason, finish, stop):
    s, c = VLLMSampler(engine, 0), completion(finish_reason, stop_reason)
    assert s._finish_reason(c) == (finish, stop)
    assert c.token_ids == [5, 6] and s._top_rows(c.token_ids, c.logprobs)[0] == [-0.1, -0.1]


def test_an_aborted_request_is_an_error(engine):
    with pytest.raises(RuntimeError, match="abort"):
        VLLMSampler(engine, 0)._finish_reason(completion("abort", None))


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


def varied_score(traj, golds, data_source=None, **kw):
    """Rewards that differ within a group, so every RL step updates the policy."""
    r = float(len(traj.text) % 3) / 2
    return {"reward": r, "acc": float(r > 0.5), "f1": r, "em": 0.0, "format_ok": True, "answer": ""}


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
    # branch_alpha 0.9: P = alpha + beta dH is about 0.9, so rows branch (at the default 0.4 a
    # seed can draw no branch at all)
    cfg = RolloutConfig(backend="vllm", strategy=strategy, n=6, temperature=1.0, max_response_tokens=96,
                        max_tool_calls=2, branch_decision="sample", branch_alpha=0.9)
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
    monkeypatch.setattr(rl_module, "score_trajectory", varied_score)
    overrides = ["algo=aepo", "rollout.backend=vllm", "rollout.n=4", "rollout.max_tool_calls=1",
                 "rollout.max_response_tokens=48", "rollout.temperature=1.0",
                 "trainer.total_steps=3", "trainer.prompts_per_step=4",
                 "trainer.ppo_mini_batch_size=16", "trainer.lr=3e-3",
                 "trainer.save_every=0", f"out_dir={tmp_path}"]
    tok = load_model(model_dir, device="cpu")[1]
    runner = build_tool_runner(load_config(None, overrides).tools, corpus_docs=world.corpus)
    diffs = {}
    try:
        for synced in (True, False):
            # the unsynced control switches off the per-step sync check, which would stop it
            # (test_an_unsynced_engine_stops_the_run checks that)
            cfg = load_config(None, overrides + ([] if synced else ["rollout.sync_tolerance=0"]))
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


def test_an_unsynced_engine_stops_the_run(model_dir, world, tmp_path, monkeypatch):
    """An engine left on the step-0 weights fails the per-step sync check after the first update."""
    monkeypatch.setattr(rl_module, "score_trajectory", varied_score)
    cfg = load_config(None, ["algo=aepo", "rollout.backend=vllm", "rollout.n=4", "rollout.max_tool_calls=1",
                             "rollout.max_response_tokens=32", "trainer.total_steps=2",
                             "trainer.prompts_per_step=4", "trainer.ppo_mini_batch_size=16", "trainer.lr=3e-2",
                             "trainer.save_every=0", f"out_dir={tmp_path}"])
    model, tok = load_model(model_dir, device="cpu")
    runner = build_tool_runner(cfg.tools, corpus_docs=world.corpus)
    trainer = RLTrainer(cfg, model, tok, world_tasks(world.train), runner.run, tmp_path / "run",
                        backend=build_backend(cfg.rollout, None, tok, model_dir))
    trainer.backend.sync = lambda m: None
    try:
        with pytest.raises(SyncError, match="vllm sampler engine is not serving the trained policy after step 1"):
            trainer.fit(progress=False)
    finally:
        trainer.backend.close()
        runner.close()


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


# ---------------------------------------------------------------- the running batch (EngineBatch)


def run_batch(sampler, starts, stop=(), max_steps=500):
    """Drive `sampler`'s running batch: `starts` maps a step index to [(row, budget, key)]
    started before that step -> {row: Generation} and the engine steps taken."""
    batch = sampler.open_batch(stop=stop)
    out, step = {}, 0
    while (batch.active or any(k >= step for k in starts)) and step < max_steps:
        for row, budget, key in starts.get(step, []):
            batch.start(row, budget, key)
        for row, gen in batch.step():
            out[row] = gen
        step += 1
    sampler.close_batch()
    return out, batch.steps


def test_rows_submitted_as_ready_sample_what_generate_samples(engine, torch_model, world):
    """Greedy: a row started at any step of the running batch generates the tokens, log-probs,
    entropies and finish of a `generate` call; its tokens land in the row as they arrive."""
    _, tok = torch_model
    ps = prompts(world, tok, 6)
    s = with_temperature(engine, 0.0).sampler(0)
    stop = stop_strings()
    ref = s.generate([s.new_row(p) for p in ps], 24, stop)
    rows = [s.new_row(p) for p in ps]
    starts = {0: [(rows[0], 24, (0, 0, 0)), (rows[1], 24, (0, 1, 0))], 3: [(rows[2], 24, (0, 2, 0))],
              5: [(rows[3], 24, (0, 3, 0)), (rows[4], 24, (0, 4, 0))], 9: [(rows[5], 24, (0, 5, 0))]}
    got, steps = run_batch(s, starts, stop)
    for r, p, want in zip(rows, ps, ref):
        g = got[r]
        assert (g.token_ids, g.finish, g.stop) == (want.token_ids, want.finish, want.stop)
        assert max(abs(a - b) for a, b in zip(g.logprobs, want.logprobs)) < 1e-5
        assert max(abs(a - b) for a, b in zip(g.entropies, want.entropies)) < 1e-5
        assert s.tokens(r) == list(p) + want.token_ids
    longest = max(len(g.token_ids) for g in ref)
    assert longest <= steps <= 9 + longest  # one token per engine step, rows overlapping


def test_a_rows_samples_do_not_depend_on_when_it_ran_or_beside_whom(engine, torch_model, world):
    """T = 1: a row's tokens are a function of (seed, its key, its length at start): the same
    whether the rows start together or staggered in another order, different under another key."""
    _, tok = torch_model
    ps = prompts(world, tok, 4)
    keys = [(0, i, 0) for i in range(4)]

    def sample(schedule, seed=3, keys=keys):
        s = with_temperature(engine, 1.0).sampler(seed)
        rows = [s.new_row(p) for p in ps]
        starts: dict[int, list] = {}
        for i, at in enumerate(schedule):
            starts.setdefault(at, []).append((rows[i], 16, keys[i]))
        got, _ = run_batch(s, starts)
        return [got[r].token_ids for r in rows]

    together = sample([0, 0, 0, 0])
    assert sample([7, 2, 0, 4]) == together
    assert sample([0, 0, 0, 0], keys=[(0, i, 1) for i in range(4)]) != together
    assert sample([0, 0, 0, 0], seed=4) != together


def test_releasing_a_running_row_aborts_its_request(engine, torch_model, world):
    _, tok = torch_model
    s = with_temperature(engine, 1.0).sampler(0)
    a, b = (s.new_row(p) for p in prompts(world, tok, 2))
    batch = s.open_batch()
    batch.start(a, 64, (0, 0, 0))
    batch.start(b, 64, (0, 1, 0))
    batch.step()
    s.release(a)
    assert batch.active == 1 and batch.free == 255
    ended = []
    while batch.active:
        ended += batch.step()
    assert [row for row, _ in ended] == [b]
    assert not engine.llm.llm_engine.has_unfinished_requests()
    s.close_batch()
    with pytest.raises(ValueError, match="already running"):
        batch = s.open_batch()
        batch.start(b, 4, (0, 1, 0))
        batch.start(b, 4, (0, 1, 0))
    s.close_batch()  # aborts b's request
    assert not engine.llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("strategy,speculate", [("arpo", False), ("aepo", False), ("aepo", True)])
def test_continuous_tree_rollouts_on_vllm_do_not_depend_on_the_batch_limit(engine, torch_model, world,
                                                                          strategy, speculate):
    """rollout.scheduler=continuous on the engine: valid trees with k rows, the same trees with
    at most 3 rows in the engine as with 64, in fewer engine steps than the turn scheduler's."""
    _, tok = torch_model
    ps = [(f"q{i}", p) for i, p in enumerate(prompts(world, tok, 4))]
    tools = FakeTools(lambda name, arg: "it was founded in tolmere.")

    def run(scheduler, max_rows):
        cfg = RolloutConfig(backend="vllm", strategy=strategy, n=6, temperature=1.0, max_response_tokens=96,
                            max_tool_calls=2, branch_decision="sample", branch_alpha=0.9,
                            scheduler=scheduler, max_active_rows=max_rows, speculate=speculate)
        engine.cfg = cfg
        trajs, stats = rollout(strategy, ps, engine.sampler(5), tok, tools, cfg, random.Random(0))
        assert not engine.llm.llm_engine.has_unfinished_requests()
        return trajs, stats

    wide, stats = run("continuous", 64)
    assert check_tree(wide, 6, len(ps)) > 0
    assert stats["scheduler"] == "continuous" and stats["rows_per_prompt"] == [6] * len(ps)
    narrow, narrow_stats = run("continuous", 3)
    assert narrow_stats["mean_active_rows"] <= 3
    as_rows = [(t.prompt_id, t.row_id, t.parent_row_id, t.response_ids) for t in wide]
    assert [(t.prompt_id, t.row_id, t.parent_row_id, t.response_ids) for t in narrow] == as_rows
    # the same decisions; their entropies only move by the float rounding of another batch
    for a, b in zip(narrow, wide):
        assert len(a.decisions) == len(b.decisions)
        for x, y in zip(a.decisions, b.decisions):
            assert {k: v for k, v in x.items() if not isinstance(v, float)} == \
                {k: v for k, v in y.items() if not isinstance(v, float)}
            assert all(abs(x[k] - y[k]) < 1e-4 for k in x if isinstance(x[k], float))
    turns, turn_stats = run("turns", 64)
    assert check_tree(turns, 6, len(ps)) > 0
    print(strategy, speculate, "engine steps: turns", turn_stats["decode_steps"], "continuous",
          stats["decode_steps"], "at most 3 rows", narrow_stats["decode_steps"])
    assert stats["decode_steps"] < turn_stats["decode_steps"]  # no turn barrier
