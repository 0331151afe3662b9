"""`EngineBatch` (the vLLM backend's running batch) against a fake engine, without vLLM.

The fake speaks the part of vLLM's `LLMEngine` the batch uses (`add_request`, `step` with
per-step outputs and flat top-k log-probs, `abort_request`) and replies to each request with a
text chosen from its prompt and seed, so stop strings, aborts, seeds and log-probs are checked
here in CI; tests/rollout/test_vllm_backend.py runs the real engine where vLLM is installed.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from scripted_sampler import CharTokenizer

from aepo.algos.entropy import topk_entropy
from aepo.rollout.config import RolloutConfig
from aepo.rollout.sampler.vllm_batch import EngineBatch, segment_seed
from aepo.rollout.sampler.vllm_sampler import VLLMSampler

TOP_K = 3


class Tokenizer(CharTokenizer):
    def batch_decode(self, rows):
        return [self.decode(r) for r in rows]


def top_logprobs(token: int, vocab: int) -> tuple[list[int], list[float]]:
    """The fake model's top-k at every position: token ids 20, 21, 22 with probabilities 0.5,
    0.2, 0.1 (the rest of the mass on the other tokens), and the sampled token first."""
    ids, probs = [20, 21, 22], [0.5, 0.2, 0.1]
    rest = (1 - sum(probs)) / (vocab - 3)
    sampled = math.log(probs[ids.index(token)] if token in ids else rest)
    return [token, *ids], [sampled, *map(math.log, probs)]


class FakeEngine:
    """Replies `reply(prompt_ids, seed)` one token a step; EOS (id 1) and max_tokens end a request."""

    def __init__(self, tok: Tokenizer, reply) -> None:
        self.tok, self.reply = tok, reply
        self.live: dict[str, dict] = {}
        self.added: list[tuple[str, list[int], int]] = []  # (request id, prompt, seed)
        self.aborted: list[str] = []
        self.steps = 0

    def add_request(self, request_id, prompt, params, lora_request=None):
        assert params.output_kind == "delta" and not params.detokenize and params.flat_logprobs
        ids = list(prompt["prompt_token_ids"])
        self.added.append((request_id, ids, params.seed))
        self.live[request_id] = {"text": self.tok.encode(self.reply(ids, params.seed)), "n": 0,
                                 "max": params.max_tokens}

    def abort_request(self, request_ids):
        for rid in request_ids:
            assert rid in self.live, f"{rid} aborted twice or never added"
            self.aborted.append(rid)
            del self.live[rid]

    def step(self):
        self.steps += 1
        outs = []
        for rid, r in list(self.live.items()):
            token = r["text"][r["n"]] if r["n"] < len(r["text"]) else 1
            r["n"] += 1
            ids, lps = top_logprobs(token, len(self.tok))
            flat = SimpleNamespace(start_indices=[0], end_indices=[len(ids)], token_ids=ids, logprobs=lps)
            reason = "stop" if token == 1 else "length" if r["n"] >= r["max"] else None
            outs.append(SimpleNamespace(request_id=rid, finished=reason is not None, num_cached_tokens=2,
                                        outputs=[SimpleNamespace(token_ids=[token], logprobs=flat,
                                                                 finish_reason=reason, stop_reason=None)]))
            if reason is not None:
                del self.live[rid]
        return outs


def sampler_on(engine: FakeEngine, tok: Tokenizer, seed: int = 0, max_model_len: int = 4096) -> VLLMSampler:
    backend = SimpleNamespace(
        cfg=RolloutConfig(backend="vllm", entropy_top_k=TOP_K), vocab_size=len(tok), max_model_len=max_model_len,
        llm=SimpleNamespace(llm_engine=engine), tokenizer=tok, delta_outputs="delta", lora_request=None,
        _prompt_tokens=0, _cached_tokens=0, _vllm=SimpleNamespace(SamplingParams=SimpleNamespace))
    return VLLMSampler(backend, seed)


def drain(batch: EngineBatch) -> dict:
    out = {}
    while batch.active:
        out.update(batch.step())
    return out


@pytest.fixture
def tok():
    return Tokenizer()


def test_a_stop_string_ends_the_row_at_its_last_token_and_aborts_the_request(tok):
    engine = FakeEngine(tok, lambda ids, seed: "go on</search> never sent")
    s = sampler_on(engine, tok)
    a, b = s.new_row(tok.encode("q: ")), s.new_row(tok.encode("r: "))
    batch = s.open_batch(stop=["</search>", "o o"])  # a one-token stop and a text stop
    batch.start(a, 64, (0, 0, 0))
    batch.start(b, 3, (0, 0, 1))
    got = drain(batch)
    assert tok.decode(got[a].token_ids) == "go o"  # "o o" spans three tokens
    assert (got[a].finish, got[a].stop) == ("stop", "o o")
    assert (tok.decode(got[b].token_ids), got[b].finish) == ("go ", "length")
    assert engine.aborted == [engine.added[0][0]] and not engine.live
    assert s.tokens(a) == tok.encode("q: go o")  # the row holds what was returned, nothing after

    engine = FakeEngine(tok, lambda ids, seed: "go on</search> never sent")
    s = sampler_on(engine, tok)
    a = s.new_row(tok.encode("q: "))
    batch = s.open_batch(stop=["</search>"])
    batch.start(a, 64, (0, 0, 0))
    assert (tok.decode(drain(batch)[a].token_ids), len(engine.aborted)) == ("go on</search>", 1)


def test_eos_and_budget_end_requests_in_the_engine(tok):
    engine = FakeEngine(tok, lambda ids, seed: "ab")
    s = sampler_on(engine, tok, max_model_len=12)
    a, long = s.new_row(tok.encode("x")), s.new_row(tok.encode("y" * 12))
    batch = s.open_batch()
    batch.start(a, 10, (0, 0, 0))
    batch.start(long, 10, (0, 0, 1))  # no room left under max_model_len: ends at once
    got = drain(batch)
    assert (got[a].token_ids, got[a].finish) == (tok.encode("ab") + [1], "eos")
    assert (got[long].token_ids, got[long].finish) == ([], "length")
    assert len(engine.added) == 1 and engine.aborted == []


def test_log_probs_and_entropies_come_from_the_flat_top_k(tok):
    engine = FakeEngine(tok, lambda ids, seed: "".join(chr(c - tok.offset) for c in (20, 21, 60) if c >= tok.offset)
                        or "x")
    s = sampler_on(engine, tok)
    row = s.new_row(tok.encode("q"))
    batch = s.open_batch()
    batch.start(row, 3, (0, 0, 0))
    gen = drain(batch)[row]
    v = len(tok)
    for token, lp, h in zip(gen.token_ids, gen.logprobs, gen.entropies):
        ids, lps = top_logprobs(token, v)
        assert lp == pytest.approx(lps[0])
        # the table: the sampled token's log-prob, then the top k without it (no duplicate)
        table = [lps[0]] + [x for i, x in zip(ids[1:], lps[1:]) if i != token]
        table += [-math.inf] * (TOP_K + 1 - len(table))
        assert h == pytest.approx(float(topk_entropy(torch.tensor([table]), v, TOP_K)[0]))
    # a token inside the top k is counted once: entropy of {0.5, 0.2, 0.1} + the estimated tail
    assert gen.entropies[0] == pytest.approx(gen.entropies[1])


def test_request_seeds_depend_on_the_rows_key_and_length_not_on_the_schedule(tok):
    seeds_seen = []

    def reply(ids, seed):
        seeds_seen.append(seed)
        return "abc"

    def run(order):
        engine = FakeEngine(tok, reply)
        s = sampler_on(engine, tok, seed=7)
        rows = [s.new_row(tok.encode(p)) for p in ("one", "three")]
        batch = s.open_batch()
        for i in order:
            batch.start(rows[i], 4, (0, 5, i))
            batch.step()
        drain(batch)
        return {tuple(ids): seed for _, ids, seed in engine.added}

    assert run([0, 1]) == run([1, 0])
    seeds = run([0, 1])
    assert seeds[tuple(tok.encode("one"))] == segment_seed(7, (0, 5, 0), 3)
    assert seeds[tuple(tok.encode("three"))] == segment_seed(7, (0, 5, 1), 5)
    assert len(set(seeds.values())) == 2


def test_releasing_a_running_row_aborts_its_request_and_ignores_its_outputs(tok):
    engine = FakeEngine(tok, lambda ids, seed: "abcdef")
    s = sampler_on(engine, tok)
    a, b = s.new_row(tok.encode("p")), s.new_row(tok.encode("q"))
    batch = s.open_batch(max_rows=2)
    batch.start(a, 8, (0, 0, 0))
    batch.start(b, 8, (0, 0, 1))
    assert batch.free == 0
    with pytest.raises(ValueError, match="full"):
        batch.start(s.new_row(tok.encode("z")), 8, (0, 0, 2))
    batch.step()
    assert batch.generated(a) == 1 and len(batch.entropies(a)) == 1
    s.release(a)
    assert engine.aborted == [engine.added[0][0]] and batch.active == 1
    got = drain(batch)
    assert list(got) == [b]
    with pytest.raises(ValueError, match="unknown row handle"):
        s.tokens(a)


def test_generate_runs_rows_through_one_batch_and_counts_engine_steps(tok):
    engine = FakeEngine(tok, lambda ids, seed: "hi</search>" if ids[-1] == tok.encode("1")[0] else "hello world")
    s = sampler_on(engine, tok)
    rows = [s.new_row(tok.encode(p)) for p in ("1", "2")]
    gens = s.generate(rows, [20, 3], stop=["</search>"])
    assert [tok.decode(g.token_ids) for g in gens] == ["hi</search>", "hel"]
    assert [g.finish for g in gens] == ["stop", "length"]
    assert s.steps == engine.steps == 3 and s.row_steps == 6
    assert s.backend._prompt_tokens == 2 and s.backend._cached_tokens == 4
