"""aepo's entropy hook in verl's V1 trainer (`aepo.integrations.verl_trainer`), end to end on CPU.

The path of one training step up to the advantage, with verl's own code wherever it runs without a
GPU or a cluster: the `aepo_tree` agent loop inside verl's TransferQueue agent-loop worker
(`AgentLoopWorkerTQ`, fed the way the trainer feeds it) against the fake LLM server of
tests/test_verl_agent_loop.py; rewards written as verl's colocated reward step writes them; then
verl's `_compute_old_log_prob` with a fake actor worker group, and the `aepo_sync` trainer's
`_compute_advantage`. The fake actor is a small random next-token model whose entropies the test
recomputes on its own, so it checks that `aepo_entropy` receives exactly the actor's entropies of
each response token, and that the advantage verl stores equals `aepo.algos.compute_advantages`.

What stands in for verl's infrastructure: `MemoryTQ`, an in-process TransferQueue (keys, tags,
per-sample fields; a get assembles fields as TransferQueue's storage managers do: jagged nested
tensors, stacked scalars, NonTensorStack for the rest), and `FakeActor`. The example configs in
examples/verl/ are composed with verl's own config and checked too.

verl is not a default dependency; this module skips without it. Run it in the verl venv:
    AEPO_VENV=.venv-verl AEPO_EXTRAS=verl python3 quickstart.py test tests/test_verl_trainer.py
"""
from __future__ import annotations

import asyncio
import types
from collections import defaultdict
from typing import Any

import pytest
from repo_paths import ROOT

agent_loop = pytest.importorskip("verl.experimental.agent_loop.agent_loop",
                                 reason="verl's agent loop cannot be imported (pip install aepo[verl])")
trainer_base = pytest.importorskip("verl.trainer.ppo.v1.trainer_base",
                                   reason="verl's V1 trainer cannot be imported (pip install aepo[verl]: TransferQueue)")

import numpy as np
import torch
from omegaconf import OmegaConf
from tensordict import NonTensorData, NonTensorStack, TensorDict
from test_verl_agent_loop import TEMPLATE, FakeServer, trainer_config
from transfer_queue import KVBatchMeta
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.v1 import agent_loop_tq
from verl.utils import tensordict_utils as tu

import aepo.integrations.verl as aepo_verl
from aepo.algos import compute_advantages
from aepo.integrations import verl_agent_loop as loop_mod
from aepo.integrations import verl_trainer
from aepo.models.tokenizer import build_tokenizer

EXAMPLES = ROOT / "examples" / "verl"
K, PROMPTS, ALPHA, TEMPERATURE = 4, 3, 0.3, 0.7


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.chat_template = TEMPLATE
    return t


@pytest.fixture(autouse=True)
def registered():
    verl_trainer.register()
    yield


# ----------------------------------------------------------------------------- stand-ins


class MemoryTQ:
    """The TransferQueue calls verl's V1 trainer and agent-loop worker make, in one process."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
        self.tags: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None, **_):
        rows = _split_rows(fields, len(keys)) if fields is not None else [{} for _ in keys]
        for i, key in enumerate(keys):
            self.data[(partition_id, key)].update(rows[i])
            if tags is not None:
                self.tags[(partition_id, key)].update(tags[i])
        return KVBatchMeta(keys=list(keys), tags=[dict(self.tags[(partition_id, k)]) for k in keys],
                           partition_id=partition_id)

    async def async_kv_batch_put(self, keys, partition_id, fields=None, tags=None, **kw):
        await asyncio.sleep(0)
        return self.kv_batch_put(keys, partition_id, fields, tags, **kw)

    async def async_kv_put(self, key, partition_id, fields=None, tag=None, **_):
        await asyncio.sleep(0)
        self.tags[(partition_id, key)].update(tag or {})

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        rows = [self.data[(partition_id, k)] for k in keys]
        if not rows or any(not r for r in rows):
            raise ValueError("keys or partition were not found!")
        names = sorted(select_fields if select_fields is not None else rows[0])
        out = {}
        for name in names:
            if all(name in r for r in rows):  # fields no sample has are left out, as TransferQueue does
                out[name] = _merge([r[name] for r in rows])
        return TensorDict(out, batch_size=len(rows))

    def keys(self, partition_id: str) -> list[str]:
        return [k for (p, k), row in self.data.items() if p == partition_id and row]

    def kv_list(self, partition_id: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """{partition: {key: tags}}, or {key: tags} of one partition, as TransferQueue lists them."""
        listing: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        for (p, k), tags in self.tags.items():
            listing[p][k] = dict(tags)
        return dict(listing[partition_id]) if partition_id is not None else dict(listing)

    def kv_clear(self, keys, partition_id):
        for key in keys:
            self.data.pop((partition_id, key), None)
            self.tags.pop((partition_id, key), None)


def _split_rows(fields: TensorDict, n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for name in fields.keys():  # noqa: SIM118 - iterating a TensorDict walks its rows
        value = fields.get(name)
        if isinstance(value, NonTensorData):
            parts = [value.data] * n
        elif isinstance(value, NonTensorStack):
            parts = value.tolist()
        else:
            parts = list(value.unbind(0))
        for row, part in zip(rows, parts):
            row[name] = part
    return rows


def _merge(values: list[Any]) -> Any:
    if not all(isinstance(v, torch.Tensor) for v in values):
        return NonTensorStack(*values)
    if all(v.dim() == 0 for v in values):
        return torch.stack(values)
    return torch.nested.as_nested_tensor(values, layout=torch.jagged)


class FakeActor:
    """verl's actor worker group for `compute_log_prob`: a fixed random next-token model
    (logits from the previous token), writing per-sequence log_probs and entropies where entry j
    predicts token j + 1, as verl's workers do."""

    def __init__(self, tq: MemoryTQ, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tq = tq
        self.embed = torch.randn(211, 16, generator=g)
        self.head = torch.randn(16, vocab, generator=g) * 0.6
        self.calls: list[dict[str, Any]] = []

    def logits(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[prev_tokens % 211] @ self.head

    def compute_log_prob(self, batch: KVBatchMeta) -> KVBatchMeta:
        info = dict(batch.extra_info)
        self.calls.append(info)
        assert info["calculate_entropy"] is True and info["compute_loss"] is False
        ids = self.tq.kv_batch_get(batch.keys, batch.partition_id, ["input_ids"])["input_ids"].unbind()
        log_probs, entropies = [], []
        for seq in ids:
            logp = torch.log_softmax(self.logits(seq[:-1]) / info["temperature"], dim=-1)
            lp = logp.gather(-1, seq[1:, None]).squeeze(-1)
            ent = -(logp.exp() * logp).sum(-1)
            log_probs.append(torch.cat([lp, lp.new_zeros(1)]))
            entropies.append(torch.cat([ent, ent.new_zeros(1)]))
        fields = TensorDict({"log_probs": torch.nested.as_nested_tensor(log_probs, layout=torch.jagged),
                             "entropy": torch.nested.as_nested_tensor(entropies, layout=torch.jagged)},
                            batch_size=len(ids))
        self.tq.kv_batch_put(batch.keys, batch.partition_id, fields)
        return batch

    def response_entropies(self, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
        """H of the distribution each response token was drawn from, recomputed directly."""
        full = torch.tensor(prompt + response)
        prev = full[len(prompt) - 1: len(prompt) - 1 + len(response)]
        logp = torch.log_softmax(self.logits(prev) / temperature, dim=-1)
        return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- one step up to the advantage


def run_config(estimator: str = "aepo_entropy", **algorithm: Any):
    cfg = trainer_config(K, custom={"entropy_alpha": ALPHA})  # alpha_H reaches aepo_entropy from there
    cfg.actor_rollout_ref.rollout.temperature = TEMPERATURE
    extra = OmegaConf.create({
        "algorithm": {"adv_estimator": estimator, "use_kl_in_reward": False, "gamma": 1.0, "lam": 1.0,
                      "norm_adv_by_std_in_grpo": True, "rollout_correction": None, **algorithm},
        "actor_rollout_ref": {"actor": {"loss_agg_mode": "token-mean", "loss_scale_factor": None}},
        "trainer": {"v1": {"trainer_mode": "aepo_sync", "sync": {}}},
    })
    return OmegaConf.merge(cfg, extra)


def rollout_into_tq(cfg, tq: MemoryTQ, tok, server: FakeServer | None = None) -> list[str]:
    """PROMPTS prompts through verl's AgentLoopWorkerTQ (K aepo_tree sessions each) into `tq`;
    returns the sample keys, in verl's {uid}_{session}_{index} form."""
    worker_cls = agent_loop_tq.AgentLoopWorkerTQ.__ray_metadata__.modified_class
    w = worker_cls.__new__(worker_cls)
    w.config, w.llm_client, w.teacher_client, w.reward_loop_worker_handles = cfg, server or FakeServer(tok), None, None
    w.rollout_config = cfg.actor_rollout_ref.rollout
    w.tokenizer, w.processor, w.dataset_cls, w.hf_model_type = tok, None, None, None
    w.mm_processor_kwargs, w.distillation_enabled, w.tools = {}, False, []
    w.background_tasks = set()
    raw = np.empty(PROMPTS, dtype=object)
    raw[:] = [[{"role": "user", "content": f"question {i}"}] for i in range(PROMPTS)]
    prompts = tu.get_tensordict({"raw_prompt": raw, "uid": np.array([f"uid-{i}" for i in range(PROMPTS)], dtype=object),
                                 "index": np.arange(PROMPTS)})
    tu.assign_non_tensor_data(prompts, "global_steps", 1)

    async def main():
        await w.generate_sequences(prompts)
        await asyncio.gather(*list(w.background_tasks))

    asyncio.run(main())
    statuses = {tq.tags[("train", f"uid-{i}")].get("status") for i in range(PROMPTS)}
    assert statuses == {"finished"}, statuses
    return tq.keys("train")


def write_rewards(tq: MemoryTQ, keys: list[str], seed: int = 0) -> torch.Tensor:
    """rm_scores as verl's colocated reward step stores them (the score on the last response token)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (len(keys),), generator=g).float() / 2
    masks = tq.kv_batch_get(keys, "train", ["response_mask"])["response_mask"].unbind()
    scores = []
    for r, m in zip(rewards, masks):
        s = torch.zeros(len(m))
        s[-1] = r
        scores.append(s)
    tq.kv_batch_put(keys, "train", TensorDict({"rm_scores": torch.nested.as_nested_tensor(scores, layout=torch.jagged)},
                                              batch_size=len(keys)))
    return rewards


def make_trainer(cls, cfg, actor):
    """A V1 trainer without its __init__ (no Ray, no workers): what the advantage path reads."""
    t = cls.__new__(cls)
    t.config, t.actor_rollout_wg = cfg, actor
    return t


@pytest.fixture
def step(tok, monkeypatch):
    """One step's batch in a MemoryTQ, after verl's _compute_old_log_prob; returns what the checks need.
    The fake server's policy version (global_steps) moves on every 8 requests, as it would when
    verl updates the weights during a rollout (partial rollouts, async trainer modes)."""
    tq = MemoryTQ()
    monkeypatch.setattr(trainer_base, "tq", tq)
    monkeypatch.setattr(agent_loop_tq, "tq", tq)
    cfg = run_config()
    keys = rollout_into_tq(cfg, tq, tok, FakeServer(tok, version=lambda number: number // 8))
    rewards = write_rewards(tq, keys)
    actor = FakeActor(tq, len(tok))
    meta = KVBatchMeta(keys=keys, tags=[{"status": "success"} for _ in keys], partition_id="train")
    trainer = make_trainer(trainer_base.get_trainer_cls("aepo_sync"), cfg, actor)
    metrics: dict[str, Any] = {}
    trainer._compute_old_log_prob(meta, metrics)
    return {"tq": tq, "cfg": cfg, "keys": keys, "rewards": rewards, "actor": actor, "meta": meta,
            "trainer": trainer, "metrics": metrics}


def padded(tq: MemoryTQ, keys: list[str], name: str) -> torch.Tensor:
    return tq.kv_batch_get(keys, "train", [name])[name].to_padded_tensor(0.0)


def expected_inputs(step) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(response mask [B, T], the actor's entropies recomputed directly [B, T], uids) from the rows."""
    tq, keys, actor = step["tq"], step["keys"], step["actor"]
    data = tq.kv_batch_get(keys, "train", ["prompts", "responses", "response_mask", "uid"])
    mask = data["response_mask"].to_padded_tensor(0).float()
    entropy = torch.zeros_like(mask)
    for i, (p, r) in enumerate(zip(data["prompts"].unbind(), data["responses"].unbind())):
        entropy[i, : len(r)] = actor.response_entropies(p.tolist(), r.tolist(), TEMPERATURE)
    return mask, entropy, list(data["uid"])


def test_tree_rows_reach_the_v1_trainer(step):
    """Each prompt's K sessions form one aepo_tree tree, stored under verl's V1 keys."""
    tq, keys = step["tq"], step["keys"]
    assert len(keys) == PROMPTS * K
    data = tq.kv_batch_get(keys, "train", ["uid", "extra_fields", "response_mask", "rollout_log_probs"])
    rows_by_uid = defaultdict(list)
    for key, uid, extra in zip(keys, list(data["uid"]), list(data["extra_fields"])):
        assert key.startswith(f"{uid}_")
        rows_by_uid[uid].append(extra)
    assert sorted(rows_by_uid) == [f"uid-{i}" for i in range(PROMPTS)]
    for rows in rows_by_uid.values():
        assert sorted(r["row_id"] for r in rows) == list(range(K))
    assert any(r["parent_row_id"] is not None for rows in rows_by_uid.values() for r in rows), "no tree branched"
    masks = data["response_mask"].unbind()
    assert any(int(m.sum()) < len(m) for m in masks), "tool results should be masked out"
    assert step["actor"].calls[0]["temperature"] == TEMPERATURE
    assert "actor/entropy" in step["metrics"]


def test_v1_metrics_read_the_rows_policy_versions(step):
    """verl's V1 _compute_metrics reads min/max_global_steps from every sample's tags (written by
    AgentLoopWorkerTQ from the loop's extra_fields) as ints: the step's metrics, staleness included."""
    tq, keys, trainer = step["tq"], step["keys"], step["trainer"]
    trainer._compute_advantage(step["meta"], {})
    tags = [dict(tq.tags[("train", k)]) for k in keys]
    # what _compute_metrics needs besides the batch (set up by the trainer's __init__ and workers)
    trainer.config = OmegaConf.merge(trainer.config, {"actor_rollout_ref": {"model": {}}})
    trainer.use_critic, trainer._rollout_moe_lb_metrics_accumulator = False, None
    trainer.resource_pool_manager = types.SimpleNamespace(get_n_gpus=lambda: 1)
    metrics: dict[str, Any] = {}
    global_steps = 5
    trainer._compute_metrics(KVBatchMeta(keys=keys, tags=tags, partition_id="train"), metrics,
                             {"step": 1.0, "gen": 0.5}, global_steps, 0)
    extra = tq.kv_batch_get(keys, "train", ["extra_fields"])["extra_fields"]
    for tag, fields in zip(tags, list(extra)):
        assert (tag["min_global_steps"], tag["max_global_steps"]) == \
            (fields["min_global_steps"], fields["max_global_steps"])
        assert isinstance(tag["min_global_steps"], int) and tag["min_global_steps"] <= tag["max_global_steps"]
    lows = np.array([t["min_global_steps"] for t in tags])
    highs = np.array([t["max_global_steps"] for t in tags])
    assert metrics["training/off_policy/trajectory_spans/max"] == (highs - lows + 1).max() > 1
    assert metrics["training/off_policy/trajectory_staleness/min"] == (global_steps - 1 - highs).min()
    assert metrics["training/off_policy/trajectory_staleness_worst/max"] == (global_steps - 1 - lows).max()
    assert metrics["training/num_turns/min"] >= 3


def test_aepo_entropy_receives_the_actor_entropies(step, monkeypatch):
    seen = []

    def spy(name, *args, **kwargs):
        seen.append((name, kwargs.get("entropy")))
        return compute_advantages(name, *args, **kwargs)

    monkeypatch.setattr(aepo_verl, "compute_advantages", spy)
    step["trainer"]._compute_advantage(step["meta"], {})
    mask, entropy, _ = expected_inputs(step)
    assert [name for name, _ in seen] == ["aepo"]
    got = seen[0][1]
    assert got.shape == mask.shape
    torch.testing.assert_close(got * mask, entropy * mask, rtol=1e-5, atol=1e-6)
    # the actor's own stored values, read back by key, are the same
    torch.testing.assert_close(padded(step["tq"], step["keys"], "entropy") * mask, entropy * mask,
                               rtol=1e-5, atol=1e-6)


def test_advantage_equals_aepo_compute_advantages(step):
    step["trainer"]._compute_advantage(step["meta"], {})
    mask, entropy, uids = expected_inputs(step)
    want = compute_advantages("aepo", step["rewards"], uids, mask, entropy=entropy, alpha=ALPHA, norm_by_std=True)
    got = padded(step["tq"], step["keys"], "advantages")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded(step["tq"], step["keys"], "returns"), want, rtol=1e-5, atol=1e-6)
    grpo = compute_advantages("grpo", step["rewards"], uids, mask)
    assert grpo.abs().sum() > 0, "the rewards should not give every group the same score"
    assert not torch.allclose(got, grpo, atol=1e-4), "the entropy factor should change the advantage"
    assert core_algos.ADV_ESTIMATOR_REGISTRY["aepo_entropy"] is aepo_verl.aepo_entropy_advantage  # restored


def test_plain_verl_trainer_drops_the_entropies(step):
    """Without the hook verl calls aepo_entropy with no entropies, and the adapter says so."""
    plain = make_trainer(trainer_base.get_trainer_cls("sync"), step["cfg"], step["actor"])
    with pytest.raises(ValueError, match="needs the token entropies"):
        plain._compute_advantage(step["meta"], {})


def test_other_estimators_run_verl_unchanged(step):
    cfg = run_config("aepo_grpo")
    ours = make_trainer(trainer_base.get_trainer_cls("aepo_sync"), cfg, step["actor"])
    ours._compute_advantage(step["meta"], {})
    got = padded(step["tq"], step["keys"], "advantages")
    mask, _, uids = expected_inputs(step)
    torch.testing.assert_close(got, compute_advantages("grpo", step["rewards"], uids, mask), rtol=1e-5, atol=1e-6)


def test_bypass_mode_is_refused(step):
    cfg = run_config(rollout_correction={"bypass_mode": True})
    trainer = make_trainer(trainer_base.get_trainer_cls("aepo_sync"), cfg, step["actor"])
    with pytest.raises(ValueError, match="bypass_mode"):
        trainer._compute_advantage(step["meta"], {})


def test_bound_entropies_checks_shape_and_restores_on_error():
    original = core_algos.ADV_ESTIMATOR_REGISTRY["aepo_entropy"]
    rewards, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="shape"), verl_trainer.bound_entropies("aepo_entropy", torch.zeros(2, 4)):
        core_algos.get_adv_estimator_fn("aepo_entropy")(token_level_rewards=rewards, response_mask=mask,
                                                        index=np.array(["a", "a"], dtype=object))
    assert core_algos.ADV_ESTIMATOR_REGISTRY["aepo_entropy"] is original
    with pytest.raises(ValueError, match="not registered"), verl_trainer.bound_entropies("no_such", torch.zeros(2, 3)):
        pass


# ----------------------------------------------------------------------------- registration and examples


def test_trainer_modes_are_verl_trainers_with_verl_mode_names():
    names = verl_trainer.register()
    for mode in ("sync", "colocate_async", "separate_async"):
        assert f"aepo_{mode}" in names
        cls = trainer_base.get_trainer_cls(f"aepo_{mode}")
        assert issubclass(cls, trainer_base.get_trainer_cls(mode))
        assert issubclass(cls, verl_trainer.EntropyAdvantageMixin)
    assert {"aepo", "aepo_entropy", "aepo_tree"} <= set(names)
    assert verl_trainer.register() == names  # idempotent
    t = trainer_base.get_trainer_cls("aepo_sync").__new__(trainer_base.get_trainer_cls("aepo_sync"))
    t.trainer_mode = "aepo_sync"  # what verl's __init__ does with the configured name
    assert (t.trainer_mode, t.selected_trainer_mode) == ("sync", "aepo_sync")


@pytest.mark.parametrize("name, gpus", [("aepo_qwen3_8gpu", 8), ("smoke_1gpu", 1)])
def test_example_configs_select_aepo_in_verl(name, gpus):
    """The example configs compose with verl's own config, pass verl's config checks (its actor,
    rollout and algorithm dataclasses refuse unknown keys) and select aepo's hook, loop, loss and
    estimator; aepo_tree accepts their keys."""
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    with initialize_config_dir(config_dir=str(EXAMPLES), version_base=None):
        cfg = compose(config_name=name)
    for section in (cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout, cfg.algorithm):
        omega_conf_to_dataclass(section)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook == "aepo.integrations.verl_trainer.register"
    assert cfg.trainer.use_v1 is True and cfg.trainer.v1.trainer_mode == "aepo_sync"
    assert cfg.trainer.n_gpus_per_node == gpus
    rollout = cfg.actor_rollout_ref.rollout
    assert rollout.agent.default_agent_loop == "aepo_tree"
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "aepo"
    assert cfg.algorithm.adv_estimator == "aepo_entropy"
    assert cfg.data.train_batch_size % rollout.agent.num_workers == 0
    settings = loop_mod.loop_settings({}, cfg)
    assert settings.rollout.strategy == "aepo" and settings.rollout.n == rollout.n
    assert settings.rollout.max_response_tokens == cfg.data.max_response_length
