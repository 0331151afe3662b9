"""Policy losses and aggregation: forward values, gradient-factor tables, masking, dtypes, errors.

The gradient factor f of a token is defined by d(loss_t)/d(log pi_t) = -A_t * f; with
token-mean over N valid tokens the autograd gradient is -A_t * f / N.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aepo.algos import AGG_MODES, agg_loss, policy_loss, policy_loss_names

torch.set_num_threads(1)

EPS_L, EPS_H, C = 0.2, 0.2, 3.0

# One token per region: (A, r). PPO forward, and the gradient factor of each loss.
REGIONS = [
    # A,   r,    ppo loss,  ppo f, aepo f, gppo f,  name
    (1.0, 1.1, -1.1, 1.1, 1.1, 1.1, "A>0 inside"),
    (1.0, 1.5, -1.2, 0.0, 1.2, 1.2, "A>0 above"),
    (1.0, 0.5, -0.5, 0.5, 0.5, 0.5, "A>0 below"),
    (-1.0, 1.1, 1.1, 1.1, 1.1, 1.1, "A<0 inside"),
    (-1.0, 1.5, 1.5, 1.5, 1.5, 1.5, "A<0 above, below c"),
    (-1.0, 0.5, 0.8, 0.0, 0.0, 0.8, "A<0 below"),
    (-1.0, 4.0, 3.0, 0.0, 0.0, 0.0, "A<0 dual clip r>c"),
    (2.0, 4.0, -2.4, 0.0, 1.2, 1.2, "A>0 far above"),
    (-0.5, 0.9, 0.45, 0.9, 0.9, 0.9, "A<0 inside, small A"),
]


def region_batch(dtype=torch.float32):
    """One row holding every region token, old log-prob != 0 so log pi and r differ."""
    a = torch.tensor([[row[0] for row in REGIONS]], dtype=torch.float64)
    r = torch.tensor([[row[1] for row in REGIONS]], dtype=torch.float64)
    old = torch.linspace(-2.0, -0.5, a.shape[1], dtype=torch.float64).unsqueeze(0)
    logp = (old + torch.log(r)).to(dtype).requires_grad_(True)
    return logp, old.to(dtype), a.to(dtype), torch.ones_like(a, dtype=dtype)


def column(i):
    return torch.tensor([[row[i] for row in REGIONS]])


@pytest.mark.parametrize("name", ["ppo", "dapo", "gppo", "aepo"])
def test_forward_equals_ppo_dual_clip(name):
    logp, old, a, m = region_batch()
    loss, _ = policy_loss(name, logp, old, a, m, clip_high=EPS_H)
    assert loss.item() == pytest.approx(float(column(2).mean()), abs=1e-6)


@pytest.mark.parametrize("name, col", [("ppo", 3), ("dapo", 3), ("aepo", 4), ("gppo", 5)])
def test_gradient_factor_table(name, col):
    logp, old, a, m = region_batch()
    loss, _ = policy_loss(name, logp, old, a, m, clip_low=EPS_L, clip_high=EPS_H, clip_c=C)
    loss.backward()
    n = a.numel()
    expected = -a * column(col) / n
    torch.testing.assert_close(logp.grad, expected.float(), atol=1e-6, rtol=1e-5)


def test_dapo_default_clip_higher():
    # r = 1.25 with A > 0: inside dapo's 1.28 bound (gradient r), clipped by ppo's 1.2 (gradient 0)
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(1.25), requires_grad=True)
    a, m = torch.ones(1, 1), torch.ones(1, 1)
    loss, metrics = policy_loss("dapo", logp, old, a, m)
    loss.backward()
    assert loss.item() == pytest.approx(-1.25, abs=1e-6)
    assert float(logp.grad) == pytest.approx(-1.25, abs=1e-6)
    assert metrics["clipfrac_upper"] == 0.0
    logp.grad = None
    loss, metrics = policy_loss("ppo", logp, old, a, m)
    loss.backward()
    assert loss.item() == pytest.approx(-1.2, abs=1e-6) and float(logp.grad) == 0.0
    assert metrics["clipfrac_upper"] == 1.0


def test_cispo_values_and_gradient():
    logp, old, a, m = region_batch()
    loss, metrics = policy_loss("cispo", logp, old, a, m, clip_low=0.2, clip_high=0.28)
    loss.backward()
    r = column(1)
    w = r.clamp(0.8, 1.28)
    n = a.numel()
    expected_loss = float((-w * a.double() * logp.detach().double()).mean())
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    torch.testing.assert_close(logp.grad, (-w * a / n).float(), atol=1e-6, rtol=1e-5)
    assert metrics["cispo_clipfrac"] == pytest.approx(float(((r < 0.8) | (r > 1.28)).float().mean()))


def test_metrics_hand_values():
    logp, old, a, m = region_batch()
    _, metrics = policy_loss("ppo", logp, old, a, m)
    n = len(REGIONS)
    assert metrics["clipfrac_upper"] == pytest.approx(2 / n)  # A>0 above, A>0 far above
    assert metrics["clipfrac_lower"] == pytest.approx(1 / n)  # A<0 below
    assert metrics["clipfrac_dual"] == pytest.approx(1 / n)  # A<0, r=4
    expected_kl = float(-torch.log(column(1)).mean())
    assert metrics["ppo_kl"] == pytest.approx(expected_kl, abs=1e-6)


def test_clipped_token_mask_hand_values():
    """The clip mask marks exactly the tokens of clipfrac_upper / clipfrac_lower: A > 0 above
    1 + eps_h, A < 0 below 1 - eps_l; not the dual-clipped token, not masked tokens."""
    from aepo.algos.losses import clipped_token_mask

    logp, old, a, m = region_batch()
    got = clipped_token_mask(logp, old, a, m, clip_low=EPS_L, clip_high=EPS_H)
    names = [row[6] for row in REGIONS]
    assert [names[i] for i in torch.nonzero(got[0]).flatten().tolist()] == [
        "A>0 above", "A<0 below", "A>0 far above"]
    assert not got.requires_grad and got.dtype == torch.bool
    _, metrics = policy_loss("ppo", logp, old, a, m)
    assert got.float().mean().item() == pytest.approx(metrics["clipfrac_upper"] + metrics["clipfrac_lower"])
    # wider bounds: r = 1.5 is inside [0.4, 1.6], r = 0.5 is inside too; only r = 4 stays
    wide = clipped_token_mask(logp, old, a, m, clip_low=0.6, clip_high=0.6)
    assert [names[i] for i in torch.nonzero(wide[0]).flatten().tolist()] == ["A>0 far above"]
    m2 = m.clone()
    m2[0, 1] = 0.0  # "A>0 above" masked out
    got2 = clipped_token_mask(logp, old, a, m2, clip_low=EPS_L, clip_high=EPS_H)
    assert int(got2.sum()) == 2 and not bool(got2[0, 1])


# ----------------------------------------------------------------------------- independent reference


def np_ppo(logp, old, adv, el, eh, c):
    r = np.exp(np.clip(logp - old, -20, 20))
    l1, l2 = -adv * r, -adv * np.clip(r, 1 - el, 1 + eh)
    lc = np.maximum(l1, l2)
    return np.where(adv < 0, np.minimum(lc, -adv * c), lc)


def np_agg(mat, mask, mode):
    mat, mask = mat.astype(np.float64), mask.astype(np.float64)
    rows = [(mat[i] * mask[i]).sum() for i in range(mat.shape[0])]
    counts = [mask[i].sum() for i in range(mat.shape[0])]
    nonempty = [i for i in range(mat.shape[0]) if counts[i] > 0]
    if mode == "token-mean":
        return sum(rows) / max(sum(counts), 1)
    if not nonempty:
        return 0.0
    if mode == "seq-mean-token-sum-norm":
        return sum(rows[i] for i in nonempty) / len(nonempty) / mat.shape[1]
    if mode == "seq-mean-token-sum":
        return sum(rows[i] for i in nonempty) / len(nonempty)
    return sum(rows[i] / counts[i] for i in nonempty) / len(nonempty)


def random_batch(seed, B=5, T=8, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * spread
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.75).float()
    mask[1] = 0.0
    return logp, old, adv, mask


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", range(3))
def test_ppo_against_numpy_reference_every_agg(mode, seed):
    logp, old, adv, mask = random_batch(seed, spread=1.0)
    loss, _ = policy_loss("ppo", logp, old, adv, mask, clip_high=0.28, agg=mode)
    mat = np_ppo(logp.double().numpy(), old.double().numpy(), adv.double().numpy(), 0.2, 0.28, 3.0)
    assert loss.item() == pytest.approx(np_agg(mat, mask.numpy(), mode), abs=1e-5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_hand_values(mode):
    mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = {
        "token-mean": (1 + 2 + 4) / 3,
        "seq-mean-token-mean": (1.5 + 4) / 2,  # the empty row is left out
        "seq-mean-token-sum": (3 + 4) / 2,
        "seq-mean-token-sum-norm": (3 + 4) / 2 / 3,  # mean over the 2 non-empty rows, / T = 3
    }[mode]
    assert float(agg_loss(mat, mask, mode)) == pytest.approx(expected)


def test_agg_loss_micro_batches_sum_to_mini_batch():
    *_, mask = random_batch(11, B=6)
    mat = torch.randn(6, 8)
    for mode in AGG_MODES:
        full = agg_loss(mat, mask, mode)
        totals = {
            "batch_num_tokens": mask.sum(),
            "batch_num_seqs": (mask.sum(-1) > 0).sum(),
        }
        parts = sum(agg_loss(mat[i : i + 2], mask[i : i + 2], mode, **totals) for i in range(0, 6, 2))
        assert float(parts) == pytest.approx(float(full), abs=1e-6), mode
    assert float(agg_loss(mat, mask, "seq-mean-token-sum-norm", loss_scale_factor=4.0)) == pytest.approx(
        float((mat * mask).sum() / (mask.sum(-1) > 0).sum() / 4.0), abs=1e-6
    )


# ----------------------------------------------------------------------------- masking properties


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["ppo", "dapo", "gppo", "cispo", "aepo", "clip_cov", "kl_cov"]),
    mode=st.sampled_from(AGG_MODES),
    seed=st.integers(0, 10_000),
    junk=st.sampled_from([0.0, 50.0, -1e4, float("nan"), float("inf")]),
)
def test_masked_tokens_never_affect_loss_or_gradient(name, mode, seed, junk):
    logp, old, adv, mask = random_batch(seed)
    opts = {"generator": torch.Generator().manual_seed(0), "clip_ratio": 0.2} if name == "clip_cov" else {}

    def run(lp, o, a):
        lp = lp.clone().requires_grad_(True)
        if name == "clip_cov":
            opts["generator"].manual_seed(0)
        loss, _ = policy_loss(name, lp, o, a, mask, agg=mode, **opts)
        loss.backward()
        return loss.detach(), lp.grad

    base_loss, base_grad = run(logp, old, adv)
    hidden = mask == 0
    loss2, grad2 = run(
        logp.masked_fill(hidden, junk), old.masked_fill(hidden, -junk), adv.masked_fill(hidden, junk)
    )
    torch.testing.assert_close(loss2, base_loss)
    torch.testing.assert_close(grad2, base_grad)
    assert torch.equal(grad2[hidden], torch.zeros_like(grad2[hidden]))


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(["ppo", "gppo", "cispo", "aepo", "kl_cov"]),
    pad=st.integers(1, 6),
    seed=st.integers(0, 999),
)
def test_token_mean_invariant_to_padding_length(name, pad, seed):
    logp, old, adv, mask = random_batch(seed)
    lp1 = logp.clone().requires_grad_(True)
    loss1, _ = policy_loss(name, lp1, old, adv, mask)
    loss1.backward()

    def padded(x, value):
        return torch.cat([x, torch.full((x.shape[0], pad), value)], dim=1)

    lp2 = padded(logp, 3.0).requires_grad_(True)
    loss2, _ = policy_loss(name, lp2, padded(old, -7.0), padded(adv, 9.0), padded(mask, 0.0))
    loss2.backward()
    torch.testing.assert_close(loss2, loss1)
    torch.testing.assert_close(lp2.grad[:, : logp.shape[1]], lp1.grad)


@pytest.mark.parametrize("name", policy_loss_names())
@pytest.mark.parametrize("mode", AGG_MODES)
def test_fully_masked_batch_gives_zero_loss_and_zero_grad(name, mode):
    logp, old, adv, _ = random_batch(3)
    lp = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(name, lp, old, adv, torch.zeros_like(adv), agg=mode)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros_like(lp.grad))
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", policy_loss_names())
def test_bf16_inputs(name):
    logp, old, adv, mask = random_batch(4)
    lp16 = logp.bfloat16().requires_grad_(True)
    loss16, _ = policy_loss(name, lp16, old.bfloat16(), adv.bfloat16(), mask.bfloat16())
    loss16.backward()
    lp32 = lp16.detach().float().requires_grad_(True)
    loss32, _ = policy_loss(name, lp32, old.bfloat16().float(), adv.bfloat16().float(), mask)
    loss32.backward()
    assert loss16.dtype == torch.float32 and lp16.grad.dtype == torch.bfloat16
    assert loss16.item() == pytest.approx(loss32.item(), abs=1e-5)
    torch.testing.assert_close(lp16.grad.float(), lp32.grad.bfloat16().float())


# ----------------------------------------------------------------------------- clip_cov / kl_cov


def np_cov(logp, adv, mask):
    v = mask > 0
    return (adv - adv[v].mean()) * (logp - logp[v].mean())


def test_clip_cov_detaches_the_single_candidate():
    # 2x4 batch, all ratios 1 (nothing clipped by PPO); only token (0, 0) has 1 < Cov < 5
    old = torch.tensor([[0.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.ones(2, 4)
    cov = np_cov(old.numpy(), adv.numpy(), mask.numpy())
    assert 1.0 < cov[0, 0] < 5.0 and (np.delete(cov.ravel(), 0) <= 1.0).all()
    loss, metrics = policy_loss("clip_cov", logp, old, adv, mask, clip_ratio=0.01)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)  # the only non-zero term was removed
    assert float(logp.grad[0, 0]) == 0.0
    assert metrics["clip_cov_frac"] == pytest.approx(1 / 8)
    # with bounds that exclude it, the token is trained as in PPO: loss -3/8, gradient -3/8
    logp.grad = None
    loss, metrics = policy_loss(
        "clip_cov", logp, old, adv, mask, clip_ratio=0.01, clip_cov_lb=6.0, clip_cov_ub=9.0
    )
    loss.backward()
    assert loss.item() == pytest.approx(-3 / 8, abs=1e-6)
    assert float(logp.grad[0, 0]) == pytest.approx(-3 / 8, abs=1e-6)
    assert metrics["clip_cov_frac"] == 0.0


def test_clip_cov_random_choice_count_and_reproducibility():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 50
    adv = torch.randn(B, T, generator=g) * 3
    old = -torch.rand(B, T, generator=g) * 3
    logp = old.clone()
    mask = torch.ones(B, T)
    cov = np_cov(logp.numpy(), adv.numpy(), mask.numpy())
    n_candidates = int(((cov > 1.0) & (cov < 5.0)).sum())
    assert n_candidates > 3
    clip_num = 3
    ratio = clip_num / (B * T)

    def run(seed):
        lp = logp.clone().requires_grad_(True)
        loss, m = policy_loss("clip_cov", lp, old, adv, mask, clip_ratio=ratio + 1e-9,
                              generator=torch.Generator().manual_seed(seed))
        loss.backward()
        return lp.grad, m

    g1, m1 = run(1)
    g2, _ = run(1)
    assert torch.equal(g1, g2)
    dropped = (g1 == 0) & (adv != 0)
    assert int(dropped.sum()) == clip_num
    assert m1["clip_cov_frac"] == pytest.approx(clip_num / (B * T))
    assert ((torch.from_numpy(cov) > 1.0) & (torch.from_numpy(cov) < 5.0))[dropped].all()


def test_kl_cov_against_reference():
    logp, old, adv, mask = random_batch(21, B=6, T=20, spread=0.3)
    lp = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss("kl_cov", lp, old, adv, mask, kl_cov_ratio=0.05, ppo_kl_coef=2.0)
    loss.backward()
    lpn, oldn, advn, mn = (x.double().numpy() for x in (logp, old, adv, mask))
    cov = np.where(mn > 0, np_cov(lpn, advn, mn), -np.inf)
    n_valid = int(mn.sum())
    k = max(1, int(n_valid * 0.05))
    top = np.argsort(-cov.ravel(), kind="stable")[:k]
    chosen = np.zeros(cov.size, bool)
    chosen[top] = True
    chosen = chosen.reshape(cov.shape)
    r = np.exp(lpn - oldn)
    mat = -advn * r + np.where(chosen, 2.0 * np.abs(lpn - oldn), 0.0)
    assert loss.item() == pytest.approx((mat * mn).sum() / n_valid, abs=1e-5)
    grad = (-advn * r + np.where(chosen, 2.0 * np.sign(lpn - oldn), 0.0)) * mn / n_valid
    np.testing.assert_allclose(lp.grad.numpy(), grad, atol=1e-6)
    assert metrics["kl_cov_frac"] == pytest.approx(k / n_valid)


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_problem():
    logp, old, adv, mask = random_batch(0)
    with pytest.raises(ValueError, match="unknown policy loss 'grpo'.*aepo"):
        policy_loss("grpo", logp, old, adv, mask)
    with pytest.raises(ValueError, match="aggregation mode 'mean'.*token-mean"):
        policy_loss("ppo", logp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match=r"\(5, 7\)"):
        policy_loss("ppo", logp, old[:, :7], adv, mask)
    with pytest.raises(ValueError, match="clip_c"):
        policy_loss("ppo", logp, old, adv, mask, clip_c=1.0)
    with pytest.raises(ValueError, match="unknown option.*kl_cov_ratio"):
        policy_loss("ppo", logp, old, adv, mask, kl_cov_ratio=0.1)
    with pytest.raises(ValueError, match="2-D"):
        policy_loss("ppo", logp[0], old[0], adv[0], mask[0])
    with pytest.raises(ValueError, match="aggregation mode"):
        agg_loss(torch.ones(2, 2), torch.ones(2, 2), "sum")
    with pytest.raises(ValueError, match="mask shape"):
        agg_loss(torch.ones(2, 2), torch.ones(2, 3), "token-mean")
