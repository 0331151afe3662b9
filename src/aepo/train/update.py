"""The pieces of one policy update (`RLTrainer.update`): a micro-batch's loss (policy loss, KL
to the reference, EPO regulariser), the EPO totals of a mini-batch, and `UpdateStats`, the one
accumulator of the update's counters, which emits the `actor/` metrics (docs/algorithms.md
sections 4 and 5)."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from aepo import algos
from aepo.algos.losses import clipped_token_mask
from aepo.config import Config
from aepo.train.batch import TokenBatch, token_logprobs_and_entropy

__all__ = ["UpdateStats", "epo_batch_totals", "micro_batch_loss"]


def micro_batch_loss(cfg: Config, mu: TokenBatch, logp: torch.Tensor, ent: torch.Tensor, adv: torch.Tensor,
                     kw: dict[str, Any], totals: dict[str, float], share: float, *, step: int,
                     history: algos.EntropyHistory, epo_on: bool,
                     epo_batch: algos.EpoBatch | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(policy loss, loss to backpropagate, metrics) of one micro-batch holding `share` of its
    mini-batch: the configured policy loss, plus kl_coef x KL to the reference when the batch has
    reference log-probs, plus EPO's regulariser when `epo_on` (per turn index against each turn's
    own history when the batch has turn ids; with `epo_batch` this micro-batch's part of the
    mini-batch's regulariser). `kl_ref` is scaled back to the mini-batch's."""
    a, t = cfg.actor, cfg.trainer
    loss, m = algos.policy_loss(a.policy_loss, logp, mu.old_log_prob, adv, mu.loss_mask, **kw, **totals)
    total = loss
    if mu.ref_log_prob is not None and a.kl_coef > 0:
        kl = algos.agg_loss(algos.kl_penalty(logp, mu.ref_log_prob, a.kl_type), mu.loss_mask,
                            a.loss_agg_mode, **totals)
        total = total + a.kl_coef * kl
        m["kl_ref"] = float(kl.detach()) / max(share, 1e-12)
    if epo_on:
        reg, rm = algos.epo_regularizer(
            ent, mu.loss_mask, history, step, t.total_steps,
            entropy_coef=a.epo_entropy_coef, kappa_l=a.epo_band_low, kappa_r=a.epo_band_high,
            band_coef=a.epo_band_coef, turn_ids=mu.turn_ids, batch=epo_batch)
        total = total + (reg if epo_batch is not None else share * reg)
        m.update(rm)
    return loss, total, m


def epo_batch_totals(model: torch.nn.Module, batch: TokenBatch, idx: torch.Tensor, micro: int,
                     temperature: float, device: torch.device) -> algos.EpoBatch:
    """The entropy totals of the rows `idx` (one mini-batch) under `model`, by micro-batches
    without grad: what `epo_regularizer(..., batch=...)` needs so that the EPO band and bonus are
    those of the mini-batch's mean entropies (docs/algorithms.md section 5), whatever the
    micro-batch size."""
    total, count = 0.0, 0.0
    turn_sum: Counter = Counter()
    turn_n: Counter = Counter()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for u in range(0, len(idx), micro):
            mu = batch.select(idx[u : u + micro]).to(device)
            _, ent = token_logprobs_and_entropy(model, mu.input_ids, None, temperature, mask=mu.loss_mask)
            valid = mu.loss_mask.bool()
            total += float(ent[valid].double().sum())
            count += float(valid.sum())
            if mu.turn_ids is not None:
                tids = mu.turn_ids.to(ent.device)
                for turn in torch.unique(tids[valid & (tids >= 0)]).tolist():
                    sel = valid & (tids == turn)
                    turn_sum[int(turn)] += float(ent[sel].double().sum())
                    turn_n[int(turn)] += float(sel.sum())
    model.train(was_training)
    return algos.EpoBatch(n_tokens=count, h_bar=total / max(count, 1.0), turn_tokens=dict(turn_n),
                          turn_means={k: turn_sum[k] / turn_n[k] for k in turn_n})


class UpdateStats:
    """The update's counters, added to per micro-batch and per optimizer step:

    - the loss's metrics, each weighted by the micro-batch's share of its mini-batch, and the
      grad norm per optimizer step: their means are `actor/<name>`;
    - token-weighted sums over the valid tokens (detached): entropy of all tokens
      (`actor/entropy_all`) and of the tokens the policy loss clipped (`actor/entropy_clipped`,
      `clipped_token_mask` with the loss's clip widths: A > 0 and r > 1 + eps_h, or A < 0 and
      r < 1 - eps_l; absent in a step where none was), the advantages the loss used
      (`actor/adv_mean`, `actor/adv_abs_mean`);
    - each micro-batch's mean entropy and the entropy per turn index, for EPO's history.
    """

    def __init__(self) -> None:
        self.sums: Counter = Counter()
        self.weights: Counter = Counter()
        self.tok: Counter = Counter()
        self.turn_sum: Counter = Counter()
        self.turn_n: Counter = Counter()
        self.entropy_means: list[float] = []

    def add_micro(self, metrics: dict[str, float], share: float, mu: TokenBatch, logp: torch.Tensor,
                  ent: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float) -> None:
        """One micro-batch's loss metrics (weight `share`) and token sums."""
        with torch.no_grad():
            self.entropy_means.append(float((ent.detach() * mu.loss_mask).sum() / mu.loss_mask.sum().clamp_min(1)))
            valid = mu.loss_mask.bool()
            h = ent.detach().float()
            clipped = clipped_token_mask(logp, mu.old_log_prob, adv, mu.loss_mask, clip_low=clip_low,
                                         clip_high=clip_high)
            a = adv.detach().float()
            vals = torch.stack([x.double() for x in (valid.sum(), h[valid].sum(), a[valid].sum(),
                                                     a[valid].abs().sum(), clipped.sum(), h[clipped].sum())]).tolist()
            for key, v in zip(("n", "ent", "adv", "adv_abs", "n_clipped", "ent_clipped"), vals):
                self.tok[key] += v
            if mu.turn_ids is not None:
                sel = valid & (mu.turn_ids >= 0)
                ids = mu.turn_ids[sel]
                if ids.numel():
                    s = torch.bincount(ids, weights=h[sel].double()).tolist()
                    c = torch.bincount(ids).tolist()
                    for k, (sk, ck) in enumerate(zip(s, c)):
                        if ck:
                            self.turn_sum[k] += sk
                            self.turn_n[k] += ck
        for k, v in metrics.items():
            self.sums[k] += float(v) * share
            self.weights[k] += share

    def add_grad_norm(self, grad_norm: torch.Tensor | float) -> None:
        """One optimizer step's gradient norm (before clipping)."""
        self.sums["grad_norm"] += float(grad_norm)
        self.weights["grad_norm"] += 1

    def update_history(self, history: algos.EntropyHistory) -> None:
        """Feed the step's mean entropy and per-turn entropies to EPO's history."""
        if self.entropy_means:
            history.update(float(np.mean(self.entropy_means)))
        if self.turn_n:
            history.update_turns({k: self.turn_sum[k] / self.turn_n[k] for k in sorted(self.turn_n)})

    def metrics(self, lr: float) -> dict[str, float]:
        """The update's `actor/` metrics, with the learning rate it ended at."""
        out = {f"actor/{k}": self.sums[k] / max(self.weights[k], 1e-12) for k in self.sums}
        tok = self.tok
        if tok["n"] > 0:
            out["actor/entropy_all"] = tok["ent"] / tok["n"]
            out["actor/adv_mean"] = tok["adv"] / tok["n"]
            out["actor/adv_abs_mean"] = tok["adv_abs"] / tok["n"]
        if tok["n_clipped"] > 0:  # absent, not 0, in a step where no token was clipped
            out["actor/entropy_clipped"] = tok["ent_clipped"] / tok["n_clipped"]
        out["actor/lr"] = lr
        return out
