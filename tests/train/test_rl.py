"""The RL trainer end to end on a micro model: every preset trains, kill + resume is exact."""
from __future__ import annotations

import json
import logging
import math
import socket

import pytest
import torch
from tiny_models import tiny_qwen3
from transformers import AutoModelForCausalLM

from aepo.algos.presets import preset_names
from aepo.config import load_config
from aepo.demo.stages import world_tasks
from aepo.demo.world import build_world
from aepo.models.tokenizer import build_tokenizer
from aepo.protocol import parse_action
from aepo.rollout.agent import RowState, fork_row_state
from aepo.tools.calc import Calculator
from aepo.tools.runner import ToolRunner
from aepo.tools.search import BM25Backend, HttpBackend, SearchTool
from aepo.train import batch as batch_module
from aepo.train import rl as rl_module
from aepo.train.batch import collate, length_chunks, token_logprobs_and_entropy
from aepo.train.checkpoint import STATE_FILE, CheckpointError, latest_checkpoint
from aepo.rollout.metrics import own_tool_calls, rollout_metrics, tool_metrics
from aepo.train.rl import RLTrainer
from aepo.types import SegmentRecord, ToolCall, Trajectory


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


@pytest.fixture(scope="module")
def tok(world):
    return build_tokenizer(world.vocabulary_texts())


def micro_model(tok, seed=0):
    return tiny_qwen3(len(tok), seed=seed, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id).eval()


@pytest.fixture
def runner(world):
    r = ToolRunner([SearchTool([BM25Backend(world.corpus)]), Calculator()], timeout=5)
    yield r
    r.close()


@pytest.fixture
def varied_reward(monkeypatch):
    """A random-init model never writes a valid answer, so every reward would be -1 and every
    advantage 0. Score by response length instead, so updates really happen."""
    def fake_score(traj, golds, data_source=None, **kw):
        r = float(len(traj.text) % 3) / 2
        return {"reward": r, "acc": float(r > 0.5), "f1": r, "em": 0.0, "format_ok": True, "answer": ""}

    monkeypatch.setattr(rl_module, "score_trajectory", fake_score)


def small_cfg(algo, out_dir, **extra):
    ov = [f"algo={algo}", "rollout.n=3", "rollout.max_response_tokens=20", "rollout.max_tool_calls=2",
          "rollout.n_probe=4", "trainer.prompts_per_step=2", "trainer.ppo_mini_batch_size=4",
          "trainer.ppo_micro_batch_size=2", "trainer.total_steps=2", "trainer.save_every=0",
          "trainer.lr=1e-3", f"out_dir={out_dir}"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, ov)


@pytest.mark.parametrize("algo", preset_names())
def test_every_preset_trains(algo, tok, world, runner, varied_reward, tmp_path):
    torch.manual_seed(0)
    model = micro_model(tok)
    before = [p.detach().clone() for p in model.parameters()]
    extra = {"grpo": {"actor.kl_coef": 0.01}, "dapo": {"actor.overlong_buffer": 5}}.get(algo, {})
    cfg = small_cfg(algo, tmp_path, **extra)
    hist = RLTrainer(cfg, model, tok, world_tasks(world.train[:20]), runner.run, tmp_path).fit(progress=False)
    assert len(hist) == 2
    for row in hist:
        assert row["rollout/rows"] == 2 * 3 or algo == "dapo"  # exactly n rows per prompt
        assert {k.split("/")[0] for k in row if "/" in k} <= {"reward", "rollout", "tools", "audit", "actor", "timing"}
        # every row of every step passes the token-level audit (aepo.rollout.audit)
        assert {k: v for k, v in row.items() if k.startswith("audit/")} == {
            f"audit/{c}": 0.0 for c in ("ids_text", "loss_mask", "reward_input", "finish", "tool_results")}
        for k in ("reward/mean", "rollout/entropy", "actor/pg_loss", "actor/grad_norm", "actor/clipfrac_upper",
                  "actor/ppo_kl", "timing/step"):
            if "actor/skipped_update" not in row:
                assert math.isfinite(row[k]), (algo, k, row[k])
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed, f"{algo}: no parameter changed"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    if algo in ("arpo", "aepo"):
        assert "rollout/branches" in hist[0]
    if algo == "aepo":
        assert "rollout/m_mean" in hist[0]
    if algo == "grpo":
        assert "actor/kl_ref" in hist[0]
    if algo == "epo":
        assert any(k.startswith("actor/epo") for k in hist[-1])


def test_kill_and_resume_matches_uninterrupted(tok, world, runner, varied_reward, tmp_path):
    tasks = world_tasks(world.train[:20])
    cfg_a = small_cfg("aepo", tmp_path / "a", **{"trainer.total_steps": 4, "trainer.save_every": 2})
    model_a = micro_model(tok, seed=1)
    RLTrainer(cfg_a, model_a, tok, tasks, runner.run, tmp_path / "a").fit(progress=False)

    cfg_b = small_cfg("aepo", tmp_path / "b", **{"trainer.total_steps": 4, "trainer.save_every": 2})

    class Killed(Exception):
        pass

    def kill_after_3(step, metrics):
        if step == 3:
            raise Killed

    model_b = micro_model(tok, seed=1)
    with pytest.raises(Killed):
        RLTrainer(cfg_b, model_b, tok, tasks, runner.run, tmp_path / "b").fit(progress=False, on_step=kill_after_3)
    root = tmp_path / "b" / "checkpoints"
    assert latest_checkpoint(root).name == "step_2"
    # what a kill during a later save or prune leaves: a temp dir, a newer step dir without
    # trainer state (half pruned) and a renamed-for-pruning one; resume must not pick any of them
    (root / ".step_4.k1ll3d.tmp").mkdir()
    (root / "step_4").mkdir()
    (root / "step_4" / "model.safetensors").write_bytes(b"half")
    (root / ".step_1.pruning").mkdir()
    (root / "notes.txt").write_text("a user's file")
    # a fresh process: new model object from the same initial weights, resume from step 2
    model_c = micro_model(tok, seed=1)
    RLTrainer(cfg_b, model_c, tok, tasks, runner.run, tmp_path / "b").fit(progress=False, resume=True)
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step_2", "step_4"]
    assert (root / "step_4" / STATE_FILE).exists()  # the resumed run's own step 4
    for (name, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.allclose(pa, pc, atol=1e-6, rtol=0), name
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["reward/mean"] == rb["reward/mean"]
        assert ra["rollout/response_length"] == rb["rollout/response_length"]
        assert ra["actor/pg_loss"] == pytest.approx(rb["actor/pg_loss"], abs=1e-6)


def test_epo_per_turn_history_is_kept_by_fit_and_restored_by_resume(tok, world, runner, varied_reward, tmp_path):
    """EPO keeps a running entropy history per turn index next to the global one; the
    checkpoint fit() writes carries it and resume() restores it exactly."""
    tasks = world_tasks(world.train[:20])
    over = {"trainer.total_steps": 2, "trainer.save_every": 2}
    trainer = RLTrainer(small_cfg("epo", tmp_path, **over), micro_model(tok, seed=3), tok, tasks, runner.run,
                        tmp_path)
    trainer.fit(progress=False)
    hist = trainer.entropy_history
    assert hist.value() is not None and 0 in hist.turns()  # every row has a turn 0
    fresh = RLTrainer(small_cfg("epo", tmp_path, **over), micro_model(tok, seed=3), tok, tasks, runner.run,
                      tmp_path)
    assert fresh.resume() == 2
    assert fresh.entropy_history.state_dict() == hist.state_dict()
    for turn in [None, *hist.turns()]:
        assert fresh.entropy_history.value(turn) == hist.value(turn)


def test_corrupted_checkpoint_is_named(tok, world, runner, varied_reward, tmp_path):
    cfg = small_cfg("grpo", tmp_path, **{"trainer.total_steps": 1, "trainer.save_every": 1})
    RLTrainer(cfg, micro_model(tok), tok, world_tasks(world.train[:10]), runner.run, tmp_path).fit(progress=False)
    ck = latest_checkpoint(tmp_path / "checkpoints")
    state = (ck / STATE_FILE).read_bytes()
    (ck / STATE_FILE).write_bytes(b"not a checkpoint")
    trainer = RLTrainer(cfg, micro_model(tok), tok, world_tasks(world.train[:10]), runner.run, tmp_path)
    with pytest.raises(CheckpointError, match=f"corrupted.*delete {ck}"):
        trainer.fit(progress=False, resume=True)
    # truncated weights are named the same way, not a safetensors traceback
    (ck / STATE_FILE).write_bytes(state)
    weights = next(ck.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    trainer = RLTrainer(cfg, micro_model(tok), tok, world_tasks(world.train[:10]), runner.run, tmp_path)
    with pytest.raises(CheckpointError, match=f"{weights.name} is corrupted"):
        trainer.fit(progress=False, resume=True)


def test_collate_aligns_masks_with_next_token_logprobs(tok):
    from aepo.types import Trajectory

    model = micro_model(tok)
    t = Trajectory(prompt_id="p", row_id=0, prompt_ids=[5, 6, 7], response_ids=[8, 9, 10, 11],
                   response_mask=[1, 1, 0, 1], logprobs=[-1.0, -2.0, 0.0, -3.0], entropies=[0.5, 0.6, 0.0, 0.7])
    short = Trajectory(prompt_id="q", row_id=0, prompt_ids=[5], response_ids=[8], response_mask=[1],
                       logprobs=[-4.0], entropies=[0.1])
    b = collate([t, short], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11], [5, 8, 0, 0, 0, 0, 0]]
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0]]
    assert b.old_log_prob[0].tolist() == [0, 0, -1, -2, 0, -3]
    logp, ent = token_logprobs_and_entropy(model, b.input_ids, b.attention_mask)
    full = torch.log_softmax(model(input_ids=b.input_ids[:1]).logits[0].float(), -1)
    # column j scores token j+1
    assert logp[0, 2].item() == pytest.approx(full[2, 8].item(), abs=1e-5)
    assert logp[0, 5].item() == pytest.approx(full[5, 11].item(), abs=1e-5)
    with pytest.raises(ValueError, match="same length"):
        collate([Trajectory("p", 0, [1], [2, 3], [1], [0.0], [0.0])], pad_id=0)


def test_recompute_old_log_prob_scores_with_the_trainers_model(tok, world, runner, varied_reward, tmp_path):
    """With `actor.recompute_old_log_prob`, the update's pi_old is the trainer's model on the
    rollout tokens (verl's old_log_prob), not the sampler's numbers; a sampler that differs
    from the trainer shows up in `rollout_logprob_diff`."""
    model = micro_model(tok, seed=2)
    cfg = small_cfg("grpo", tmp_path, **{"actor.recompute_old_log_prob": True})
    trainer = RLTrainer(cfg, model, tok, world_tasks(world.train[:20]), runner.run, tmp_path)
    trajs, _, _ = trainer.collect(1)
    sampled = collate(trajs, trainer.pad_id).old_log_prob

    # same weights as the sampler: the recomputed pi_old agrees with the sampler's log-probs
    stats: dict = {}
    same = trainer.make_batch(trajs, stats)
    assert torch.allclose(same.old_log_prob, sampled, atol=1e-4)
    assert stats["actor/rollout_logprob_diff"] < 1e-4

    # the trainer's weights move after sampling (as with a stale or bf16 sampler)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    moved = trainer.make_batch(trajs, stats)
    mask = moved.loss_mask.bool()
    full = torch.log_softmax(model(input_ids=moved.input_ids).logits.float(), -1)[:, :-1]
    expect = full.gather(-1, moved.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(moved.old_log_prob[mask], expect[mask], atol=1e-5)
    assert (moved.old_log_prob[~mask] == 0).all()
    assert stats["actor/rollout_logprob_diff"] > 1e-3
    assert not torch.allclose(moved.old_log_prob[mask], sampled[mask], atol=1e-3)


def test_missing_model_dir_and_bad_dataset_row(tmp_path):
    from aepo.data.datasets import load_dataset
    from aepo.models.loading import load_model

    with pytest.raises((FileNotFoundError, ValueError), match="nope"):
        load_model(tmp_path / "nope")
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "a?", "answer": "b"}\n{"answer": "c"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2"):
        load_dataset(f)


@pytest.mark.parametrize("arch", ["qwen3", "llama", "fallback"])
def test_masked_head_matches_full_logits_values_and_gradients(tok, arch):
    """The head runs only at scored positions, and right-padded rows need no attention mask:
    log-probs, entropies and gradients equal the plain full-logits computation."""
    from transformers import LlamaConfig

    from aepo.train.batch import PLAIN_HEAD_MODEL_TYPES

    if arch == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model = AutoModelForCausalLM.from_config(cfg)
        assert model.config.model_type in PLAIN_HEAD_MODEL_TYPES
    else:
        model = micro_model(tok, seed=1)
        if arch == "fallback":
            model.config.model_type = "not-a-plain-head"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (3, 9), generator=gen)
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0  # right padding
    attn[2, 4:] = 0
    ids[attn == 0] = tok.pad_token_id
    mask = (torch.rand(3, 8, generator=gen) < 0.6).float() * attn[:, 1:]
    temp = 0.7

    logp, ent = token_logprobs_and_entropy(model, ids, None, temp, mask=mask)
    (logp * mask).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    full = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temp, -1)
    ref_logp = full.gather(-1, ids[:, 1:, None])[..., 0]
    ref_ent = -(full.exp() * full).sum(-1)
    (ref_logp * mask).sum().backward()
    sel = mask.bool()
    assert torch.allclose(logp[sel], ref_logp[sel], atol=1e-5)
    assert torch.allclose(ent[sel], ref_ent[sel], atol=1e-5)
    assert (logp[~sel] == 0).all() and (ent[~sel] == 0).all()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_length_chunks_hand_cases_and_brute_force():
    assert length_chunks([10, 10, 10], overhead=5) == [[0, 1, 2]]
    # one group: 2 x 100 + 10 = 210 padded tokens; two: 1 + 10 + 100 + 10 = 121
    assert length_chunks([100, 1], overhead=10) == [[1], [0]]
    assert length_chunks([100, 1], overhead=200) == [[1, 0]]
    assert length_chunks([0, 5, 0], overhead=0) == [[1]]  # rows with nothing to score are left out
    assert length_chunks([]) == []

    def cost(groups, lengths, overhead):
        return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)

    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 8, (1,), generator=rng))
        lengths = torch.randint(1, 60, (n,), generator=rng).tolist()
        overhead = int(torch.randint(0, 80, (1,), generator=rng))
        order = sorted(range(n), key=lambda i: lengths[i])
        best = math.inf
        for cuts in range(2 ** (n - 1)):  # every split of the sorted order into runs
            groups, cur = [], [order[0]]
            for j in range(1, n):
                if cuts >> (j - 1) & 1:
                    groups.append(cur)
                    cur = []
                cur.append(order[j])
            best = min(best, cost(groups + [cur], lengths, overhead))
        got = length_chunks(lengths, overhead)
        assert sorted(i for g in got for i in g) == list(range(n))
        assert cost(got, lengths, overhead) == best


def test_length_grouped_forward_equals_one_padded_pass(tok, monkeypatch):
    """Rows cut after their last scored token and run in length groups give the values and
    gradients of one padded pass (overhead 0 forces a group per distinct length)."""
    model = micro_model(tok, seed=2)
    gen = torch.Generator().manual_seed(1)
    lengths = [12, 5, 9, 12, 3]
    ids = torch.full((5, 12), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, len(tok), (n,), generator=gen)
        attn[i, :n] = 1
    mask = (torch.rand(5, 11, generator=gen) < 0.7).float() * attn[:, 1:]
    mask[0, 6:] = 0  # row 0 stops being scored early: its tail is never run
    mask[4] = 0  # nothing to score in row 4
    monkeypatch.setattr(batch_module, "CHUNK_OVERHEAD_TOKENS", 0)
    assert len(length_chunks([5, 4, 9, 12, 0])) == 4

    logp, ent = token_logprobs_and_entropy(model, ids, None, 0.9, mask=mask)
    ((logp - 0.3 * ent) * mask).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_logp, ref_ent = batch_module._scored(model, ids, None, mask.bool(), 0.9, True)
    ((ref_logp - 0.3 * ref_ent) * mask).sum().backward()
    assert torch.allclose(logp, ref_logp, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-6)
    assert (logp[mask == 0] == 0).all() and (ent[mask == 0] == 0).all()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_chunked_vocab_head_path_equals_direct_path(tok, monkeypatch):
    """Above vocab_head.CHUNK_ELEMENTS logits the head runs in row chunks (aepo.train.vocab_head):
    the same log-probs, entropies and gradients as the direct path."""
    from aepo.train import vocab_head

    model = micro_model(tok, seed=4)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(5, len(tok), (3, 10), generator=gen)
    mask = (torch.rand(3, 9, generator=gen) < 0.8).float()
    results = []
    real = vocab_head.head_logprobs_and_entropy
    for limit in (10**12, 3 * len(tok)):  # direct, then chunked (three rows of logits per chunk)
        monkeypatch.setattr(vocab_head, "CHUNK_ELEMENTS", limit)
        calls = []
        monkeypatch.setattr(vocab_head, "head_logprobs_and_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
        model.zero_grad()
        logp, ent = token_logprobs_and_entropy(model, ids, None, 0.8, mask=mask)
        ((logp + 0.5 * ent) * mask).sum().backward()
        results.append((logp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()], len(calls)))
    (lp0, h0, g0, n0), (lp1, h1, g1, n1) = results
    assert n0 == 0 and n1 > 0
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(h0, h1, atol=1e-5)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-5)


def test_fit_clears_checkpoint_leftovers_on_start(tok, world, runner, varied_reward, tmp_path, caplog):
    root = tmp_path / "checkpoints"
    (root / ".step_3.abc.tmp").mkdir(parents=True)
    (root / "step_3").mkdir()  # no trainer state
    (root / "keep_me").mkdir()
    cfg = small_cfg("grpo", tmp_path, **{"trainer.total_steps": 1, "trainer.save_every": 1})
    trainer = RLTrainer(cfg, micro_model(tok), tok, world_tasks(world.train[:10]), runner.run, tmp_path)
    with caplog.at_level(logging.WARNING, logger="aepo.train.checkpoint"):
        trainer.fit(progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["keep_me", "step_1"]
    assert sum("step_3" in r.getMessage() for r in caplog.records) == 2


# ----------------------------------------------------------------------------- per-tool metrics


class ForkOnly:
    """The one sampler call fork_row_state makes."""

    def fork(self, row, position=None):
        return row + 100


def add_turn(traj: Trajectory, call: ToolCall, n_model: int = 3, n_tool: int = 2) -> None:
    """A model segment, then the tool segment and ToolCall of `call`, as the agent appends them."""
    for role, n in (("model", n_model), ("tool", n_tool)):
        start = len(traj.response_ids)
        traj.response_ids += [7] * n
        traj.response_mask += [int(role == "model")] * n
        traj.logprobs += [0.0] * n
        traj.entropies += [0.0] * n
        traj.segments.append(SegmentRecord(role, start, start + n))
    traj.tool_calls.append(call)


def test_branch_rows_count_only_their_own_tool_calls():
    parent = RowState(row=0, group=0, traj=Trajectory("p", 0, [1, 2]))
    add_turn(parent.traj, ToolCall("search", "a", "Page 1: a", seconds=1.0))
    add_turn(parent.traj, ToolCall("search", "b", "Page 1: b", seconds=3.0))
    child = fork_row_state(ForkOnly(), parent, 5, row_id=1)  # after the first call's result
    assert len(child.traj.tool_calls) == 1  # a copy of the parent's first call
    add_turn(child.traj, ToolCall("calc", "1+1", "2", seconds=0.5))
    grandchild = fork_row_state(ForkOnly(), child, len(child.traj.response_ids), row_id=2)
    assert len(grandchild.traj.tool_calls) == 2

    assert [c.argument for c in own_tool_calls(parent.traj)] == ["a", "b"]
    assert [c.argument for c in own_tool_calls(child.traj)] == ["1+1"]
    assert own_tool_calls(grandchild.traj) == []
    m = tool_metrics([parent.traj, child.traj, grandchild.traj])
    assert m["tools/search/calls"] == 2 and m["tools/calc/calls"] == 1  # not 4 and 2
    assert m["tools/search/seconds"] == 2.0 and m["tools/calc/seconds"] == 0.5
    assert m["tools/search/error_rate"] == 0.0 and m["tools/search/timeout_rate"] == 0.0


def make_row(row_id: int, calls: list[ToolCall]) -> Trajectory:
    t = Trajectory("p", row_id, [1], text="x", score={"acc": 0.0})
    for c in calls:
        add_turn(t, c)
    return t


def test_error_timeout_and_malformed_counts(caplog):
    malformed = parse_action("</answer>")
    assert malformed.kind == "malformed"
    calls = [
        ToolCall("search", "q1", "Page 1: x", seconds=0.2),
        ToolCall("search", "q2", "Error: search timed out after 5s", ok=False, seconds=5.0, timed_out=True),
        ToolCall("search", "q3", "Error: search timed out after 5s", ok=False, seconds=5.0),  # flag not kept
        ToolCall("search", "q4", "Error: SearchBackendError: retriever down", ok=False, seconds=0.1),
        # the sandbox's own limit: the runner sees a normal answer
        ToolCall("python", "while 1: pass", "Error: timed out after 2s", ok=True, seconds=2.0),
        ToolCall("python", "print(1)", "1", seconds=0.5),
        ToolCall(malformed.tag or "", malformed.argument, malformed.error, ok=False),
    ]
    with caplog.at_level(logging.WARNING, logger="aepo.rollout.metrics"):
        m = rollout_metrics([make_row(0, calls[:4]), make_row(1, calls[4:])], {})
    assert m["tools/search/calls"] == 4
    assert m["tools/search/error_rate"] == 0.75 and m["tools/search/timeout_rate"] == 0.5
    assert m["tools/search/seconds"] == pytest.approx(10.3 / 4)
    assert m["tools/python/calls"] == 2
    assert m["tools/python/error_rate"] == 0.5 and m["tools/python/timeout_rate"] == 0.5
    assert m["tools/malformed_calls"] == 1 and m["tools/malformed_rate"] == pytest.approx(1 / 7)
    assert "tools/answer/calls" not in m  # a malformed </answer> is not a tool
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "'search' failed on 3 of 4 calls (75%)" in warning and "timed out after 5s" in warning
    assert tool_metrics([make_row(0, [])]) == {}


@pytest.mark.parametrize("n_calls, n_failed, warned",
                         [(4, 2, False), (3, 3, False), (4, 3, True), (10, 6, True)])
def test_failing_tool_warning_threshold(caplog, n_calls, n_failed, warned):
    calls = [ToolCall("calc", str(i), "Error: CalcError: division by zero" if i < n_failed else "1",
                      ok=i >= n_failed) for i in range(n_calls)]
    with caplog.at_level(logging.WARNING, logger="aepo.rollout.metrics"):
        tool_metrics([make_row(0, calls)])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == int(warned)
    if warned:
        assert "'calc'" in messages[0] and "division by zero" in messages[0]


def test_a_retriever_that_is_down_shows_in_the_step_metrics(caplog):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    search = SearchTool([HttpBackend(f"http://127.0.0.1:{port}/retrieve", timeout=2)])
    with ToolRunner([search], timeout=10) as tools:
        calls = tools.run([("search", f"q{i}") for i in range(4)])
    with caplog.at_level(logging.WARNING, logger="aepo.rollout.metrics"):
        m = tool_metrics([make_row(0, calls[:2]), make_row(1, calls[2:])])
    assert m["tools/search/calls"] == 4 and m["tools/search/error_rate"] == 1.0
    assert m["tools/search/timeout_rate"] == 0.0
    assert any("'search' failed on 4 of 4 calls" in r.getMessage() and "unreachable" in r.getMessage()
               for r in caplog.records)


def test_dapo_overlong_shaping_counts_generated_tokens_only():
    """algo=dapo shapes the reward over the last 64 of 256 tokens, counting what the policy
    wrote: 200 generated + 50 tool tokens is L = 200, (200 - 192) / 64 = 0.125 of the penalty."""
    from aepo.config import load_config
    from aepo.train.rl import overlong_shaping
    from aepo.types import Trajectory

    cfg = load_config(None, ["algo=dapo"])
    assert (cfg.actor.overlong_buffer, cfg.actor.overlong_penalty, cfg.rollout.max_response_tokens) == (64, 1.0, 256)

    def row(generated, tool):
        mask = [1] * (generated // 2) + [0] * tool + [1] * (generated - generated // 2)
        return Trajectory("p", 0, [1], [5] * len(mask), mask)

    assert overlong_shaping(row(200, 50), cfg) == pytest.approx(-0.125)
    assert overlong_shaping(row(150, 100), cfg) == 0.0  # 250 tokens in all, but 150 generated
    assert overlong_shaping(row(256, 0), cfg) == pytest.approx(-1.0)
    assert overlong_shaping(row(224, 0), cfg) == pytest.approx(-0.5)
    assert overlong_shaping(row(256, 0), load_config(None, ["algo=grpo"])) == 0.0  # off elsewhere
    with pytest.raises(Exception, match="actor.overlong_buffer"):
        load_config(None, ["algo=dapo", "rollout.max_response_tokens=32"])
