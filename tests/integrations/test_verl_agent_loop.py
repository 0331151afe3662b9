"""The "aepo_tree" verl agent loop (`aepo.integrations.verl_agent_loop`) inside verl's own agent-loop
worker, against a fake LLM server: one coordinated tree per prompt, tree invariants, masks and
log-probs, tool errors, server errors and hangs reaching every session, config keys, split groups.

The fake server answers from the decoded context with aepo's built-in tokenizer: the first
segment asks `<calc>2*3</calc>` (with text after the stop tag, which a server that ignores stop
strings returns too), the segment after a result asks `<calc>1/0</calc>` on its first draw (a tool
error) and answers otherwise. Log-probs depend on the token and on how many results precede it,
so the surprisal after a tool result is high and ARPO / AEPO branch there. Each answer is stamped
as verl's servers and client stamp it: the policy version `global_steps` and the prefix-cache hit
count `num_cached_tokens` in `extra_fields` (vLLM's server), `min_global_steps` /
`max_global_steps` set from `global_steps` (`LLMServerClient.generate`), and `num_preempted`.

verl is not a default dependency; this module skips without it. Run it in the verl venv:
    AEPO_VENV=.venv-verl AEPO_EXTRAS=verl python3 quickstart.py test tests/test_verl_agent_loop.py
(verl 0.9.1's agent loop also imports cachetools, uvicorn and fastapi, which `pip install verl`
does not pull in.)
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

agent_loop = pytest.importorskip("verl.experimental.agent_loop.agent_loop",
                                 reason="verl's agent loop cannot be imported (pip install aepo[verl])")

import hydra
import numpy as np
from omegaconf import OmegaConf
from verl.protocol import DataProto
from verl.workers.rollout.replica import TokenOutput

from aepo.errors import ConfigError
from aepo.integrations import verl_agent_loop as loop_mod
from aepo.models.tokenizer import build_tokenizer
from aepo.rollout.agent import segment_entropy_value

PROMPT_LEN, RESPONSE_LEN = 64, 160
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.chat_template = TEMPLATE
    return t


def fake_logprob(token: int, phase: int) -> float:
    """Calm before the first tool result, uncertain after it (so dH > 0 and the trees branch)."""
    return -((0.05 if phase == 0 else 0.25) + 0.01 * (token % 10))


class FakeServer:
    """verl's `LLMServerClient.generate`, deterministic (module docstring). `honor_stop`: apply
    the request's stop strings like vLLM with include_stop_str_in_output; `fail_at` / `hang_at`:
    the request number (1-based) from which it raises / never answers; `version`: the policy
    version (global_steps) answering, or a function of the request number; `marked`: every answer
    starts with `<think>r{request number}</think>`, so the requests that made a row are known."""

    def __init__(self, tok, *, honor_stop: bool = True, fail_at: int | None = None, hang_at: int | None = None,
                 version=0, marked: bool = False, fail_once: tuple[int, ...] = (), hang_once: tuple[int, ...] = ()):
        self.tok, self.honor_stop, self.fail_at, self.hang_at = tok, honor_stop, fail_at, hang_at
        self.fail_once, self.hang_once = set(fail_once), set(hang_once)  # request numbers that fail / hang once
        self.version, self.marked = version, marked
        self.requests: list[dict] = []
        self.draws: Counter[str] = Counter()

    def reply(self, context: str, draw: int, number: int) -> str:
        response = context.split("assistant:", 1)[1]
        phase = response.count("</result>")
        think = f"<think>r{number}</think>" if self.marked else "<think>go</think>"
        if phase == 0:
            return f"{think}<calc>2*3</calc> and text after the stop tag"
        mark = think if self.marked else ""
        if phase == 1 and draw == 0:
            return f"{mark}<calc>1/0</calc> more text"
        return f"{mark}<answer>6</answer>"

    def stamp(self, number: int, prompt_ids: list[int]) -> dict:
        """extra_fields as vLLM's server returns them and verl's LLMServerClient completes them."""
        steps = self.version(number) if callable(self.version) else self.version
        cached = max((next((i for i, (a, b) in enumerate(zip(r["prompt_ids"], prompt_ids)) if a != b),
                            min(len(r["prompt_ids"]), len(prompt_ids)))
                      for r in self.requests[: number - 1]), default=0)
        extra = {"global_steps": steps, "num_cached_tokens": cached}  # vLLMHttpServer.generate
        extra.setdefault("min_global_steps", extra["global_steps"])  # LLMServerClient.generate
        extra.setdefault("max_global_steps", extra["global_steps"])
        return extra

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        self.requests.append({"request_id": request_id, "prompt_ids": list(prompt_ids),
                              "params": dict(sampling_params), "kwargs": kwargs})
        number, record = len(self.requests), self.requests[-1]
        record["extra_fields"] = extra = self.stamp(number, list(prompt_ids))
        if self.fail_at is not None and number >= self.fail_at:
            raise RuntimeError("fake server is down")
        if self.hang_at is not None and number >= self.hang_at:
            await asyncio.Event().wait()
        if number in self.fail_once:
            raise RuntimeError(f"fake server dropped request {number}")
        if number in self.hang_once:
            await asyncio.Event().wait()
        await asyncio.sleep(0)
        context = self.tok.decode(prompt_ids)
        draw = self.draws[context]
        self.draws[context] += 1
        phase = context.split("assistant:", 1)[1].count("</result>")
        ids = self.tok.encode(self.reply(context, draw, number), add_special_tokens=False) + [self.tok.eos_token_id]
        stop = sampling_params.get("stop") if self.honor_stop else None
        out: list[int] = []
        for t in ids:
            if len(out) >= sampling_params["max_tokens"]:
                break
            out.append(t)
            if stop and any(self.tok.decode(out).endswith(s) for s in stop):
                break
        record["output"] = out
        return TokenOutput(token_ids=out, log_probs=[fake_logprob(t, phase) for t in out], stop_reason="completed",
                           num_preempted=0, extra_fields=dict(extra))


def trainer_config(n: int = 4, *, val_n: int = 1, name: str = "vllm", custom: dict | None = None, workers: int = 1):
    aepo = {"tool_config": {"enabled": ["calc"]}, "group_wait_s": 0.05, **(custom or {})}
    return OmegaConf.create({
        "actor_rollout_ref": {"rollout": {
            "n": n, "val_kwargs": {"n": val_n, "top_p": 1.0, "top_k": -1, "temperature": 0.0},
            "prompt_length": PROMPT_LEN, "response_length": RESPONSE_LEN, "name": name,
            "temperature": 1.0, "top_p": 1.0, "top_k": -1, "calculate_log_probs": False,
            "full_determinism": False, "custom": {"aepo": aepo},
            "agent": {"default_agent_loop": "aepo_tree", "num_workers": workers},
        }},
        "data": {"train_batch_size": 2, "apply_chat_template_kwargs": {}},
    })


def make_worker(cfg, server, tok):
    """verl's AgentLoopWorker without Ray: the attributes its generate_sequences path reads."""
    w = agent_loop.AgentLoopWorker.__new__(agent_loop.AgentLoopWorker)
    w.config, w.llm_client, w.teacher_client, w.reward_loop_worker_handles = cfg, server, None, None
    w.rollout_config = cfg.actor_rollout_ref.rollout
    w.tokenizer, w.processor, w.dataset_cls, w.hf_model_type = tok, None, None, None
    w.mm_processor_kwargs, w.distillation_enabled, w.tools = {}, False, []
    return w


def batch(prompts: int, k: int, agent_name: str = "aepo_tree") -> DataProto:
    """verl's layout: each prompt repeated k times next to each other, one uid per prompt."""
    size = prompts * k
    raw = np.empty(size, dtype=object)
    raw[:] = [[{"role": "user", "content": f"question {i // k}"}] for i in range(size)]
    return DataProto.from_dict(non_tensors={
        "raw_prompt": raw, "uid": np.array([f"uid-{i // k}" for i in range(size)], dtype=object),
        "index": np.arange(size) // k, "agent_name": np.array([agent_name] * size, dtype=object),
    })


def rows_of(out: DataProto) -> list[dict]:
    """verl's padded output back to one dict per session."""
    b, nt = out.batch, out.non_tensor_batch
    rows = []
    for i in range(len(out)):
        attn = b["attention_mask"][i].bool()
        n = int(attn[PROMPT_LEN:].sum())
        rows.append({
            "uid": nt["uid"][i], "prompt": b["prompts"][i][attn[:PROMPT_LEN]].tolist(),
            "response": b["responses"][i][:n].tolist(), "mask": b["response_mask"][i][:n].tolist(),
            "logprobs": b["rollout_log_probs"][i][:n].tolist(),
            **{key: nt[key][i] for key in ("row_id", "parent_row_id", "branch_position", "m", "decisions",
                                           "finish_reason", "n_tool_calls", "min_global_steps", "max_global_steps")},
            **{key: nt[key][i] for key in ("global_steps", "num_cached_tokens") if key in nt},
            "num_preempted": out.meta_info["metrics"][i]["num_preempted"],
        })
    return rows


def run_worker(cfg, server, tok, prompts: int, k: int, agent_name: str = "aepo_tree") -> list[dict]:
    out = asyncio.run(make_worker(cfg, server, tok).generate_sequences(batch(prompts, k, agent_name)))
    return rows_of(out)


def requests_of_row(server, row: dict) -> list[dict]:
    """The fake server's requests whose answer is in the row: its prompt is the row's start and its
    tokens follow (up to the row's end); exact when the answers are `marked`."""
    full = row["prompt"] + row["response"]
    made = []
    for req in server.requests:
        p, out = req["prompt_ids"], req["output"]
        k = min(len(out), len(full) - len(p))
        if k >= 1 and full[: len(p)] == p and full[len(p): len(p) + k] == out[:k]:
            assert k >= 4 or k == len(out), "too short to tell the marked answers apart"
            made.append(req)
    return made


def expected_mask(tok, response: list[int]) -> list[int]:
    """0 from each `<result>` token through its `</result>` (single tokens in aepo's tokenizer)."""
    open_id, close_id = tok.convert_tokens_to_ids("<result>"), tok.convert_tokens_to_ids("</result>")
    mask, inside = [], False
    for t in response:
        inside = inside or t == open_id
        mask.append(0 if inside else 1)
        if t == close_id:
            inside = False
    return mask


# ----------------------------------------------------------------------------- the tree in verl


@pytest.mark.parametrize("strategy", ["arpo", "aepo"])
@pytest.mark.parametrize("server_name", ["vllm", "other"])  # stop strings applied by the server / by aepo
def test_one_tree_per_prompt_with_valid_rows(tok, strategy, server_name):
    k, prompts = 4, 3
    server = FakeServer(tok, honor_stop=server_name == "vllm")
    rows = run_worker(trainer_config(k, name=server_name, custom={"strategy": strategy}), server, tok, prompts, k)
    assert len(rows) == prompts * k
    by_uid = defaultdict(list)
    for r in rows:
        by_uid[r["uid"]].append(r)
    assert len(by_uid) == prompts
    branched = 0
    for uid, group in by_uid.items():
        assert sorted(r["row_id"] for r in group) == list(range(k)), uid
        assert len({tuple(r["prompt"]) for r in group}) == 1
        assert len({r["m"] for r in group}) == 1 and 1 <= group[0]["m"] <= k
        by_id = {r["row_id"]: r for r in group}
        for r in group:
            if r["parent_row_id"] is None:
                continue
            branched += 1
            parent, pos = by_id[r["parent_row_id"]], r["branch_position"]
            assert 0 < pos <= len(parent["response"])
            assert r["response"][:pos] == parent["response"][:pos]
            assert r["mask"][:pos] == parent["mask"][:pos]
            assert r["logprobs"][:pos] == parent["logprobs"][:pos]
            assert r["decisions"] and r["decisions"][-1]["branched"]
    assert branched > 0, "the fake server's uncertain post-tool segments should make the trees branch"
    # one request id per tree: every branch of a prompt goes to the same replica
    ids_per_prompt = defaultdict(set)
    for req in server.requests:
        ids_per_prompt[tok.decode(req["prompt_ids"]).split("\n")[0]].add(req["request_id"])
        assert req["params"]["logprobs"] is True and req["params"]["max_tokens"] >= 1
        assert ("stop" in req["params"]) == (server_name == "vllm")
        if server_name == "vllm":
            assert req["params"]["include_stop_str_in_output"] is True
    assert len(ids_per_prompt) == prompts and all(len(v) == 1 for v in ids_per_prompt.values())
    assert len(set().union(*ids_per_prompt.values())) == prompts


def test_masks_logprobs_and_surprisal_entropy(tok):
    k = 4
    rows = run_worker(trainer_config(k, custom={"strategy": "arpo"}), FakeServer(tok), tok, 2, k)
    close_id = tok.convert_tokens_to_ids("</result>")
    saw_error_result = False
    for r in rows:
        resp, mask, lps = r["response"], r["mask"], r["logprobs"]
        assert len(mask) == len(lps) == len(resp) > 0
        assert mask == expected_mask(tok, resp)
        assert sum(1 for a, b in zip([1] + mask, mask) if a == 1 and b == 0) == r["n_tool_calls"] > 0
        phase = 0
        for t, m, lp in zip(resp, mask, lps):
            assert lp == pytest.approx(fake_logprob(t, phase) if m else 0.0)
            phase += t == close_id
        text = tok.decode(resp)
        assert "text after the stop tag" not in text and "more text" not in text  # cut at the stop string
        saw_error_result |= "<result>\nError" in text
        assert r["finish_reason"] == "answer" and text.endswith("</answer>")
    assert saw_error_result, "<calc>1/0</calc> should come back as an error result"
    # the branch probe is the surprisal: a global row's first dH from its own log-probs
    checked = 0
    for r in rows:
        if r["parent_row_id"] is not None or not r["decisions"]:
            continue
        mask, surprisal = r["mask"], [-lp for lp in r["logprobs"]]
        first_tool = mask.index(0)
        after = first_tool + mask[first_tool:].index(1)
        end = after + (mask[after:].index(0) if 0 in mask[after:] else len(mask) - after)
        h_init = segment_entropy_value(surprisal[:first_tool], 20, len(tok))
        h_now = segment_entropy_value(surprisal[after:end], 20, len(tok))
        assert r["decisions"][0]["dH"] == pytest.approx(h_now - h_init, rel=1e-6)
        checked += 1
    assert checked > 0


def test_sampler_cuts_at_stop_and_budget(tok):
    """ServerSampler alone, with a server that ignores stop strings: aepo cuts at the first stop
    string and at the budget; entropies are -logprob."""

    async def main():
        loop = asyncio.get_running_loop()
        sampler = loop_mod.ServerSampler(FakeServer(tok, honor_stop=False), loop, tok, {"temperature": 1.0},
                                         request_id="t", stop_style="none")
        prompt = tok.encode("user: q\nassistant:", add_special_tokens=False)
        rows = [sampler.new_row(prompt), sampler.new_row(prompt)]

        def work():
            return sampler.generate(rows, [100, 3], stop=("</calc>", "</answer>")), sampler.tokens(rows[0])

        return await asyncio.to_thread(work), prompt

    (gens, tokens), prompt = asyncio.run(main())
    full, short = gens
    assert full.finish == "stop" and full.stop == "</calc>"
    assert tok.decode(full.token_ids).endswith("</calc>")
    assert tokens == prompt + full.token_ids
    assert full.entropies == [-lp for lp in full.logprobs] and all(e > 0 for e in full.entropies)
    assert short.finish == "length" and len(short.token_ids) == 3 == len(short.logprobs)


@pytest.mark.parametrize("strategy", ["arpo", "aepo"])
def test_rows_carry_the_policy_versions_of_their_requests(tok, strategy):
    """verl's V1 trainer reads min/max_global_steps of every row (_compute_metrics: a TypeError on
    None). With the policy version changing between requests, each row carries the oldest and
    newest version of the requests that made its tokens (a branch: its parent's before the branch
    point too), global_steps and num_cached_tokens of the first of them, num_preempted summed."""
    k = 4
    server = FakeServer(tok, version=lambda number: 100 + number, marked=True)
    rows = run_worker(trainer_config(k, custom={"strategy": strategy}), server, tok, 2, k)
    assert len(rows) == 2 * k
    inherited = 0
    for r in rows:
        made = requests_of_row(server, r)
        assert made, r
        versions = [q["extra_fields"]["global_steps"] for q in made]
        assert (r["min_global_steps"], r["max_global_steps"]) == (min(versions), max(versions))
        assert r["global_steps"] == made[0]["extra_fields"]["global_steps"]
        assert r["num_cached_tokens"] == made[0]["extra_fields"]["num_cached_tokens"]
        assert r["num_preempted"] == 0
        if r["parent_row_id"] is not None:
            lp = len(r["prompt"])
            inherited += any(len(q["prompt_ids"]) - lp < r["branch_position"] for q in made)
    assert inherited, "a branch should carry the requests of its parent's prefix"
    assert len({(r["min_global_steps"], r["max_global_steps"]) for r in rows}) > 1
    assert any(r["min_global_steps"] < r["max_global_steps"] for r in rows)


def test_request_fields_follow_verl_semantics():
    answer = loop_mod._Answer
    fields, preempted = loop_mod.request_fields([
        answer({"global_steps": 3, "min_global_steps": 2, "max_global_steps": 3, "num_cached_tokens": 7,
                "spec_num_draft_tokens": 4, "spec_num_accepted_tokens": 2, "spec_num_verify_steps": 1}, 1),
        answer({"global_steps": 5, "min_global_steps": 5, "max_global_steps": 5, "num_cached_tokens": 30,
                "spec_num_draft_tokens": 6, "spec_num_accepted_tokens": 3, "spec_num_verify_steps": 2}, None),
    ])
    assert fields == {"min_global_steps": 2, "max_global_steps": 5, "global_steps": 3, "num_cached_tokens": 7,
                      "spec_num_draft_tokens": 10, "spec_num_accepted_tokens": 5, "spec_num_verify_steps": 3}
    assert preempted == 1
    # a server that stamps nothing (verl's client still sets the keys, to None)
    assert loop_mod.request_fields([answer({}, None)]) == ({"min_global_steps": None, "max_global_steps": None}, -1)
    # spec-decode counts only when every request has them
    fields, _ = loop_mod.request_fields([answer({"spec_num_draft_tokens": 1}, 0), answer({}, 0)])
    assert "spec_num_draft_tokens" not in fields


# ----------------------------------------------------------------------------- validation: fewer sessions


@pytest.mark.parametrize("strategy", ["arpo", "aepo"])
def test_validation_with_one_session_per_prompt(tok, strategy, caplog, monkeypatch):
    """verl's validation starts val_kwargs.n sessions per prompt (often 1) while initial_rollouts
    is set for training's n: each prompt gets a tree of one row, the setting clamped with one warning."""
    monkeypatch.setattr(loop_mod, "_CLAMP_WARNED", set())
    cfg = trainer_config(8, val_n=1, custom={"strategy": strategy, "initial_rollouts": 6})
    with caplog.at_level("WARNING", logger=loop_mod.__name__):
        rows = run_worker(cfg, FakeServer(tok), tok, 3, 1)
    assert len(rows) == 3 and sorted(r["uid"] for r in rows) == ["uid-0", "uid-1", "uid-2"]
    for r in rows:
        assert (r["row_id"], r["parent_row_id"], r["m"]) == (0, None, 1)
        assert r["response"] and r["mask"] == expected_mask(tok, r["response"]) and r["n_tool_calls"] > 0
        assert r["finish_reason"] == "answer"
        assert (r["min_global_steps"], r["max_global_steps"]) == (0, 0)
    warnings = [m for m in caplog.messages if "initial_rollouts=6" in m]
    assert len(warnings) == 1 and "initial_rollouts=1" in warnings[0]


def test_validation_with_two_sessions_per_prompt(tok, monkeypatch):
    monkeypatch.setattr(loop_mod, "_CLAMP_WARNED", set())
    cfg = trainer_config(8, val_n=2, custom={"strategy": "aepo", "initial_rollouts": 6})
    results = run_sessions(cfg, FakeServer(tok), tok, ["a", "a", "b", "b"])
    assert all(isinstance(r, agent_loop.AgentLoopOutput) for r in results), results
    assert [r.extra_fields["row_id"] for r in results] == [0, 1, 0, 1]
    assert all(r.response_ids and r.extra_fields["min_global_steps"] == 0 for r in results)
    assert {r.extra_fields["m"] for r in results} <= {1, 2}
    assert loop_mod.tree_config(loop_mod.loop_settings({}, cfg).rollout, 2).initial_rollouts == 2
    assert loop_mod.tree_config(loop_mod.loop_settings({}, cfg).rollout, 8).initial_rollouts == 6


def test_v1_sessions_of_a_prompt_are_one_group_whatever_n(tok):
    """verl's V1 worker starts a prompt's sessions itself (session_id 0..n-1, n from rollout.n,
    val_kwargs.n or the batch's __rollout_n__): a group of another size is whole, not split."""
    results = run_sessions(trainer_config(4, val_n=1), FakeServer(tok), tok, ["a"] * 3, session_ids=True)
    assert sorted(r.extra_fields["row_id"] for r in results) == [0, 1, 2], results


# ----------------------------------------------------------------------------- failures


def run_sessions(cfg, server, tok, uids: list[str], options: dict | None = None, timeout: float = 60.0,
                 session_ids: bool = False):
    """Sessions started the way verl's worker starts them (all tasks first, then gather), each
    loop instantiated by hydra from the registry; one result or exception per session. With
    `session_ids`, each carries its index among its prompt's sessions as verl's V1 worker does."""
    entry = {**agent_loop._agent_loop_registry["aepo_tree"], **(options or {})}

    async def main():
        tasks = []
        for i, uid in enumerate(uids):
            loop = hydra.utils.instantiate(
                config=entry, trainer_config=agent_loop.DictConfigWrap(cfg), server_manager=server,
                tokenizer=tok, processor=None, hf_model_type=None, dataset_cls=None,
                data_config=agent_loop.DictConfigWrap(cfg.data), tools=agent_loop.ToolListWrap([]))
            kwargs = {"raw_prompt": [{"role": "user", "content": f"question {uid}"}], "uid": uid, "index": i}
            if session_ids:
                kwargs["session_id"] = uids[:i].count(uid)
            tasks.append(asyncio.create_task(loop.run({"temperature": 1.0, "logprobs": False}, **kwargs)))
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)

    return asyncio.run(main())


def test_server_error_reaches_every_session(tok):
    k = 4
    start = time.monotonic()
    results = run_sessions(trainer_config(k), FakeServer(tok, fail_at=3), tok, ["a"] * k + ["b"] * k)
    assert time.monotonic() - start < 30
    assert len(results) == 2 * k
    for r in results:
        assert isinstance(r, loop_mod.TreeRolloutError), r
        assert "fake server is down" in str(r)
    assert not loop_mod._GROUPS


def test_server_hang_times_out_in_every_session(tok):
    k = 3
    start = time.monotonic()
    results = run_sessions(trainer_config(k), FakeServer(tok, hang_at=2), tok, ["a"] * k,
                           options={"request_timeout_s": 0.5})
    assert time.monotonic() - start < 20
    assert all(isinstance(r, loop_mod.TreeRolloutError) and "request_timeout_s" in str(r) for r in results), results


def test_failed_and_hanging_requests_are_retried(tok):
    """A request that fails or hangs once is sent again (after the backoff) and the tree completes;
    without retries the same fault fails the tree."""
    k = 3
    fast = {"retry_backoff_s": 0.01, "request_timeout_s": 0.5}
    for fault in ({"fail_once": (2, 5)}, {"hang_once": (3,)}):
        server = FakeServer(tok, **fault)
        results = run_sessions(trainer_config(k), server, tok, ["a"] * k, options=fast)
        assert all(isinstance(r, agent_loop.AgentLoopOutput) for r in results), (fault, results)
        assert sorted(r.extra_fields["row_id"] for r in results) == list(range(k))
        faulty = server.fail_once | server.hang_once
        retried = [server.requests[n - 1]["prompt_ids"] for n in faulty]
        later = [r["prompt_ids"] for r in server.requests[max(faulty):]]
        assert all(p in later for p in retried), "each faulty request is sent again with the same prompt"
        results = run_sessions(trainer_config(k), FakeServer(tok, **fault), tok, ["a"] * k,
                               options={**fast, "request_retries": 0})
        assert all(isinstance(r, loop_mod.TreeRolloutError) for r in results), (fault, results)


def test_retries_are_bounded(tok):
    results = run_sessions(trainer_config(2), FakeServer(tok, fail_at=1), tok, ["a"] * 2,
                           options={"retry_backoff_s": 0.01, "request_retries": 3})
    assert all(isinstance(r, loop_mod.TreeRolloutError) and "after 4 attempts" in str(r) for r in results), results


def test_full_determinism_gives_each_tree_its_own_request_ids(tok):
    """Under full_determinism vLLM sees each request id and seed: trees of one step must not share them."""
    cfg = trainer_config(2)
    cfg.actor_rollout_ref.rollout.full_determinism = True
    server = FakeServer(tok)
    results = run_sessions(cfg, server, tok, ["a", "a", "b", "b"])
    assert all(isinstance(r, agent_loop.AgentLoopOutput) for r in results), results
    ids = [r["request_id"] for r in server.requests]
    seeds = [r["params"]["seed"] for r in server.requests]
    assert len(set(ids)) == len(ids) and len(set(seeds)) == len(seeds)
    assert all(i.startswith("aepo-det-") for i in ids)


def test_split_group_is_detected_or_rolled_out_as_documented(tok):
    cfg = trainer_config(4, val_n=1)
    results = run_sessions(cfg, FakeServer(tok), tok, ["a"] * 3)  # 3 of a prompt's 4 sessions
    assert all(isinstance(r, loop_mod.GroupSizeError) for r in results), results
    assert "3 session(s)" in str(results[0]) and "partial_groups" in str(results[0])
    results = run_sessions(cfg, FakeServer(tok), tok, ["a"] * 3, options={"partial_groups": "tree"})
    assert sorted(r.extra_fields["row_id"] for r in results) == [0, 1, 2]
    # validation: val_kwargs.n sessions per prompt are a whole group
    results = run_sessions(trainer_config(4, val_n=2), FakeServer(tok), tok, ["a", "a", "b", "b"])
    assert sorted(r.extra_fields["row_id"] for r in results) == [0, 0, 1, 1]


def test_missing_uid_is_an_error(tok):
    cfg = trainer_config(1)

    async def main():
        loop = loop_mod.AepoTreeAgentLoop(agent_loop.DictConfigWrap(cfg), FakeServer(tok), tok, None, None,
                                          agent_loop.DictConfigWrap(cfg.data))
        await loop.run({}, raw_prompt=[{"role": "user", "content": "q"}])

    with pytest.raises(loop_mod.TreeRolloutError, match="uid"):
        asyncio.run(main())


# ----------------------------------------------------------------------------- config and registration


def test_config_keys_reach_the_loop(tok, tmp_path: Path):
    """Keys from an agent-loop YAML file (loaded as verl's worker loads it) win over
    actor_rollout_ref.rollout.custom.aepo, and change what the tree does."""
    yaml_file = tmp_path / "agent_loops.yaml"
    yaml_file.write_text(
        "- name: aepo_tree_cfg_test\n"
        "  _target_: aepo.integrations.verl_agent_loop.AepoTreeAgentLoop\n"
        "  strategy: arpo\n  initial_rollouts: 1\n  max_tool_calls: 1\n  n_probe: 7\n  seed: 5\n"
        "  tool_config: {enabled: [calc], timeout: 3.0}\n")
    for entry in OmegaConf.load(yaml_file):  # what AgentLoopWorker.__init__ does with the path
        agent_loop._agent_loop_registry[entry.name] = entry
    try:
        cfg = trainer_config(4, custom={"strategy": "aepo", "max_tool_calls": 3, "n_probe": 11})
        entry = agent_loop._agent_loop_registry["aepo_tree_cfg_test"]
        instance = hydra.utils.instantiate(
            config=entry, trainer_config=agent_loop.DictConfigWrap(cfg), server_manager=FakeServer(tok),
            tokenizer=tok, processor=None, hf_model_type=None, dataset_cls=None,
            data_config=agent_loop.DictConfigWrap(cfg.data), tools=agent_loop.ToolListWrap([]))
        s = instance.settings
        assert (s.rollout.strategy, s.rollout.initial_rollouts, s.rollout.max_tool_calls, s.rollout.n_probe) == \
            ("arpo", 1, 1, 7)
        assert (s.seed, s.tools.enabled, s.tools.timeout, s.group_wait_s) == (5, ["calc"], 3.0, 0.05)
        assert s.rollout.n == 4 and s.rollout.max_response_tokens == RESPONSE_LEN
        rows = run_worker(cfg, FakeServer(tok), tok, 2, 4, agent_name="aepo_tree_cfg_test")
    finally:
        agent_loop._agent_loop_registry.pop("aepo_tree_cfg_test", None)
    assert all(r["n_tool_calls"] <= 1 for r in rows)
    assert "max_tool_calls" in {r["finish_reason"] for r in rows}  # the second call is refused
    assert all(r["m"] == 1 for r in rows)  # initial_rollouts: 1 under arpo


@pytest.mark.parametrize("options, message", [
    ({"tool_format": "hermes"}, "only tool_format=tags"),
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"temperature": 0.5}, "actor_rollout_ref.rollout.temperature"),
    ({"n": 3}, "actor_rollout_ref.rollout.n=4"),
    ({"max_response_tokens": RESPONSE_LEN + 1}, "response_length"),
    ({"n_probe": 0}, "n_probe"),
    ({"tool_config": {"enabled": ["nope"]}}, "nope"),
    ({"partial_groups": "maybe"}, "partial_groups"),
])
def test_bad_config_is_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        loop_mod.loop_settings(options, trainer_config(4))


def test_registered_under_its_name():
    entry = agent_loop._agent_loop_registry["aepo_tree"]
    assert hydra.utils.get_class(entry["_target_"]) is loop_mod.AepoTreeAgentLoop
    assert issubclass(loop_mod.AepoTreeAgentLoop, agent_loop.AgentLoopBase)
    assert loop_mod.register(losses=False) == "aepo_tree"
