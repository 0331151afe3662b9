"""aepo's math against the installed verl's own implementations (`verl.trainer.ppo.core_algos`).

Where verl implements the same formula (PPO clip with dual clip, CISPO, KL-Cov, GRPO, RLOO,
REINFORCE++ baseline, the KL estimators, loss aggregation over a data-parallel global batch),
aepo must give the same values and gradients; where aepo's loss differs by design (AEPO and
GPPO keep gradients PPO's clip drops), its forward value must still equal verl's vanilla loss.
The adapters `aepo.integrations.verl.register()` puts into verl's registries are called the
way verl's actor calls them, with verl's own `ActorConfig`.

verl is not a default dependency (it pins transformers and pulls Ray), so this module skips
without it. Run it in a separate environment:
    AEPO_VENV=.venv-verl AEPO_EXTRAS=verl python3 quickstart.py test tests/test_verl_reference.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed (pip install aepo[verl])")
actor_config = pytest.importorskip("verl.workers.config.actor")

from aepo import algos  # noqa: E402
from aepo.integrations import verl as aepo_verl  # noqa: E402

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def actor_cfg(**kw) -> object:
    base = {"strategy": "fsdp", "ppo_micro_batch_size_per_gpu": 2, "rollout_n": 1}
    return actor_config.ActorConfig(**{**base, **kw})


def loss_batch(seed: int, B: int = 6, T: int = 9, spread: float = 0.5) -> dict[str, torch.Tensor]:
    """log-ratios wide enough that every clip region is visited; one fully masked row."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * spread
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.8).float()
    mask[2] = 0.0
    return {"old_log_prob": old, "log_prob": logp, "advantages": adv, "response_mask": mask}


def value_and_grad(fn, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logp = batch["log_prob"].clone().requires_grad_(True)
    out = fn({**batch, "log_prob": logp})
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


def verl_loss(name: str, cfg: object, agg: str):
    fn = core.get_policy_loss_fn(name)
    return lambda b: fn(b["old_log_prob"], b["log_prob"], b["advantages"], b["response_mask"], agg, cfg)


# ----------------------------------------------------------------------------- policy losses


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("seed", range(3))
def test_ppo_clip_equals_verl_vanilla_values_and_gradients(agg, seed):
    batch = loss_batch(seed, spread=0.8)
    cfg = actor_cfg(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    want, want_grad = value_and_grad(verl_loss("vanilla", cfg, agg), batch)
    got, got_grad = value_and_grad(
        lambda b: algos.policy_loss("ppo", b["log_prob"], b["old_log_prob"], b["advantages"], b["response_mask"],
                                    clip_low=0.2, clip_high=0.28, clip_c=3.0, agg=agg)[0], batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg,info", [
    ("token-mean", {"dp_size": 4, "batch_num_tokens": 97}),
    ("seq-mean-token-mean", {"dp_size": 2, "global_batch_size": 19}),
    ("seq-mean-token-sum", {"dp_size": 8, "global_batch_size": 40}),
    ("seq-mean-token-sum-norm", {"dp_size": 2, "global_batch_size": 11, "loss_scale_factor": 512}),
])
def test_registered_aepo_loss_forward_equals_vanilla_under_global_batch_info(agg, info):
    """Forward values agree (AEPO's clipping changes only the backward pass), including verl's
    data-parallel normalisation by the global batch."""
    aepo_verl.register(core)
    batch = loss_batch(7, spread=0.8)
    cfg = actor_cfg(clip_ratio_low=0.2, clip_ratio_high=0.28, global_batch_info=info)
    want, _ = value_and_grad(verl_loss("vanilla", cfg, agg), batch)
    for name in ("aepo", "gppo"):
        got, _ = value_and_grad(verl_loss(name, cfg, agg), batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} {agg}")


def test_registered_aepo_gradient_differs_from_vanilla_only_where_the_paper_says():
    """dL/dlogp: PPO gives 0 where r > 1 + eps_h and A > 0; AEPO gives -(1 + eps_h) A / N there
    (N = valid tokens) and PPO's value (-r A / N or 0) everywhere else."""
    aepo_verl.register(core)
    batch = loss_batch(3, spread=0.8)
    eps_h = 0.28
    cfg = actor_cfg(clip_ratio_low=0.2, clip_ratio_high=eps_h)
    _, g_ppo = value_and_grad(verl_loss("vanilla", cfg, "token-mean"), batch)
    _, g_aepo = value_and_grad(verl_loss("aepo", cfg, "token-mean"), batch)
    r = (batch["log_prob"] - batch["old_log_prob"]).exp()
    adv, mask = batch["advantages"], batch["response_mask"]
    upper = (r > 1 + eps_h) & (adv > 0) & mask.bool()
    assert int(upper.sum()) >= 3, "the batch must visit the upper clip region"
    n = mask.sum()
    torch.testing.assert_close(g_aepo[upper], -(1 + eps_h) * adv[upper] / n)
    assert torch.all(g_ppo[upper] == 0)
    torch.testing.assert_close(g_aepo[~upper], g_ppo[~upper], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_registered_cispo_equals_verl_cispo_values_and_gradients(agg):
    aepo_verl.register(core)
    batch = loss_batch(11, spread=0.8)
    info = {"dp_size": 2, "batch_num_tokens": 60, "global_batch_size": 12, "loss_scale_factor": 64}
    cfg = actor_cfg(clip_ratio_low=1.0, clip_ratio_high=0.28, global_batch_info=info)
    want, want_grad = value_and_grad(verl_loss("cispo", cfg, agg), batch)
    got, got_grad = value_and_grad(verl_loss("aepo_cispo", cfg, agg), batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def test_kl_cov_equals_verl_kl_cov_values_and_gradients():
    batch = loss_batch(5, B=8, T=40, spread=0.3)
    cfg = actor_cfg(policy_loss=actor_config.PolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=0.02, ppo_kl_coef=0.7))
    want, want_grad = value_and_grad(verl_loss("kl_cov", cfg, "token-mean"), batch)
    got, got_grad = value_and_grad(
        lambda b: algos.policy_loss("kl_cov", b["log_prob"], b["old_log_prob"], b["advantages"], b["response_mask"],
                                    kl_cov_ratio=0.02, ppo_kl_coef=0.7)[0], batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_agg_loss_equals_verl_agg_loss(agg):
    g = torch.Generator().manual_seed(2)
    mat = torch.randn(7, 11, generator=g)
    mask = (torch.rand(7, 11, generator=g) < 0.6).float()
    mask[4] = 0.0
    torch.testing.assert_close(algos.agg_loss(mat, mask, agg), core.agg_loss(mat, mask, agg))
    got = algos.agg_loss(mat, mask, agg, batch_num_tokens=50.0, batch_num_seqs=13.0, loss_scale_factor=30.0)
    want = core.agg_loss(mat, mask, agg, batch_num_tokens=50, global_batch_size=13, loss_scale_factor=30)
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype))


@pytest.mark.parametrize("ours,theirs", [("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl")])
def test_kl_estimators_equal_verl(ours, theirs):
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(5, 8, generator=g) * 4
    ref = logp + torch.randn(5, 8, generator=g)
    a = logp.clone().requires_grad_(True)
    b = logp.clone().requires_grad_(True)
    got, want = algos.kl_penalty(a, ref, ours), core.kl_penalty(b, ref, theirs)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), a)[0], torch.autograd.grad(want.sum(), b)[0])


# ----------------------------------------------------------------------------- advantages


def outcome_batch(seed: int, groups: int = 4, n: int = 5, T: int = 7):
    """Groups of n >= 2 rows with varied rewards; returns (rewards [B], index, mask, token rewards)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (groups * n,), generator=g).float() - 0.5 * torch.rand(groups * n, generator=g)
    index = np.array([f"uid{i // n}" for i in range(groups * n)], dtype=object)
    lengths = torch.randint(1, T + 1, (groups * n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    token_rewards = torch.zeros(groups * n, T)
    token_rewards[torch.arange(groups * n), lengths - 1] = rewards  # outcome reward on the last token
    return rewards, index, mask, token_rewards


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_advantage_equals_verl(norm):
    aepo_verl.register(core)
    rewards, index, mask, token_rewards = outcome_batch(0)
    want, _ = core.get_adv_estimator_fn("grpo")(token_rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    got = algos.compute_advantages("grpo", rewards, list(index), mask, norm_by_std=norm)
    torch.testing.assert_close(got, want)
    registered, _ = core.get_adv_estimator_fn("aepo_grpo")(token_rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(registered, want)


def test_rloo_advantage_equals_verl():
    rewards, index, mask, token_rewards = outcome_batch(1)
    want, _ = core.get_adv_estimator_fn("rloo")(token_rewards, mask, index)
    torch.testing.assert_close(algos.compute_advantages("rloo", rewards, list(index), mask), want)


def test_reinforce_pp_baseline_advantage_equals_verl():
    rewards, index, mask, token_rewards = outcome_batch(2)
    want, _ = core.get_adv_estimator_fn("reinforce_plus_plus_baseline")(token_rewards, mask, index)
    got = algos.compute_advantages("reinforce_pp", rewards, list(index), mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_entropy_advantage_reduces_to_verl_grpo_when_alpha_is_zero():
    aepo_verl.register(core, entropy_alpha=0.0)
    try:
        rewards, index, mask, token_rewards = outcome_batch(3)
        entropy = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0))
        want, _ = core.get_adv_estimator_fn("grpo")(token_rewards, mask, index)
        got, _ = core.get_adv_estimator_fn("aepo_entropy")(token_rewards, mask, index, entropys=entropy)
        torch.testing.assert_close(got, want)
    finally:
        aepo_verl.register(core, entropy_alpha=0.2)
