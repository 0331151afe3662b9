"""Advantage estimators against hand-computed values and plain-python/numpy references."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aepo.algos import advantage_names, compute_advantages, hard_attribution

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- references


def _groups(ids):
    out = defaultdict(list)
    for i, g in enumerate(ids):
        out[g].append(i)
    return out


def ref_grpo_rows(rewards, ids, norm_by_std=True, eps=1e-6):
    adv = [0.0] * len(rewards)
    for rows in _groups(ids).values():
        vals = [float(rewards[i]) for i in rows]
        if len(vals) < 2 or max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i in rows:
            adv[i] = (float(rewards[i]) - mean) / (std + eps) if norm_by_std else float(rewards[i]) - mean
    return np.array(adv)


def ref_rloo_rows(rewards, ids):
    adv = [0.0] * len(rewards)
    for rows in _groups(ids).values():
        if len(rows) < 2:
            continue
        for i in rows:
            others = [float(rewards[j]) for j in rows if j != i]
            adv[i] = float(rewards[i]) - sum(others) / len(others)
    return np.array(adv)


def ref_reinforce_pp(rewards, ids, mask):
    centered = np.zeros(len(rewards))
    for rows in _groups(ids).values():
        if len(rows) < 2:
            continue
        mean = np.mean([rewards[i] for i in rows])
        for i in rows:
            centered[i] = rewards[i] - mean
    tokens = centered[:, None] * mask
    vals = tokens[mask > 0]
    if vals.size < 2:
        return np.zeros_like(tokens)
    mu = vals.mean()
    var = ((vals - mu) ** 2).sum() / (vals.size - 1)
    return (tokens - mu) / np.sqrt(var + 1e-8) * mask


def ref_aepo(rewards, ids, mask, entropy, alpha=0.2, norm_by_std=True):
    base = ref_grpo_rows(rewards, ids, norm_by_std)
    h = entropy[mask > 0]
    z = np.zeros_like(entropy)
    if h.size >= 2 and h.std(ddof=1) > 0:
        z = (entropy - h.mean()) / h.std(ddof=1)
    return base[:, None] * (1 + alpha * z) * mask


def make_batch(seed, B=10, T=7, n_groups=3, discrete=True):
    rng = np.random.default_rng(seed)
    rewards = rng.integers(0, 2, B).astype(float) if discrete else rng.normal(size=B)
    ids = [f"q{int(g)}" for g in rng.integers(0, n_groups, B)]
    mask = (rng.random((B, T)) < 0.8).astype(float)
    mask[0] = 0.0  # one fully masked row
    entropy = rng.random((B, T)) * 3
    return rewards, ids, mask, entropy


# ----------------------------------------------------------------------------- hand-computed


def test_grpo_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    ids = ["a", "a", "a", "b", "b", "c"]  # group c has one row
    mask = torch.ones(6, 2)
    mask[1, 1] = 0
    adv = compute_advantages("grpo", rewards, ids, mask)
    # group a: mean 1/3, unbiased std sqrt(1/3) -> (2/3)/0.57735 = 1.1547, (-1/3)/0.57735 = -0.57735
    a_hi, a_lo = (2 / 3) / (math.sqrt(1 / 3) + 1e-6), (-1 / 3) / (math.sqrt(1 / 3) + 1e-6)
    expected = [[a_hi, a_hi], [a_lo, 0.0], [a_lo, a_lo], [0, 0], [0, 0], [0, 0]]
    np.testing.assert_allclose(adv.numpy(), expected, atol=1e-6)
    dr = compute_advantages("grpo", rewards, ids, mask, norm_by_std=False)
    np.testing.assert_allclose(dr[:3, 0].numpy(), [2 / 3, -1 / 3, -1 / 3], atol=1e-6)


def test_rloo_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0])
    adv = compute_advantages("rloo", rewards, torch.tensor([7, 7, 7, 9]), torch.ones(4, 1))
    # row 0: 1 - mean(0, 0) = 1; row 1: 0 - mean(1, 0) = -0.5; row 3 alone -> 0
    np.testing.assert_allclose(adv[:, 0].numpy(), [1.0, -0.5, -0.5, 0.0], atol=1e-6)


def test_reinforce_pp_hand_values():
    # centered: [0.5, -0.5] (group a), group b alone -> 0; tokens: row0 x2, row1 x1, row2 x1
    rewards = torch.tensor([1.0, 0.0, 5.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    adv = compute_advantages("reinforce_pp", rewards, ["a", "a", "b"], mask)
    vals = np.array([0.5, 0.5, -0.5, 0.0])
    mu, var = vals.mean(), vals.var(ddof=1)  # 0.125, 0.229167
    w = (vals - mu) / math.sqrt(var + 1e-8)
    np.testing.assert_allclose(adv.numpy(), [[w[0], w[1]], [w[2], 0.0], [w[3], 0.0]], atol=1e-6)


def test_aepo_hand_values():
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    entropy = torch.tensor([[1.0, 2.0], [3.0, 100.0]])  # 100 is masked: must be ignored
    adv = compute_advantages("aepo", rewards, ["g", "g"], mask, entropy=entropy, alpha=0.5)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # GRPO advantage of row 0
    z = [-1.0, 0.0, 1.0]  # valid H = 1, 2, 3: mean 2, unbiased std 1
    expected = [[a * (1 + 0.5 * z[0]), a * (1 + 0.5 * z[1])], [-a * (1 + 0.5 * z[2]), 0.0]]
    np.testing.assert_allclose(adv.numpy(), expected, atol=1e-6)


# ----------------------------------------------------------------------------- references, random


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("discrete", [True, False])
def test_estimators_match_references(seed, discrete):
    rewards, ids, mask, entropy = make_batch(seed, discrete=discrete)
    r, m, h = torch.tensor(rewards), torch.tensor(mask), torch.tensor(entropy, dtype=torch.float32)
    r32 = r.float()
    for norm in (True, False):
        got = compute_advantages("grpo", r32, ids, m, norm_by_std=norm).numpy()
        np.testing.assert_allclose(got, ref_grpo_rows(rewards, ids, norm)[:, None] * mask, atol=1e-5)
        got = compute_advantages("aepo", r32, ids, m, entropy=h, alpha=0.3, norm_by_std=norm).numpy()
        ref = ref_aepo(rewards, ids, mask, h.double().numpy(), 0.3, norm)
        np.testing.assert_allclose(got, ref, atol=1e-5)
    got = compute_advantages("rloo", r32, ids, m).numpy()
    np.testing.assert_allclose(got, ref_rloo_rows(rewards, ids)[:, None] * mask, atol=1e-5)
    got = compute_advantages("reinforce_pp", r32, ids, m).numpy()
    np.testing.assert_allclose(got, ref_reinforce_pp(rewards, ids, mask), atol=1e-5)


def test_group_ids_as_tensor_or_strings_agree_and_order_is_free():
    rewards, _, mask, _ = make_batch(5)
    ids_int = torch.tensor([3, 1, 3, 2, 1, 2, 3, 1, 2, 2])
    ids_str = [f"uid-{int(i)}" for i in ids_int]
    m = torch.tensor(mask)
    for name in ("grpo", "rloo", "reinforce_pp"):
        a = compute_advantages(name, torch.tensor(rewards).float(), ids_int, m)
        b = compute_advantages(name, torch.tensor(rewards).float(), ids_str, m)
        torch.testing.assert_close(a, b)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    a = compute_advantages("grpo", torch.tensor(rewards).float(), ids_int, m)
    b = compute_advantages("grpo", torch.tensor(rewards).float()[perm], ids_int[perm], m[perm])
    torch.testing.assert_close(a[perm], b)


# ----------------------------------------------------------------------------- degenerate cases


@settings(max_examples=40, deadline=None)
@given(
    value=st.floats(-5, 5, allow_nan=False, width=32),
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
)
def test_all_equal_groups_give_exact_zero(value, sizes):
    ids = [g for g, n in enumerate(sizes) for _ in range(n)]
    rewards = torch.full((len(ids),), value)
    mask = torch.ones(len(ids), 3)
    entropy = torch.rand(len(ids), 3)
    for name in advantage_names():
        adv = compute_advantages(name, rewards, ids, mask, entropy=entropy)
        assert torch.equal(adv, torch.zeros_like(adv)), name


def test_rounding_prone_equal_rewards_are_exactly_zero():
    # mean of three 0.1s is not exactly 0.1 in float32; the advantage must still be 0, not ~1e-2
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    adv = compute_advantages("grpo", rewards, [0, 0, 0, 1, 1, 1], torch.ones(6, 2))
    assert torch.equal(adv, torch.zeros_like(adv))


def test_single_rows_and_empty_masks_no_nan():
    rewards = torch.tensor([1.0, -1.0, 0.3])
    mask = torch.zeros(3, 4)
    for name in advantage_names():
        adv = compute_advantages(name, rewards, ["a", "b", "c"], torch.ones(3, 4), entropy=torch.rand(3, 4))
        assert torch.equal(adv, torch.zeros_like(adv)), name
        adv = compute_advantages(name, rewards, ["a", "a", "a"], mask, entropy=torch.rand(3, 4))
        assert torch.isfinite(adv).all() and torch.equal(adv, torch.zeros_like(adv)), name


def test_aepo_constant_entropy_equals_grpo_and_masked_nan_entropy_is_ignored():
    rewards, ids, mask, _ = make_batch(7)
    r, m = torch.tensor(rewards).float(), torch.tensor(mask)
    grpo = compute_advantages("grpo", r, ids, m)
    const = compute_advantages("aepo", r, ids, m, entropy=torch.full(m.shape, 0.37))
    torch.testing.assert_close(const, grpo)
    h = torch.rand(m.shape)
    h_nan = h.masked_fill(m == 0, float("nan"))
    torch.testing.assert_close(
        compute_advantages("aepo", r, ids, m, entropy=h), compute_advantages("aepo", r, ids, m, entropy=h_nan)
    )


def test_entropy_shaped_advantage_hand_values_and_aepo_is_grpo_times_it():
    from aepo.algos.advantages import entropy_shaped_advantage

    base = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    h = torch.tensor([[1.0, 2.0, 50.0], [3.0, 4.0, float("nan")]])  # masked entries ignored
    # valid H = 1, 2, 3, 4: mean 2.5, unbiased std sqrt(5/3)
    z = (torch.tensor([[1.0, 2.0], [3.0, 4.0]]) - 2.5) / math.sqrt(5 / 3)
    got = entropy_shaped_advantage(base, h, mask, alpha=0.5)
    expect = torch.zeros(2, 3)
    expect[:, :2] = base[:, :2] * (1 + 0.5 * z)
    torch.testing.assert_close(got, expect)
    assert got[:, 2].eq(0).all()
    # the registered estimator is its GRPO part through the same function
    rewards, ids, m, ent = make_batch(3)
    r, mt, ht = torch.tensor(rewards, dtype=torch.float32), torch.tensor(m), torch.tensor(ent, dtype=torch.float32)
    grpo = compute_advantages("grpo", r, ids, mt)
    torch.testing.assert_close(compute_advantages("aepo", r, ids, mt, entropy=ht, alpha=0.3),
                               entropy_shaped_advantage(grpo, ht, mt, 0.3))
    with pytest.raises(ValueError, match="shape"):
        entropy_shaped_advantage(base, h[:, :2], mask)


def test_aepo_entropy_is_detached():
    h = torch.rand(4, 3, requires_grad=True)
    adv = compute_advantages("aepo", torch.tensor([1.0, 0, 1, 0]), [0, 0, 1, 1], torch.ones(4, 3), entropy=h)
    assert not adv.requires_grad


def test_bf16_inputs():
    rewards, ids, mask, entropy = make_batch(8)
    r = torch.tensor(rewards).bfloat16()
    m = torch.tensor(mask).bfloat16()
    h = torch.tensor(entropy).bfloat16()
    adv = compute_advantages("aepo", r, ids, m, entropy=h)
    assert adv.dtype == torch.float32
    ref = ref_aepo(rewards, ids, mask, h.double().numpy())
    np.testing.assert_allclose(adv.numpy(), ref, atol=1e-5)


# ----------------------------------------------------------------------------- hard attribution


def test_hard_attribution_hand_values():
    # row 1 forked from row 0 at offset 2; row 2 forked from row 1 at offset 3; row 3 is a root
    adv_rows = torch.tensor([1.0, -1.0, 0.5, 2.0])
    mask = torch.ones(4, 4)
    mask[3, 3] = 0.0
    adv = adv_rows[:, None] * mask
    out, kept = hard_attribution(adv, mask, [None, 0, 1, -1], [None, 2, 3, None])
    m = 1 / 6  # offsets 0-1 are shared by rows 0, 1, 2: mean(1, -1, 0.5)
    expected = [[m, m, 1.0, 1.0], [0.0, 0.0, -0.25, -1.0], [0.0, 0.0, 0.0, 0.5], [2.0, 2.0, 2.0, 0.0]]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(kept.numpy(), [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 0]])
    # independent rows are unchanged
    out, kept = hard_attribution(adv, mask, [None] * 4, [None] * 4)
    torch.testing.assert_close(out, adv)
    torch.testing.assert_close(kept, mask)


def test_hard_attribution_errors():
    adv, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="cycle"):
        hard_attribution(adv, mask, [1, 0], [2, 2])
    with pytest.raises(ValueError, match="parent entries"):
        hard_attribution(adv, mask, [None, 5], [None, 1])
    with pytest.raises(ValueError, match="must be equal"):
        hard_attribution(adv, torch.ones(2, 4), [None, None], [None, None])


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_problem():
    r, m = torch.tensor([1.0, 0.0]), torch.ones(2, 3)
    with pytest.raises(ValueError, match="grpo.*rloo|valid"):
        compute_advantages("gae", r, [0, 0], m)
    with pytest.raises(ValueError, match="entropy"):
        compute_advantages("aepo", r, [0, 0], m)
    with pytest.raises(ValueError, match=r"entropy shape \(2, 4\)"):
        compute_advantages("aepo", r, [0, 0], m, entropy=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"rewards shape \(3,\)"):
        compute_advantages("grpo", torch.ones(3), [0, 0, 0], m)
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages("grpo", r, [0, 0, 1], m)
    with pytest.raises(ValueError, match="response_mask"):
        compute_advantages("grpo", r, [0, 0], torch.ones(2))
    with pytest.raises(ValueError, match="alpha"):
        compute_advantages("grpo", r, [0, 0], m, alpha=0.1)
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages("grpo", torch.tensor([1.0, float("nan")]), [0, 0], m)
