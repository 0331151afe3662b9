"""The RL trainer: rollout -> reward -> advantage -> clipped policy update, one step at a time.

Every part is chosen by config (docs/algorithms.md section 6 presets fill the fields), by name
from a registry, so a new strategy, estimator or loss needs no change here:

    rollout   cfg.rollout.strategy       aepo.rollout.strategies: independent | arpo | aepo
    reward    aepo.rewards               format-gated F1 / EM / math equivalence
    advantage cfg.actor.adv_estimator    aepo.algos.advantages: grpo | rloo | reinforce_pp | aepo
    loss      cfg.actor.policy_loss      aepo.algos.losses: ppo | dapo | gppo | cispo | aepo | clip_cov | kl_cov
    extras   EPO regulariser, KL to a reference policy, DAPO dynamic sampling / overlong shaping

With `actor.lora.rank` > 0 only LoRA adapters are trained (`aepo.models.lora`; the KL reference
is the model with them disabled). A sampler engine other than the trainer's model is checked
after every sync (`aepo.rollout.sampler.sync_check`).

A step reads collect -> batch -> update -> log: `collect` rolls out and scores the prompts,
`rollout.metrics` names the batch's figures, `make_batch` builds the tensors and advantages,
`update` runs the optimizer (`train.update`), `fit` logs and checkpoints (`train.checkpoint`).
Randomness is derived from (seed, step) (`train.schedule`), so a run resumed from a checkpoint
continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import copy
import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from aepo import algos
from aepo.config import Config, check_loggers, run_config_files, save_config
from aepo.console import StepProgress, console
from aepo.data.datasets import TaskRow
from aepo.data.prompting import run_prompt
from aepo.models.lora import adapters_disabled, apply_lora, is_peft_model, policy_module, trainable_parameters
from aepo.rewards import score_trajectory
from aepo.rollout.metrics import audit_metrics, rollout_metrics
from aepo.rollout.sampler import SamplerBackend, build_backend
from aepo.rollout.sampler.sync_check import check_sync, probe_logprobs
from aepo.rollout.strategies import rollout
from aepo.train.batch import TokenBatch, collate, score_tokens, token_logprobs_and_entropy, tree_links
from aepo.train.checkpoint import (
    check_run_dir,
    latest_checkpoint,
    load_checkpoint_weights,
    load_trainer_state,
    remove_incomplete_checkpoints,
    restore_trainer_state,
    save_checkpoint,
    start_fresh,
)
from aepo.train.records import MetricsLogger
from aepo.train.schedule import lr_lambda, step_seed, step_tasks
from aepo.train.shaping import informative_groups, overlong_shaping
from aepo.train.update import UpdateStats, epo_batch_totals, micro_batch_loss
from aepo.types import Trajectory

ToolFn = Callable[[list[tuple[str, str]]], list[Any]]
PROBE_TOKENS = 64  # tokens of the probe sequence scored after every engine sync (`check_engine`)


class RLTrainer:
    """Runs `cfg.trainer.total_steps` RL steps on `tasks` and writes metrics and checkpoints."""

    def __init__(self, cfg: Config, model: torch.nn.Module, tokenizer: Any, tasks: Sequence[TaskRow],
                 tool_fn: ToolFn, out_dir: str | Path, *, ref_model: torch.nn.Module | None = None,
                 backend: SamplerBackend | None = None) -> None:
        if not tasks:
            raise ValueError("RLTrainer: no training tasks")
        a = cfg.actor
        if a.lora.rank > 0 and not is_peft_model(model):
            model = apply_lora(model, a.lora, cfg.model.path or None)
        self.cfg, self.model, self.tokenizer, self.tasks, self.tool_fn = cfg, model, tokenizer, list(tasks), tool_fn
        self.out_dir = Path(out_dir)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # a LoRA model's reference is itself with the adapters disabled (`adapters_disabled`)
        if a.kl_coef > 0 and ref_model is None and not is_peft_model(model):
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.ref_model = ref_model
        t = cfg.trainer
        self.optimizer = torch.optim.AdamW(trainable_parameters(model), lr=t.lr, betas=tuple(t.betas),
                                           weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.entropy_history = algos.EntropyHistory()
        self._prompt_cache: dict[str, list[int]] = {}
        self._audit_warned = False  # the first audit violation is warned about once
        # the sampler engine (`rollout.backend`), built at the first rollout unless given; its
        # weights are synced from self.model before the first rollout and after every update
        self.backend = backend
        self._engine_stale = True
        # pi_old from the trainer's own forward pass: configured, or forced when another engine
        # samples (its numerics differ from the trainer's)
        self.recompute_old_log_prob = a.recompute_old_log_prob or cfg.rollout.backend != "torch"

    # ------------------------------------------------------------------ data
    def _step_tasks(self, step: int, salt: int = 0) -> list[TaskRow]:
        t = self.cfg.trainer
        return step_tasks(self.tasks, step, t.prompts_per_step, t.seed, salt)

    def _prompt_ids(self, task: TaskRow) -> list[int]:
        if task.id not in self._prompt_cache:
            self._prompt_cache[task.id] = run_prompt(task.question, self.tokenizer, self.cfg)
        return self._prompt_cache[task.id]

    # ------------------------------------------------------------------ rollout + reward
    def _rollout(self, tasks: list[TaskRow], step: int, salt: int) -> tuple[list[Trajectory], dict]:
        r = self.cfg.rollout
        if self.backend is None:
            self.backend = build_backend(r, self.model, self.tokenizer, self.cfg.model.path or None)
        if self._engine_stale:
            self.backend.sync(self.model)
            self._engine_stale = False
            self.check_engine(step)
        sampler = self.backend.sampler(step_seed(self.cfg.trainer.seed, step, 1 + salt))
        prompts = [(t.id, self._prompt_ids(t)) for t in tasks]
        self.model.eval()
        with torch.no_grad():
            trajs, stats = rollout(r.strategy, prompts, sampler, self.tokenizer, self.tool_fn, r,
                                   random.Random(step_seed(self.cfg.trainer.seed, step, 2 + salt)))
        stats = {**stats, **self.backend.stats()}
        by_id, rw = {t.id: t for t in tasks}, self.cfg.reward
        for tr in trajs:
            task = by_id[tr.prompt_id]
            tr.score = s = score_trajectory(tr, task.answers, task.data_source, multi_tool_bonus=rw.multi_tool_bonus,
                                            format_penalty=rw.format_penalty, qa_metric=rw.qa_metric,
                                            tool_format=r.tool_format)
            tr.reward = float(s["reward"]) + overlong_shaping(tr, self.cfg)
        return trajs, stats

    def check_engine(self, step: int) -> float | None:
        """After a sync: the engine's log-probs of a fixed probe sequence (the first task's prompt)
        against the trainer's; SyncError stops the run when they differ by more than
        rollout.sync_tolerance. Skipped for the torch backend over the trainer's own model."""
        tol = self.cfg.rollout.sync_tolerance
        if tol <= 0 or self.backend is None or getattr(self.backend, "model", None) is policy_module(self.model):
            return None
        probe = self._prompt_ids(self.tasks[0])[:PROBE_TOKENS]
        return check_sync(probe_logprobs(self.model, probe), self.backend.probe_logprobs(probe), tol, step=step,
                          engine=f"the {self.backend.name} sampler engine")

    def collect(self, step: int) -> tuple[list[Trajectory], list[Trajectory], dict]:
        """Roll out this step's prompts -> (rows to train on, this step's first rollout batch, stats).

        With DAPO dynamic sampling, groups whose rewards are all equal are dropped and refilled
        from further prompts (at most 3 extra rollout rounds)."""
        trajs, stats = self._rollout(self._step_tasks(step), step, 0)
        if not self.cfg.actor.dynamic_sampling:
            return trajs, trajs, stats
        want = self.cfg.trainer.prompts_per_step
        kept = informative_groups(trajs)
        n_drawn = len({t.prompt_id for t in trajs})
        for salt in range(1, 4):
            if len({t.prompt_id for t in kept}) >= want:
                break
            more, _ = self._rollout(self._step_tasks(step, 1000 * salt), step, salt)
            n_drawn += len({t.prompt_id for t in more})
            seen = {t.prompt_id for t in kept}
            kept += [t for t in informative_groups(more) if t.prompt_id not in seen]
        groups = set(list(dict.fromkeys(t.prompt_id for t in kept))[:want])
        stats = {**stats, "dynamic_sampling_kept": len(groups) / max(1, n_drawn)}
        return [t for t in kept if t.prompt_id in groups], trajs, stats

    # ------------------------------------------------------------------ update
    def make_batch(self, trajs: list[Trajectory], metrics: dict[str, float] | None = None) -> TokenBatch:
        """Training tensors, advantages and (when configured) re-scored pi_old and reference
        log-probs; `metrics`, when given, receives `actor/rollout_logprob_diff`.

        A per-token estimator step (adv_estimator "aepo": the entropy factor on GRPO's A_i) is
        taken here over the whole batch with actor.adv_entropy_scope "batch", or per micro-batch
        in `update` with "micro" (docs/algorithms.md section 4); actor.tree_attribution "hard"
        trains a copied prefix token once (`algos.hard_attribution`)."""
        a = self.cfg.actor
        batch = collate(trajs, self.pad_id)
        rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float)
        name = algos.advantage_spec(a.adv_estimator).base or a.adv_estimator
        batch.advantages = algos.compute_advantages(
            name, rewards, [t.prompt_id for t in trajs], batch.loss_mask, **algos.advantage_config(a, name))
        if a.tree_attribution == "hard":
            parent, position = tree_links(trajs)
            batch.advantages, batch.loss_mask = algos.hard_attribution(
                batch.advantages, batch.loss_mask, parent, position)
        step = algos.advantage_spec(a.adv_estimator).per_token
        batch_entropy = step is not None and a.adv_entropy_scope == "batch"
        entropy = None
        if self.recompute_old_log_prob or batch_entropy:
            self.model.eval()
            scored, entropy = self._score(self.model, batch, with_entropy=batch_entropy)
        if self.recompute_old_log_prob:
            sampler_lp = batch.old_log_prob
            batch.old_log_prob = scored
            if metrics is not None:
                diff = (sampler_lp - batch.old_log_prob).abs() * batch.loss_mask
                metrics["actor/rollout_logprob_diff"] = float(diff.sum() / batch.loss_mask.sum().clamp_min(1))
        if batch_entropy:
            # the estimator's per-token step over the whole batch, once, with the entropies of the
            # policy before the update (docs/algorithms.md section 4, actor.adv_entropy_scope)
            batch.advantages = step(batch.advantages, entropy, batch.loss_mask, **algos.per_token_config(a))
        if self.ref_model is not None and a.kl_coef > 0:
            batch.ref_log_prob, _ = self._score(self.ref_model, batch)
        elif a.kl_coef > 0 and is_peft_model(self.model):
            self.model.eval()
            with adapters_disabled(self.model):
                batch.ref_log_prob, _ = self._score(self.model, batch)
        return batch

    def _score(self, model: torch.nn.Module, batch: TokenBatch,
               with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`batch.score_tokens` under `model` in trainer.ppo_micro_batch_size micro-batches."""
        return score_tokens(model, batch, max(1, self.cfg.trainer.ppo_micro_batch_size),
                            self.cfg.rollout.temperature, self.device, with_entropy=with_entropy)

    def micro_advantages(self, mu: TokenBatch, entropy: torch.Tensor) -> torch.Tensor:
        """The advantages one micro-batch's loss uses: the batch's, or with actor.adv_entropy_scope
        "micro" the estimator's per-token step on them (adv_estimator "aepo": A_i (1 + alpha_H z(H_t)),
        z over this micro-batch's valid tokens of the training pass's detached `entropy`)."""
        a = self.cfg.actor
        step = algos.advantage_spec(a.adv_estimator).per_token
        if step is None or a.adv_entropy_scope == "batch":
            return mu.advantages
        return step(mu.advantages, entropy.detach(), mu.loss_mask, **algos.per_token_config(a))

    def _loss_kwargs(self) -> dict[str, Any]:
        """The loss's options from the config (`algos.policy_loss_config`), and the step's
        random generator for a loss that declares one (clip_cov)."""
        a = self.cfg.actor
        kw = algos.policy_loss_config(a)
        if "generator" in algos.loss_options(a.policy_loss):
            kw["generator"] = self._gen
        return kw

    def update(self, batch: TokenBatch, step: int) -> dict[str, float]:
        """ppo_epochs passes of mini-batch AdamW steps with gradient accumulation over micro-batches;
        the `actor/` metrics (`UpdateStats`)."""
        a, t = self.cfg.actor, self.cfg.trainer
        self.model.train()
        n = len(batch)
        mini = min(t.ppo_mini_batch_size, n)
        micro = min(t.ppo_micro_batch_size, mini)
        gen = torch.Generator().manual_seed(step_seed(t.seed, step, 3))
        self._gen = torch.Generator().manual_seed(step_seed(t.seed, step, 4))
        kw = self._loss_kwargs()
        stats = UpdateStats()
        epo_on = a.epo and step >= a.epo_start_step
        for _ in range(t.ppo_epochs):
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, mini):
                mb_idx = perm[s : s + mini]
                mb_mask = batch.loss_mask[mb_idx]
                # totals of the whole mini-batch, so micro-batch losses add up to the mini-batch loss
                totals = {"batch_num_tokens": float(mb_mask.sum()),
                          "batch_num_seqs": float((mb_mask.sum(-1) > 0).sum())}
                self.optimizer.zero_grad(set_to_none=True)
                # EPO over the mini-batch: its entropy totals first, when it spans several micro-batches
                epo_batch = (epo_batch_totals(self.model, batch, mb_idx, micro, self.cfg.rollout.temperature,
                                              self.device) if epo_on and len(mb_idx) > micro else None)
                for u in range(0, len(mb_idx), micro):
                    mu = batch.select(mb_idx[u : u + micro]).to(self.device)
                    share = len(mu) / len(mb_idx)
                    logp, ent = token_logprobs_and_entropy(self.model, mu.input_ids, None,  # right-padded
                                                           self.cfg.rollout.temperature, mask=mu.loss_mask)
                    adv = self.micro_advantages(mu, ent)
                    loss, total, m = micro_batch_loss(self.cfg, mu, logp, ent, adv, kw, totals, share, step=step,
                                                      history=self.entropy_history, epo_on=epo_on,
                                                      epo_batch=epo_batch)
                    total.backward()
                    m["pg_loss"] = float(loss.detach()) / max(share, 1e-12)
                    stats.add_micro(m, share, mu, logp, ent, adv, kw["clip_low"], kw["clip_high"])
                stats.add_grad_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip))
                self.optimizer.step()
                self._engine_stale = True
        self.scheduler.step()
        stats.update_history(self.entropy_history)
        return stats.metrics(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ loop
    def train_step(self, step: int) -> dict[str, Any]:
        """collect -> batch -> update; the step's metrics under their namespaced keys."""
        t0 = time.time()
        trajs, all_trajs, rstats = self.collect(step)
        t_roll = time.time() - t0
        metrics = rollout_metrics(all_trajs, rstats)
        audit, warned = audit_metrics(all_trajs, self.tokenizer, self.cfg.rollout.tool_format,
                                      warn=not self._audit_warned)
        self._audit_warned |= warned
        metrics.update(audit)
        batch = self.make_batch(trajs, metrics) if trajs else None
        a = self.cfg.actor
        if batch is not None and (bool(batch.advantages.abs().sum() > 0) or a.kl_coef > 0
                                  or (a.epo and step >= a.epo_start_step)):
            metrics.update(self.update(batch, step))
        else:
            # no learning signal (every group's rewards equal): skip the forward/backward passes,
            # but keep the schedule on its step count
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
            metrics["actor/skipped_update"] = 1.0
        metrics.update({"timing/rollout": t_roll, "timing/step": time.time() - t0})
        return metrics

    def resume(self) -> int:
        """Load the newest checkpoint under out_dir/checkpoints (`checkpoint.load_checkpoint_weights`,
        `restore_trainer_state`); return the step to continue from. What an interrupted save or
        prune left there is removed first."""
        remove_incomplete_checkpoints(self.out_dir / "checkpoints")
        ck = latest_checkpoint(self.out_dir / "checkpoints")
        if ck is None:
            return 0
        state = load_trainer_state(ck)
        load_checkpoint_weights(ck, self.model)
        self._engine_stale = True
        return restore_trainer_state(state, self.optimizer, self.scheduler, self.entropy_history)

    def fit(self, *, resume: bool = False, force: bool = False, progress: bool = True,
            on_step: Callable[[int, dict], None] | None = None) -> list[dict[str, Any]]:
        """Train from step 0, or with `resume` from the newest checkpoint in out_dir; the metrics of
        every step. Where the run starts is checked first (`checkpoint.check_run_dir`: a fresh run
        over checkpoints, or a resume with another config, is refused unless `force`), and said in
        one line on stderr."""
        t = self.cfg.trainer
        check_loggers(t.logger)  # a missing tracking package fails before anything is written or deleted
        plan = check_run_dir(self.out_dir, self.cfg, resume=resume, force=force)
        start = self.resume() if resume else start_fresh(self.out_dir / "checkpoints", force=force)
        if plan.note:
            console.print(plan.note, markup=False, highlight=False, soft_wrap=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out_dir / "config.yaml")
        logger = MetricsLogger(self.out_dir, [b for b in t.logger if b in ("tensorboard", "wandb")],
                               resume_step=start, config=None)
        history = []
        with StepProgress(t.total_steps, start, enabled=progress, title=f"RL {self.cfg.algo}") as bar:
            for step in range(start, t.total_steps):
                metrics = self.train_step(step)
                history.append({"step": step + 1, **metrics})
                logger.log(step + 1, metrics)
                bar.advance(metrics)
                if on_step is not None:
                    on_step(step + 1, metrics)
                if t.save_every and ((step + 1) % t.save_every == 0 or step + 1 == t.total_steps):
                    save_checkpoint(self.out_dir / "checkpoints", step + 1, self.model, self.tokenizer,
                                    self.optimizer, self.scheduler,
                                    {"entropy_history": self.entropy_history.state_dict()}, t.keep_last,
                                    text_files=run_config_files(self.cfg))
        logger.close()
        return history
