"""The RL trainer: rollout -> reward -> advantage -> clipped policy update, one step at a time.

Every part is chosen by config (docs/algorithms.md section 6 presets fill the fields), by name
from a registry, so a new strategy, estimator or loss needs no change here:

    rollout   cfg.rollout.strategy       aepo.rollout.strategies: independent | arpo | aepo
    reward    aepo.rewards               format-gated F1 / EM / math equivalence
    advantage cfg.actor.adv_estimator    aepo.algos.advantages: grpo | rloo | reinforce_pp | aepo
    loss      cfg.actor.policy_loss      aepo.algos.losses: ppo | dapo | gppo | cispo | aepo | clip_cov | kl_cov
    extras   EPO regulariser, KL to a reference policy, DAPO dynamic sampling / overlong shaping

With `actor.lora.rank` > 0 the model is wrapped with LoRA adapters (`aepo.models.lora`): only
they are trained, the KL reference is the same model with its adapters disabled (no second
copy), and checkpoints hold the adapter in peft's format. A sampler engine other than the
trainer's own model is checked after every sync (`aepo.rollout.sampler.sync_check`).

Randomness is derived from (seed, step), so a run resumed from a checkpoint continues exactly
as the uninterrupted run would have.
"""
from __future__ import annotations

import copy
import logging
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aepo import algos
from aepo.algos.losses import clipped_token_mask
from aepo.config import Config, check_loggers, run_config_files, save_config
from aepo.data.datasets import TaskRow
from aepo.data.prompting import run_prompt
from aepo.models.lora import adapters_disabled, apply_lora, is_peft_model, policy_module, trainable_parameters
from aepo.protocol import MALFORMED_CALL
from aepo.rewards import score_trajectory
from aepo.rollout.audit import audit_rows
from aepo.rollout.sampler import SamplerBackend, build_backend
from aepo.rollout.sampler.sync_check import check_sync, probe_logprobs
from aepo.rollout.strategies import rollout
from aepo.tools.runner import is_timeout
from aepo.train.batch import TokenBatch, collate, token_logprobs_and_entropy
from aepo.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_trainer_state,
    remove_incomplete_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from aepo.train.records import MetricsLogger, step_metrics
from aepo.types import ToolCall, Trajectory

ToolFn = Callable[[list[tuple[str, str]]], list[Any]]

_log = logging.getLogger(__name__)
PROBE_TOKENS = 64  # tokens of the probe sequence scored after every engine sync (`check_engine`)


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**31 - 1)


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    t = cfg.trainer

    def f(i: int) -> float:
        if t.warmup_steps and i < t.warmup_steps:
            return (i + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            span = max(1, t.total_steps - t.warmup_steps)
            progress = min(1.0, (i - t.warmup_steps) / span)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return f


def overlong_penalty(length: int, max_len: int, buffer: int, factor: float) -> float:
    """DAPO soft overlong punishment: linear from 0 at max_len-buffer to -factor at max_len."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    return -min(1.0, (length - (max_len - buffer)) / buffer) * factor


def overlong_shaping(traj: Trajectory, cfg: Config) -> float:
    """DAPO's overlong reward term of one row (docs/algorithms.md section 5): `overlong_penalty`
    with L = the tokens the policy generated (response_mask 1), so tool results never count
    against the row, L_max = rollout.max_response_tokens, buffer actor.overlong_buffer, factor
    actor.overlong_penalty. 0 when the buffer is 0 (off)."""
    a = cfg.actor
    return overlong_penalty(sum(traj.response_mask), cfg.rollout.max_response_tokens, a.overlong_buffer,
                            a.overlong_penalty)


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
            ref_model = copy.deepcopy(model).eval()
            for p in ref_model.parameters():
                p.requires_grad_(False)
        self.ref_model = ref_model
        t = cfg.trainer
        self.optimizer = torch.optim.AdamW(
            trainable_parameters(model), lr=t.lr, betas=tuple(t.betas),
            weight_decay=t.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.entropy_history = algos.EntropyHistory()
        self.step = 0
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
    def _batch_tasks(self, step: int, salt: int = 0) -> list[TaskRow]:
        """The prompts of `step`: consecutive slices of a seeded permutation per epoch."""
        n, k = len(self.tasks), self.cfg.trainer.prompts_per_step
        start = (step * k + salt * k) % max(n, 1)
        epoch = (step * k + salt * k) // max(n, 1)
        order = np.random.default_rng(step_seed(self.cfg.trainer.seed, epoch, 17)).permutation(n)
        idx = [order[(start + i) % n] for i in range(min(k, n))]
        return [self.tasks[i] for i in idx]

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
        by_id = {t.id: t for t in tasks}
        for tr in trajs:
            task = by_id[tr.prompt_id]
            s = score_trajectory(tr, task.answers, task.data_source,
                                 multi_tool_bonus=self.cfg.reward.multi_tool_bonus,
                                 format_penalty=self.cfg.reward.format_penalty,
                                 qa_metric=self.cfg.reward.qa_metric, tool_format=r.tool_format)
            tr.score = s
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
        trajs, stats = self._rollout(self._batch_tasks(step), step, 0)
        if not self.cfg.actor.dynamic_sampling:
            return trajs, trajs, stats
        want = self.cfg.trainer.prompts_per_step
        kept = _informative_groups(trajs)
        n_drawn = len({t.prompt_id for t in trajs})
        for salt in range(1, 4):
            if len({t.prompt_id for t in kept}) >= want:
                break
            more, _ = self._rollout(self._batch_tasks(step, salt=1000 * salt), step, salt)
            n_drawn += len({t.prompt_id for t in more})
            seen = {t.prompt_id for t in kept}
            kept += [t for t in _informative_groups(more) if t.prompt_id not in seen]
        groups = set(list(dict.fromkeys(t.prompt_id for t in kept))[:want])
        stats = {**stats, "dynamic_sampling_kept": len(groups) / max(1, n_drawn)}
        return [t for t in kept if t.prompt_id in groups], trajs, stats

    # ------------------------------------------------------------------ update
    def make_batch(self, trajs: list[Trajectory], metrics: dict[str, float] | None = None) -> TokenBatch:
        """Training tensors, advantages and (when configured) re-scored pi_old and reference
        log-probs; `metrics`, when given, receives `rollout_logprob_diff`.

        For an estimator with a per-token step (adv_estimator "aepo") the group part (GRPO's
        A_i) comes first; the entropy factor (1 + alpha_H z(H_t)) needs the current policy's
        entropies: with actor.adv_entropy_scope "batch" (default) one no-grad pass over the batch
        gives them and z is taken over the whole batch here; with "micro" `update` applies the
        factor per micro-batch (`micro_advantages`, docs/algorithms.md section 4). With
        actor.tree_attribution "hard", a token a branch row copied from its parent is trained
        once, with the mean advantage of the rows holding it (`algos.hard_attribution`)."""
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
                metrics["rollout_logprob_diff"] = float(diff.sum() / batch.loss_mask.sum().clamp_min(1))
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
        """log pi(token) of every response token under `model`, and with `with_entropy` the token
        entropies H_t, in micro-batches without grad (the split changes no value)."""
        micro = max(1, self.cfg.trainer.ppo_micro_batch_size)
        out = torch.zeros_like(batch.old_log_prob)
        ent_out = torch.zeros_like(batch.old_log_prob) if with_entropy else None
        with torch.no_grad():
            for s in range(0, len(batch), micro):
                ids = batch.input_ids[s : s + micro].to(self.device)
                mask = batch.loss_mask[s : s + micro]
                lp, ent = token_logprobs_and_entropy(  # rows are right-padded: no attention mask needed
                    model, ids, None, self.cfg.rollout.temperature, with_entropy=with_entropy,
                    mask=mask.to(self.device))
                out[s : s + micro] = lp.float().cpu()
                if ent_out is not None and ent is not None:
                    ent_out[s : s + micro] = ent.float().cpu()
        return out, ent_out

    def micro_advantages(self, mu: TokenBatch, entropy: torch.Tensor) -> torch.Tensor:
        """The advantages one micro-batch's loss uses: the batch's (with actor.adv_entropy_scope
        "batch" they already hold the estimator's per-token step, taken in `make_batch`), or with
        scope "micro" the estimator's per-token step on them (adv_estimator "aepo":
        A_i (1 + alpha_H z(H_t)) with z over this micro-batch's valid tokens of `entropy`), with
        the detached entropies of the training forward pass (not the sampler's `rollout_entropy`)."""
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
        """ppo_epochs passes of mini-batch AdamW steps with gradient accumulation over micro-batches."""
        cfg, a, t = self.cfg, self.cfg.actor, self.cfg.trainer
        self.model.train()
        n = len(batch)
        mini = min(t.ppo_mini_batch_size, n)
        micro = min(t.ppo_micro_batch_size, mini)
        gen = torch.Generator().manual_seed(step_seed(t.seed, step, 3))
        self._gen = torch.Generator().manual_seed(step_seed(t.seed, step, 4))
        kw = self._loss_kwargs()
        sums: Counter = Counter()
        counts: Counter = Counter()
        entropy_means = []
        tok: Counter = Counter()  # token-weighted sums over the step: entropies, advantages
        turn_sum: Counter = Counter()  # per turn index: entropy sum and token count
        turn_n: Counter = Counter()
        for _ in range(t.ppo_epochs):
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, mini):
                mb_idx = perm[s : s + mini]
                mb_mask = batch.loss_mask[mb_idx]
                # totals of the whole mini-batch, so micro-batch losses add up to the mini-batch loss
                totals = {"batch_num_tokens": float(mb_mask.sum()),
                          "batch_num_seqs": float((mb_mask.sum(-1) > 0).sum())}
                self.optimizer.zero_grad(set_to_none=True)
                epo_on = a.epo and step >= a.epo_start_step
                # EPO over the mini-batch: its entropy totals first, when it spans several micro-batches
                epo_batch = self._epo_batch(batch, mb_idx, micro) if epo_on and len(mb_idx) > micro else None
                for u in range(0, len(mb_idx), micro):
                    mu = batch.select(mb_idx[u : u + micro]).to(self.device)
                    share = len(mu) / len(mb_idx)
                    logp, ent = token_logprobs_and_entropy(self.model, mu.input_ids, None,  # right-padded
                                                           cfg.rollout.temperature, mask=mu.loss_mask)
                    adv = self.micro_advantages(mu, ent)
                    loss, m = algos.policy_loss(a.policy_loss, logp, mu.old_log_prob, adv,
                                                mu.loss_mask, **kw, **totals)
                    total = loss
                    if mu.ref_log_prob is not None and a.kl_coef > 0:
                        kl = algos.agg_loss(algos.kl_penalty(logp, mu.ref_log_prob, a.kl_type), mu.loss_mask,
                                            a.loss_agg_mode, **totals)
                        total = total + a.kl_coef * kl
                        m["kl_ref"] = float(kl.detach()) / max(share, 1e-12)
                    if epo_on:
                        # per turn index against each turn's own history when the batch has turn ids;
                        # with epo_batch this micro-batch's part of the mini-batch's regulariser
                        reg, rm = algos.epo_regularizer(
                            ent, mu.loss_mask, self.entropy_history, step, t.total_steps,
                            entropy_coef=a.epo_entropy_coef, kappa_l=a.epo_band_low, kappa_r=a.epo_band_high,
                            band_coef=a.epo_band_coef, turn_ids=mu.turn_ids, batch=epo_batch)
                        total = total + (reg if epo_batch is not None else share * reg)
                        m.update(rm)
                    total.backward()
                    ent_mean = float((ent.detach() * mu.loss_mask).sum() / mu.loss_mask.sum().clamp_min(1))
                    entropy_means.append(ent_mean)
                    _token_stats(tok, turn_sum, turn_n, mu, logp, ent, adv, kw)
                    m["pg_loss"] = float(loss.detach()) / max(share, 1e-12)
                    for k, v in m.items():
                        sums[k] += float(v) * share
                        counts[k] += share
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                sums["grad_norm"] += float(gn)
                counts["grad_norm"] += 1
                self.optimizer.step()
                self._engine_stale = True
        self.scheduler.step()
        if entropy_means:
            self.entropy_history.update(float(np.mean(entropy_means)))
        if turn_n:
            self.entropy_history.update_turns({k: turn_sum[k] / turn_n[k] for k in sorted(turn_n)})
        out = {k: sums[k] / max(counts[k], 1e-12) for k in sums}
        if tok["n"] > 0:
            out["entropy_all"] = tok["ent"] / tok["n"]
            out["adv_mean"] = tok["adv"] / tok["n"]
            out["adv_abs_mean"] = tok["adv_abs"] / tok["n"]
        if tok["n_clipped"] > 0:  # absent, not 0, in a step where no token was clipped
            out["entropy_clipped"] = tok["ent_clipped"] / tok["n_clipped"]
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def _epo_batch(self, batch: TokenBatch, idx: torch.Tensor, micro: int) -> algos.EpoBatch:
        """The entropy totals of the rows `idx` (one mini-batch) under the current model, by
        micro-batches without grad: what `epo_regularizer(..., batch=...)` needs so that the
        EPO band and bonus are those of the mini-batch's mean entropies (docs/algorithms.md
        section 5), whatever the micro-batch size."""
        total, count = 0.0, 0.0
        turn_sum: Counter = Counter()
        turn_n: Counter = Counter()
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for u in range(0, len(idx), micro):
                mu = batch.select(idx[u : u + micro]).to(self.device)
                _, ent = token_logprobs_and_entropy(self.model, mu.input_ids, None, self.cfg.rollout.temperature,
                                                    mask=mu.loss_mask)
                valid = mu.loss_mask.bool()
                total += float(ent[valid].double().sum())
                count += float(valid.sum())
                if mu.turn_ids is not None:
                    tids = mu.turn_ids.to(ent.device)
                    for turn in torch.unique(tids[valid & (tids >= 0)]).tolist():
                        sel = valid & (tids == turn)
                        turn_sum[int(turn)] += float(ent[sel].double().sum())
                        turn_n[int(turn)] += float(sel.sum())
        self.model.train(was_training)
        return algos.EpoBatch(n_tokens=count, h_bar=total / max(count, 1.0), turn_tokens=dict(turn_n),
                              turn_means={k: turn_sum[k] / turn_n[k] for k in turn_n})

    # ------------------------------------------------------------------ loop
    def train_step(self, step: int) -> dict[str, Any]:
        t0 = time.time()
        trajs, all_trajs, rstats = self.collect(step)
        t_roll = time.time() - t0
        metrics = rollout_metrics(all_trajs, rstats)
        metrics.update(self._audit(all_trajs))
        actor: dict[str, float] = {}
        batch = self.make_batch(trajs, actor) if trajs else None
        a = self.cfg.actor
        if batch is not None and (bool(batch.advantages.abs().sum() > 0) or a.kl_coef > 0
                                  or (a.epo and step >= a.epo_start_step)):
            actor.update(self.update(batch, step))
        else:
            # no learning signal (every group's rewards equal): skip the forward/backward passes,
            # but keep the schedule on its step count
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
            actor["skipped_update"] = 1.0
        return step_metrics(metrics, actor, {"rollout": t_roll, "step": time.time() - t0})

    def _audit(self, trajs: list[Trajectory]) -> dict[str, float]:
        """`audit/<check>`: the step's rows that break a token-level check (`aepo.rollout.audit`);
        the first violation of a run is logged as a warning, with the row and the problem."""
        found = audit_rows(trajs, self.tokenizer, self.cfg.rollout.tool_format)
        if not self._audit_warned:
            first = next(((c, v[0]) for c, v in found.items() if v), None)
            if first is not None:
                self._audit_warned = True
                warnings.warn(f"rollout audit: {first[0]} violated ({first[1]}); the metrics audit/* count such "
                              "rows every step (warned once)", RuntimeWarning, stacklevel=2)
        return {f"audit/{c}": float(len(v)) for c, v in found.items()}

    def resume(self) -> int:
        """Load the newest checkpoint under out_dir/checkpoints; return the step to continue from.

        What an interrupted save or prune left there is removed first."""
        remove_incomplete_checkpoints(self.out_dir / "checkpoints")
        ck = latest_checkpoint(self.out_dir / "checkpoints")
        if ck is None:
            return 0
        from safetensors.torch import load_file

        state = load_trainer_state(ck)
        if is_peft_model(self.model):
            self._load_adapter(ck)
            return self._restore_state(state)
        weights = {}
        for f in sorted(ck.glob("*.safetensors")):
            try:
                weights.update(load_file(str(f)))
            except Exception as e:  # noqa: BLE001 - a damaged file, whatever safetensors calls it
                raise CheckpointError(f"checkpoint {f} is corrupted ({type(e).__name__}: {e}); "
                                      f"delete {ck} to resume from the previous one") from None
        try:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # shape mismatch
            raise CheckpointError(f"checkpoint {ck} does not fit the model ({str(e).splitlines()[0]}); "
                                  "resume with the model the run started from") from None
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {ck} does not match the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}; resume with the model the run started from")
        self.model.tie_weights()
        return self._restore_state(state)

    def _load_adapter(self, ck: Path) -> None:
        """Load the adapter weights of checkpoint `ck` into the wrapped model."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from aepo.models.lora import ADAPTER_WEIGHTS

        f = ck / ADAPTER_WEIGHTS
        try:
            weights = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - missing or damaged, whatever safetensors calls it
            raise CheckpointError(f"checkpoint {ck}: its adapter {f.name} cannot be read ({type(e).__name__}: {e}); "
                                  f"delete {ck} to resume from the previous one") from None
        try:
            result = set_peft_model_state_dict(self.model, weights)
        except RuntimeError as e:  # shape mismatch: another rank or model
            raise CheckpointError(f"checkpoint {ck} does not fit the model ({str(e).splitlines()[0]}); resume with "
                                  "the model and actor.lora settings the run started from") from None
        lora_missing = [k for k in result.missing_keys if "lora_" in k]
        if lora_missing or result.unexpected_keys:
            raise CheckpointError(f"checkpoint {ck}: its adapter does not match the model's (missing "
                                  f"{lora_missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}); resume with "
                                  "the actor.lora settings the run started from")

    def _restore_state(self, state: dict[str, Any]) -> int:
        """Optimizer, scheduler, RNG and entropy history of a checkpoint; the step to continue from."""
        self._engine_stale = True
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        extra = state.get("extra", {})
        if "entropy_history" in extra:
            self.entropy_history.load_state_dict(extra["entropy_history"])
        return int(state["step"])

    def fit(self, *, resume: bool = False, force: bool = False, progress: bool = True,
            on_step: Callable[[int, dict], None] | None = None) -> list[dict[str, Any]]:
        """Train from step 0, or with `resume` from the newest checkpoint in out_dir.

        Where the run starts is checked first (`checkpoint.check_run_dir`): a fresh run into an
        out_dir that holds checkpoints is refused (RunDirError) unless `force`, which deletes
        them and starts over; a resume whose config differs from the run's saved config.yaml is
        refused unless `force`. With `resume`, one line on stderr says which step the run
        resumes from, or that there was no checkpoint and it starts at step 0."""
        from aepo.console import console
        from aepo.train.checkpoint import check_run_dir, checkpoint_dirs, prune_checkpoint

        t = self.cfg.trainer
        check_loggers(t.logger)  # a missing tracking package fails before anything is written or deleted
        plan = check_run_dir(self.out_dir, self.cfg, resume=resume, force=force)
        if resume:
            start = self.resume()
        else:
            remove_incomplete_checkpoints(self.out_dir / "checkpoints")
            if force:  # starting over: the old run's checkpoints would mix with (and prune) ours
                for ck in checkpoint_dirs(self.out_dir / "checkpoints"):
                    prune_checkpoint(ck)
            start = 0
        if plan.note:
            console.print(plan.note, markup=False, highlight=False, soft_wrap=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out_dir / "config.yaml")
        logger = MetricsLogger(self.out_dir, [b for b in t.logger if b in ("tensorboard", "wandb")],
                               resume_step=start, config=None)
        history = []
        from aepo.console import StepProgress

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


def _token_stats(tok: Counter, turn_sum: Counter, turn_n: Counter, mu: TokenBatch, logp: torch.Tensor,
                 ent: torch.Tensor, adv: torch.Tensor, kw: dict[str, Any]) -> None:
    """Add one micro-batch's token-weighted sums (valid tokens only, detached) to the step's:
    entropy of all tokens and of the tokens the policy loss clipped (`clipped_token_mask` with
    the loss's clip widths: A > 0 and r > 1 + eps_h, or A < 0 and r < 1 - eps_l), the advantages
    the loss used, and the entropy per turn index (for EPO's per-turn history)."""
    with torch.no_grad():
        valid = mu.loss_mask.bool()
        h = ent.detach().float()
        clipped = clipped_token_mask(logp, mu.old_log_prob, adv, mu.loss_mask,
                                     clip_low=kw["clip_low"], clip_high=kw["clip_high"])
        a = adv.detach().float()
        vals = torch.stack([x.double() for x in (valid.sum(), h[valid].sum(), a[valid].sum(),
                                                 a[valid].abs().sum(), clipped.sum(), h[clipped].sum())]).tolist()
        for key, v in zip(("n", "ent", "adv", "adv_abs", "n_clipped", "ent_clipped"), vals):
            tok[key] += v
        if mu.turn_ids is not None:
            sel = valid & (mu.turn_ids >= 0)
            ids = mu.turn_ids[sel]
            if ids.numel():
                s = torch.bincount(ids, weights=h[sel].double()).tolist()
                c = torch.bincount(ids).tolist()
                for k, (sk, ck) in enumerate(zip(s, c)):
                    if ck:
                        turn_sum[k] += sk
                        turn_n[k] += ck


def tree_links(trajs: Sequence[Trajectory]) -> tuple[list[int], list[int]]:
    """For `algos.hard_attribution` on a collated batch of `trajs`: per row, the batch index of
    its parent (-1 for a root) and the column where it left the parent (prompt length - 1 +
    branch_position, since column j of the batch scores token j + 1; 0 for a root).

    The parent is the row of the same prompt whose row_id is `parent_row_id`. A row whose
    parent is not in the batch is treated as a root (its copied prefix is then trained once per
    such row, as with soft attribution). A row whose response does not start with its parent's
    first branch_position tokens is a data error (ValueError)."""
    index = {(t.prompt_id, t.row_id): i for i, t in enumerate(trajs)}
    if len(index) != len(trajs):
        raise ValueError("tree_links: (prompt_id, row_id) must be unique within the batch")
    parent, position = [], []
    for t in trajs:
        j = None if t.parent_row_id is None or t.branch_position is None else index.get(
            (t.prompt_id, t.parent_row_id))
        if j is None:
            parent.append(-1)
            position.append(0)
            continue
        bp, par = t.branch_position, trajs[j]
        if (list(par.prompt_ids) != list(t.prompt_ids) or bp > len(par.response_ids)
                or list(par.response_ids[:bp]) != list(t.response_ids[:bp])):
            raise ValueError(f"row {t.prompt_id}/{t.row_id}: its first {bp} response tokens are not "
                             f"those of its parent row {t.parent_row_id}")
        parent.append(j)
        position.append(len(t.prompt_ids) - 1 + bp)
    return parent, position


def _informative_groups(trajs: list[Trajectory]) -> list[Trajectory]:
    by: dict[str, list[float]] = {}
    for t in trajs:
        by.setdefault(t.prompt_id, []).append(t.reward)
    keep = {k for k, v in by.items() if max(v) - min(v) > 1e-9}
    return [t for t in trajs if t.prompt_id in keep]


def rollout_metrics(trajs: list[Trajectory], stats: dict) -> dict[str, float]:
    """Reward, accuracy, entropy, tool use, length and branching figures of one rollout batch,
    with per-tool call counts, error and timeout rates (`tool_metrics`)."""
    from aepo.rewards.metrics import mean_diversity
    from aepo.rollout.analyses import rollout_analyses

    if not trajs:
        return {}
    rewards = np.array([t.reward for t in trajs], dtype=float)
    acc = np.array([float(t.score.get("acc", 0.0)) for t in trajs])
    ents = [e for t in trajs for e, m in zip(t.entropies, t.response_mask) if m]
    out: dict[str, float] = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "accuracy": float(acc.mean()),
        "f1": float(np.mean([float(t.score.get("f1", 0.0)) for t in trajs])),
        "format_ok": float(np.mean([float(bool(t.score.get("format_ok", False))) for t in trajs])),
        "entropy": float(np.mean(ents)) if ents else 0.0,
        "tool_calls": float(np.mean([t.n_tool_calls for t in trajs])),
        "response_length": float(np.mean([len(t.response_ids) for t in trajs])),
        "rows": float(len(trajs)),
        # tokens the sampler generated: a branch row's copied prefix was generated once, by its parent
        "generated_tokens": float(sum(sum(t.response_mask[t.branch_position or 0:]) for t in trajs)),
    }
    groups: dict[str, list[Trajectory]] = {}
    for t in trajs:
        groups.setdefault(t.prompt_id, []).append(t)
    out["diversity"] = float(mean_diversity([[t.text for t in g] for g in groups.values()]))
    for k in ("branches", "mean_l", "unique_rows", "dynamic_sampling_kept", "prefix_cache_hit_rate", "decode_steps",
              "mean_active_rows"):
        v = stats.get(k)
        if isinstance(v, (int, float)):
            out[k] = float(v)
    # whether the entropy mechanisms are live (docs/algorithms.md section 1, 3.3 item 3): the spread of
    # m over the prompts, of dH over the branch decisions, branch_rate = branched decisions /
    # decisions (one on a prompt without budget left counts as not branched), and for AEPO the
    # spread of H_root - H_tool over the pre-monitored prompts; std is the population std, and a
    # figure whose population is empty is left out
    m_values = [float(x) for x in stats.get("m") or [] if isinstance(x, (int, float))]
    if m_values:
        out.update(m_mean=float(np.mean(m_values)), m_min=min(m_values), m_max=max(m_values),
                   m_std=float(np.std(m_values)))
    decisions = [d for d in stats.get("decisions") or [] if isinstance(d, dict)]
    if decisions:
        dh = [float(d["dH"]) if d.get("dH") is not None else float(d["h_now"]) - float(d["h_init"])
              for d in decisions]
        out.update(dH_mean=float(np.mean(dh)), dH_std=float(np.std(dh)), dH_min=min(dh), dH_max=max(dh),
                   decisions=float(len(decisions)),
                   branch_rate=sum(bool(d.get("branched")) for d in decisions) / len(decisions))
    gap = [float(r) - float(t) for r, t in zip(stats.get("h_root") or [], stats.get("h_tool") or [])
           if r is not None and t is not None]
    if gap:
        out.update(h_gap_mean=float(np.mean(gap)), h_gap_std=float(np.std(gap)))
    for reason, c in Counter(t.finish_reason for t in trajs).items():
        out[f"finish/{reason}"] = c / len(trajs)
    out.update(rollout_analyses(trajs))  # the paper's analyses: consecutive high-entropy steps, concentration
    out.update(tool_metrics(trajs))
    return out


# The result text every tool format gives a call the environment could not act on (a closing
# tag without its opening tag, an empty argument, invalid JSON, an unknown tool): aepo.protocol's.
MALFORMED_CALL_PREFIX = MALFORMED_CALL
# A tool failing on more than this share of at least FAILING_TOOL_MIN_CALLS calls in a step is logged.
FAILING_TOOL_RATE = 0.5
FAILING_TOOL_MIN_CALLS = 4


def own_tool_calls(traj: Trajectory) -> list[ToolCall]:
    """The tool calls `traj` made itself, without those it inherited from its parent.

    A branch row starts as a copy of its parent's first `branch_position` response tokens,
    including the tool calls whose result segment ends there (fork_row_state); those calls ran
    once, and the parent row (also in the batch) reports them. Counting per row would count a
    call once per branch that copied it, overstating the busiest calls.
    """
    if traj.branch_position is None:
        return list(traj.tool_calls)
    inherited = sum(1 for s in traj.segments if s.role == "tool" and s.end <= traj.branch_position)
    return traj.tool_calls[inherited:]


def is_malformed_call(call: ToolCall) -> bool:
    """A call the protocol rejected before any tool ran (see MALFORMED_CALL_PREFIX)."""
    return not call.ok and call.result.startswith(MALFORMED_CALL_PREFIX)


def tool_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """Per tool name: `tools/<name>/calls`, `error_rate`, `timeout_rate` and mean `seconds`.

    Each call is counted once (`own_tool_calls`). A call failed when it is not ok or timed out,
    so error_rate >= timeout_rate. Malformed calls never reached a tool, so they do not count
    against the tool whose tag they used: they are `tools/malformed_calls` (a count) and
    `tools/malformed_rate` (their share of all calls). Calls made by an AEPO probe row that is
    not kept in the batch are not seen here. A tool that fails on most of a step's calls is
    logged as a warning (`warn_failing_tool`).
    """
    calls = [c for t in trajs for c in own_tool_calls(t)]
    if not calls:
        return {}
    malformed = [c for c in calls if is_malformed_call(c)]
    out = {"tools/malformed_calls": float(len(malformed)),
           "tools/malformed_rate": len(malformed) / len(calls)}
    by_name: dict[str, list[ToolCall]] = {}
    for c in calls:
        if not is_malformed_call(c):
            by_name.setdefault(c.name, []).append(c)
    for name, group in sorted(by_name.items()):
        failed = [c for c in group if not c.ok or is_timeout(c)]
        n = len(group)
        out[f"tools/{name}/calls"] = float(n)
        out[f"tools/{name}/error_rate"] = len(failed) / n
        out[f"tools/{name}/timeout_rate"] = sum(1 for c in group if is_timeout(c)) / n
        out[f"tools/{name}/seconds"] = float(np.mean([c.seconds for c in group]))
        warn_failing_tool(name, n, failed)
    return out


def warn_failing_tool(name: str, n_calls: int, failed: list[ToolCall]) -> None:
    """Log a warning when tool `name` failed on most (> FAILING_TOOL_RATE) of at least
    FAILING_TOOL_MIN_CALLS calls, with one error text, so a broken tool does not go unseen."""
    if n_calls < FAILING_TOOL_MIN_CALLS or len(failed) <= FAILING_TOOL_RATE * n_calls:
        return
    example = " ".join(failed[0].result.split())
    if len(example) > 300:
        example = example[:300] + " ..."
    _log.warning("tool %r failed on %d of %d calls (%.0f%%) in this step's rollout; e.g. %s",
                 name, len(failed), n_calls, 100 * len(failed) / n_calls, example)
