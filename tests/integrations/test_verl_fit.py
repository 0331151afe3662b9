"""verl's V1 trainer `fit()` itself, two steps of examples/verl/smoke_1gpu.yaml, on CPU.

Everything that runs without a GPU is verl's or aepo's own: the example config composed with
verl's, the `aepo_sync` trainer built by verl's `__init__`, verl's dataset and dataloader over a
parquet written by aepo's `write_verl_parquet`, verl's replay buffer, `fit()`, `step()`,
reward writing, `_compute_old_log_prob`, `_compute_advantage` (aepo_entropy through aepo's hook),
`_compute_metrics` and its logger; the `aepo_tree` loop inside verl's `AgentLoopWorkerTQ`.

Stand-ins: the TransferQueue (`MemoryTQ` of tests/test_verl_trainer.py), the actor worker group
(`FakeActor`, whose update runs the registered `aepo` loss), the agent-loop manager (runs verl's
worker in-process), the reward manager (aepo's `compute_score`) and the weight sync. The LLM
server is tests/test_verl_agent_loop.py's `FakeServer`, stamping each answer with the policy
version as verl's vLLM server and client do (`global_steps` = the version of the weights it last
loaded, `min_global_steps` / `max_global_steps` from it); the weight sync moves that version when
verl's sync trainer updates the weights after each step.

Run in the verl venv: AEPO_VENV=.venv-verl AEPO_EXTRAS=verl python3 quickstart.py test tests/test_verl_fit.py
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

agent_loop = pytest.importorskip("verl.experimental.agent_loop.agent_loop",
                                 reason="verl's agent loop cannot be imported (pip install aepo[verl])")
trainer_base = pytest.importorskip("verl.trainer.ppo.v1.trainer_base",
                                   reason="verl's V1 trainer cannot be imported (pip install aepo[verl]: TransferQueue)")

import test_verl_trainer
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from tensordict import TensorDict
from test_verl_agent_loop import TEMPLATE, FakeServer
from test_verl_trainer import EXAMPLES, FakeActor, MemoryTQ
from transfer_queue import KVBatchMeta
from verl.protocol import DataProto
from verl.trainer.ppo import core_algos, padding_utils
from verl.trainer.ppo.v1 import agent_loop_tq, replay_buffer

from aepo.data.datasets import TaskRow
from aepo.errors import ConfigError
from aepo.integrations import verl_agent_loop as loop_mod
from aepo.integrations import verl_trainer
from aepo.integrations.verl_task import compute_score, write_verl_parquet

tok, registered = test_verl_trainer.tok, test_verl_trainer.registered  # the same fixtures
class Weights:
    """verl's CheckpointEngineManager for the sync trainer: update_weights(step) loads the
    actor's weights of that step into the servers, which then stamp that version."""

    def __init__(self) -> None:
        self.version, self.updates = 0, []

    def update_weights(self, global_steps: int | None = None) -> None:
        if global_steps is not None:
            self.version = global_steps
        self.updates.append(global_steps)

    def sleep_replicas(self) -> None:
        pass


class Manager:
    """verl's AgentLoopManagerTQ with one worker, run in this process: generate_sequences starts
    verl's AgentLoopWorkerTQ on the batch and returns when its background tasks are done."""

    def __init__(self, cfg, tok, server) -> None:
        cls = agent_loop_tq.AgentLoopWorkerTQ.__ray_metadata__.modified_class
        w = cls.__new__(cls)
        w.config, w.llm_client, w.teacher_client, w.reward_loop_worker_handles = cfg, server, None, None
        w.rollout_config = cfg.actor_rollout_ref.rollout
        w.tokenizer, w.processor, w.dataset_cls, w.hf_model_type = tok, None, None, None
        w.mm_processor_kwargs, w.distillation_enabled, w.tools = {}, False, []
        w.background_tasks = set()
        self.worker, self.batches = w, 0

    def generate_sequences(self, batch) -> None:
        self.batches += 1

        async def main():
            await self.worker.generate_sequences(batch)
            await asyncio.gather(*list(self.worker.background_tasks))

        asyncio.run(main())


class Rewards:
    """verl's RewardLoopManager, colocated: aepo's compute_score on each decoded response (gold "6")."""

    reward_loop_worker_handles = None

    def __init__(self, tok) -> None:
        self.tok = tok

    def compute_rm_score(self, data: DataProto) -> DataProto:
        responses, mask = data.batch["responses"], data.batch["attention_mask"][:, -data.batch["responses"].shape[1]:]
        scores = torch.zeros(responses.shape, dtype=torch.float32)
        for i in range(len(responses)):
            n = int(mask[i].sum())
            text = self.tok.decode(responses[i][:n].tolist(), skip_special_tokens=False)
            scores[i, max(n - 1, 0)] = compute_score("gsm8k", text, "6")["score"]
        return DataProto(batch=TensorDict({"rm_scores": scores}, batch_size=len(responses)))


class TrainingActor(FakeActor):
    """FakeActor with verl's dispatch info and an update that runs the registered aepo loss on
    the step's old log-probs and advantages (ratio 1: the value is -mean advantage)."""

    def __init__(self, tq, vocab, config) -> None:
        super().__init__(tq, vocab)
        self._dispatch_info = {"actor": [0]}
        self.config, self.losses = config, []

    def update_actor(self, batch: KVBatchMeta) -> dict[str, Any]:
        data = self.tq.kv_batch_get(batch.keys, batch.partition_id, ["old_log_probs", "advantages", "response_mask"])
        mask = data["response_mask"].to_padded_tensor(0).float()
        old = data["old_log_probs"].to_padded_tensor(0.0)
        adv = data["advantages"].to_padded_tensor(0.0)
        actor = self.config.actor_rollout_ref.actor
        loss, _ = core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode)(
            old_log_prob=old, log_prob=old.clone().requires_grad_(True), advantages=adv, response_mask=mask,
            loss_agg_mode=actor.loss_agg_mode, config=OmegaConf.to_container(actor))
        self.losses.append(float(loss))
        return {"metrics": {"pg_loss": [float(loss)], "mfu": [0.0]}}


def example_config(name: str, tmp_path: Path, questions: int, *overrides: str):
    """examples/verl/NAME.yaml composed with verl's config, on parquet files of `questions`
    questions (written by aepo's write_verl_parquet), 2 prompts a step, fast waits."""
    tasks = [TaskRow(id=f"q{i}", question=f"What is 2*3? ({i})", answers=["6"], data_source="gsm8k")
             for i in range(questions)]
    files = [write_verl_parquet(tasks, tmp_path / f"{split}.parquet", tools=["calc"], max_tool_calls=2, split=split)
             for split in ("train", "val")]
    with initialize_config_dir(config_dir=str(EXAMPLES), version_base=None):
        return compose(config_name=name, overrides=[
            f"data.train_files={files[0]}", f"data.val_files={files[1]}", "data.train_batch_size=2",
            "actor_rollout_ref.actor.ppo_mini_batch_size=2", "data.dataloader_num_workers=0",
            "+actor_rollout_ref.rollout.custom.aepo.group_wait_s=0.05",
            "+actor_rollout_ref.rollout.custom.aepo.retry_backoff_s=0.01", *overrides])


def smoke_config(tmp_path: Path, *overrides: str):
    """examples/verl/smoke_1gpu.yaml on a 6-question parquet."""
    return example_config("smoke_1gpu", tmp_path, 6, *overrides)


def build_trainer(cfg, tok, monkeypatch, server: FakeServer | None = None):
    """The aepo_sync trainer from verl's __init__, with the stand-ins where `init()` would start
    Ray workers and servers."""
    tq = MemoryTQ()
    for module in (trainer_base, agent_loop_tq, replay_buffer, padding_utils):
        monkeypatch.setattr(module, "tq", tq)
    trainer = trainer_base.get_trainer_cls(cfg.trainer.v1.trainer_mode)(config=cfg)
    trainer.replay_buffer.poll_interval = 0.01
    weights = Weights()
    trainer.tokenizer, trainer.processor = tok, None
    trainer._init_dataloader()
    trainer._init_dump_executor()
    trainer.checkpoint_manager = weights
    server = server or FakeServer(tok)
    server.version = lambda number: weights.version  # the loaded weights' version, as vLLM stamps it
    trainer.reward_loop_manager = Rewards(tok)
    trainer.actor_rollout_wg = TrainingActor(tq, len(tok), cfg)
    trainer.resource_pool_manager = type("Pool", (), {"get_n_gpus": staticmethod(lambda: 1)})()
    trainer.global_steps = 0
    return trainer, Manager(cfg, tok, server), tq, weights, server


def logged_metrics(trainer, monkeypatch) -> list[tuple[int, dict]]:
    logged: list[tuple[int, dict]] = []
    from verl.utils import tracking

    monkeypatch.setattr(tracking.Tracking, "log", lambda self, data, step, **_: logged.append((step, dict(data))))
    return logged


def test_two_v1_steps_of_the_smoke_example_reach_verl_metrics(tok, tmp_path, monkeypatch):
    cfg = smoke_config(tmp_path)
    trainer, manager, _, weights, server = build_trainer(cfg, tok, monkeypatch)
    logged = logged_metrics(trainer, monkeypatch)
    trainer.fit(manager)

    assert [step for step, _ in logged] == [1, 2]
    assert weights.updates == [1, 2]  # verl's sync trainer loaded each step's weights
    k = cfg.actor_rollout_ref.rollout.n
    for step, metrics in logged:
        assert metrics["training/global_step"] == step
        # rows generated by the weights of the step before (version step - 1): one version, no staleness
        assert metrics["training/off_policy/trajectory_spans/max"] == 1
        assert metrics["training/off_policy/trajectory_staleness/max"] == 0
        assert metrics["aepo/rollout/failed_trees"] == 0 and metrics["aepo/rollout/tree_survival"] == 1.0
        assert metrics["training/num_turns/min"] >= 3  # a tool call in every row
        assert "actor/entropy" in metrics and "critic/advantages/mean" in metrics
    versions = sorted({r["extra_fields"]["global_steps"] for r in server.requests})
    assert versions == [0, 1]
    assert len(server.requests) > 0 and manager.batches == 2
    assert len(trainer.actor_rollout_wg.losses) == 2
    assert trainer.tree_stats == {"steps": 2, "trees": 2 * cfg.data.train_batch_size, "failed": 0}
    assert k == 4


def test_failed_trees_are_dropped_and_counted(tok, tmp_path, monkeypatch):
    """One prompt's tree fails for good (every request of it fails, retries too): verl trains on the
    other trees, and the step reports the dropped tree; below min_tree_fraction the step stops."""
    cfg = smoke_config(tmp_path, "trainer.total_training_steps=1", "data.shuffle=false")  # questions (0) and (1)

    class OnePromptDown(FakeServer):
        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            if "(1)" in self.tok.decode(prompt_ids):
                raise RuntimeError("replica down")
            return await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params,
                                          **kwargs)

    trainer, manager, *_ = build_trainer(cfg, tok, monkeypatch, OnePromptDown(tok))
    logged = logged_metrics(trainer, monkeypatch)
    trainer.fit(manager)
    (_, metrics), = logged
    assert metrics["aepo/rollout/failed_trees"] == 1 and metrics["aepo/rollout/tree_survival"] == 0.5
    assert len(trainer.actor_rollout_wg.losses) == 1

    cfg = smoke_config(tmp_path, "trainer.total_training_steps=1", "data.shuffle=false",
                       "+actor_rollout_ref.rollout.custom.aepo.min_tree_fraction=0.75")
    trainer, manager, *_ = build_trainer(cfg, tok, monkeypatch, OnePromptDown(tok))
    with pytest.raises(RuntimeError, match=r"1 of 2 trees failed in step 1 .*min_tree_fraction=0.75"):
        trainer.fit(manager)


def test_eight_gpu_example_survives_validation(tok, tmp_path, monkeypatch):
    """examples/verl/aepo_qwen3_8gpu.yaml (initial_rollouts 6, rollout.n 12) through verl's own
    _validate, one session per prompt: trees of one row, the clamp logged, scores for every prompt."""
    cfg = example_config("aepo_qwen3_8gpu", tmp_path, 4, "data.max_prompt_length=512",
                         "actor_rollout_ref.rollout.agent.num_workers=1",
                         "~actor_rollout_ref.rollout.custom.aepo.tool_config.search_cache",
                         "actor_rollout_ref.rollout.custom.aepo.tool_config.enabled=[calc]")
    with open_dict(cfg):
        cfg.actor_rollout_ref.model.custom_chat_template = TEMPLATE
    assert cfg.actor_rollout_ref.rollout.val_kwargs.n == 1
    assert loop_mod.loop_settings({}, cfg).rollout.initial_rollouts > 1
    trainer, manager, *_ = build_trainer(cfg, tok, monkeypatch)
    trainer.agent_loop_manager = manager
    trainer.validation_generations_logger = type("L", (), {"log": staticmethod(lambda *a, **k: None)})()
    metrics = trainer._validate()
    scored = [k for k in metrics if k.startswith(("val-core/", "val-aux/"))]
    assert scored, metrics
    assert manager.batches >= 1


def test_async_modes_refuse_trees(tok, tmp_path):
    cfg = smoke_config(tmp_path, "trainer.v1.trainer_mode=aepo_colocate_async")
    with pytest.raises(ConfigError, match="aepo_sync"):
        trainer_base.get_trainer_cls("aepo_colocate_async")(config=cfg)


def test_aepo_mode_settings_read_under_both_names(tmp_path):
    """verl's rollout skip reads trainer.v1.<configured mode>.parameter_sync_step; aepo's modes
    keep it equal to verl's own section, which the trainer reads."""
    from verl.utils.skip.rollout_skip import RolloutTqSkip

    cfg = smoke_config(tmp_path, "trainer.v1.trainer_mode=aepo_separate_async",
                       "trainer.v1.separate_async.parameter_sync_step=2",
                       "actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent")
    assert RolloutTqSkip(cfg.skip.rollout_tq, cfg).parameter_sync_step == 1  # verl alone reads the wrong section
    verl_trainer.mirror_mode_settings(cfg, "separate_async")
    assert RolloutTqSkip(cfg.skip.rollout_tq, cfg).parameter_sync_step == 2
