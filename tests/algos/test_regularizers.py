"""KL estimators and the EPO regulariser against hand-derived values and gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aepo.algos import (
    EntropyHistory,
    epo_band_penalty,
    epo_phase_weight,
    epo_regularizer,
    kl_penalty,
    turn_entropy_means,
)

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- kl_penalty


def np_kl(logp, ref, kind):
    logp, ref = logp.astype(np.float64), ref.astype(np.float64)
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    d = np.clip(ref - logp, -20, 20)
    return np.clip(np.exp(d) - d - 1, -10, 10)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_matches_numpy_and_gradients(kind):
    g = torch.Generator().manual_seed(0)
    ref = -torch.rand(4, 6, generator=g) * 3
    logp = (ref + torch.randn(4, 6, generator=g) * 0.8).requires_grad_(True)
    kl = kl_penalty(logp, ref, kind)
    expected = np_kl(logp.detach().numpy(), ref.numpy(), kind)
    np.testing.assert_allclose(kl.detach().numpy(), expected, atol=1e-5)
    kl.sum().backward()
    diff = (logp - ref).detach()
    expected_grad = {"k1": torch.ones_like(diff), "k2": diff, "k3": 1.0 - torch.exp(-diff)}[kind]
    torch.testing.assert_close(logp.grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_kl_hand_values_and_k3_clamp():
    logp = torch.tensor([0.0, -1.0, -30.0])
    ref = torch.tensor([0.0, 0.0, 0.0])
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.0, -1.0, -30.0])
    assert kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.0, 0.5, 450.0])
    # k3 with d = ref - logp = 1: e - 2; d = 30 -> clamp d to 20, then the value to 10
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([0.0, math.e - 2.0, 10.0], abs=1e-6)
    assert torch.equal(kl_penalty(logp, ref, "low_var_kl"), kl_penalty(logp, ref, "k3"))


def test_kl_bf16_and_errors():
    out = kl_penalty(torch.tensor([-1.0]).bfloat16(), torch.tensor([0.0]).bfloat16(), "k3")
    assert out.dtype == torch.float32 and float(out) == pytest.approx(math.e - 2.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown KL kind 'k4'.*k1, k2, k3"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        kl_penalty(torch.zeros(2), torch.zeros(3), "k1")


# ----------------------------------------------------------------------------- EPO phase weight


def test_epo_phase_weight_hand_values():
    K = 100
    assert epo_phase_weight(0, K) == pytest.approx(1.0)
    assert epo_phase_weight(25, K) == pytest.approx(1 - 0.2 * (1 - math.exp(-1.0)))
    assert epo_phase_weight(50, K) == pytest.approx(1 - 0.2 * (1 - math.exp(-2.0)))
    assert epo_phase_weight(75, K) == pytest.approx(0.8 * math.exp(-1.5))
    assert epo_phase_weight(100, K) == pytest.approx(0.8 * math.exp(-3.0))
    with pytest.raises(ValueError, match="total_steps"):
        epo_phase_weight(0, 0)
    with pytest.raises(ValueError, match="step"):
        epo_phase_weight(-1, 10)


# ----------------------------------------------------------------------------- band penalty


@pytest.mark.parametrize(
    "h, hist, value, grad",
    [
        (1.0, 1.0, 0.0, 0.0),  # inside [0.5, 1.5]
        (0.2, 1.0, 0.09, -0.6),  # below: (0.5 - 0.2)^2, d/dH = -2 * 0.3
        (2.0, 1.0, 0.25, 1.0),  # above: (2 - 1.5)^2, d/dH = 2 * 0.5
    ],
)
def test_band_penalty_values_and_gradient(h, hist, value, grad):
    ht = torch.tensor(h, requires_grad=True)
    pen = epo_band_penalty(ht, hist)
    pen.backward()
    assert float(pen.detach()) == pytest.approx(value, abs=1e-6)
    assert float(ht.grad) == pytest.approx(grad, abs=1e-6)
    pen3 = epo_band_penalty(torch.tensor(h), hist, coef=3.0)
    assert float(pen3) == pytest.approx(3 * value, abs=1e-6)


def test_band_penalty_per_turn_is_a_mean():
    h = torch.tensor([0.2, 1.0, 2.0])
    pen = epo_band_penalty(h, torch.tensor([1.0, 1.0, 1.0]))
    assert float(pen) == pytest.approx((0.09 + 0.0 + 0.25) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="kappa"):
        epo_band_penalty(h, 1.0, kappa_l=2.0, kappa_r=1.0)
    with pytest.raises(ValueError, match="h_hist shape"):
        epo_band_penalty(h, torch.ones(2))


# ----------------------------------------------------------------------------- regulariser


def test_epo_regularizer_without_history_is_entropy_bonus():
    entropy = torch.tensor([[1.0, 3.0, 50.0], [2.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    term, metrics = epo_regularizer(entropy, mask, None, step=0, total_steps=10, entropy_coef=0.01)
    term.backward()
    assert float(term.detach()) == pytest.approx(-0.01 * 2.0)
    assert metrics["epo_entropy"] == pytest.approx(2.0) and metrics["epo_band_penalty"] == 0.0
    torch.testing.assert_close(entropy.grad, -0.01 * mask / 3)


def test_epo_regularizer_with_history_value_and_gradient():
    entropy = torch.tensor([[0.1, 0.3], [0.2, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    hist = EntropyHistory()
    hist.update(1.0)
    hist.update(0.6)  # H_hist = 0.8, band [0.4, 1.2]; batch H = 0.2 -> below by 0.2
    step, K = 75, 100
    beta = 0.8 * math.exp(-1.5)
    term, metrics = epo_regularizer(entropy, mask, hist, step, K, entropy_coef=0.001, band_coef=2.0)
    term.backward()
    assert float(term.detach()) == pytest.approx(-0.001 * 0.2 + beta * 2.0 * 0.2**2, abs=1e-6)
    d_hbar = -0.001 + beta * 2.0 * 2 * (0.2 - 0.4)
    torch.testing.assert_close(entropy.grad, d_hbar * mask / 3, atol=1e-6, rtol=1e-5)
    assert metrics["epo_beta"] == pytest.approx(beta)
    assert metrics["epo_band_penalty"] == pytest.approx(2.0 * 0.04, abs=1e-6)
    # a plain float history gives the same
    term2, _ = epo_regularizer(entropy.detach(), mask, 0.8, step, K, entropy_coef=0.001, band_coef=2.0)
    assert float(term2) == pytest.approx(float(term.detach()), abs=1e-7)


def test_epo_regularizer_per_turn():
    entropy = torch.tensor([[0.1, 0.1, 2.0, 2.0], [1.0, 1.0, 1.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    turns = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 2]])
    # turn 0: H = (0.1 + 0.1 + 1 + 1) / 4 = 0.55 vs hist 1.0 -> inside [0.5, 1.5]
    # turn 1: H = 2.0 vs hist 1.0 -> above by 0.5; turn 2: H = 1.0, no history -> skipped
    means = turn_entropy_means(entropy, mask, turns)
    assert {k: round(float(v.detach()), 6) for k, v in means.items()} == {0: 0.55, 1: 2.0, 2: 1.0}
    term, metrics = epo_regularizer(entropy, mask, {0: 1.0, 1: 1.0}, 0, 10, entropy_coef=0.0, turn_ids=turns)
    term.backward()
    assert float(term.detach()) == pytest.approx((0.0 + 0.25) / 2, abs=1e-6)
    assert metrics["epo_band_turns"] == 2.0
    # only turn-1 tokens get a gradient: d/dH_t = (1/2) * 2 * 0.5 / 2 tokens
    expected = torch.zeros_like(entropy)
    expected[0, 2:] = 0.25
    torch.testing.assert_close(entropy.grad, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="per-turn"):
        epo_regularizer(entropy, mask, {0: 1.0}, 0, 10)
    with pytest.raises(ValueError, match="single value"):
        epo_regularizer(entropy, mask, 1.0, 0, 10, turn_ids=turns)


def test_epo_regularizer_per_turn_with_entropy_history():
    """The trainer passes its EntropyHistory: each turn is held to its own running mean, a turn
    without history is skipped, and the global value plays no part."""
    hist = EntropyHistory()
    hist.update(100.0)  # a global value far from every turn: must not be used
    hist.update_turns({0: 2.0, 1: 0.2})
    hist.update_turns({0: 4.0, 1: 0.6})  # running means: turn 0 -> 3.0, turn 1 -> 0.4
    entropy = torch.tensor([[1.0, 1.0, 0.8, 0.0], [1.0, 3.0, 0.8, 7.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    turns = torch.tensor([[0, 0, 1, -1], [0, 0, 1, 2]])
    # turn 0: H = 1.5 vs band [1.5, 4.5] -> inside; turn 1: H = 0.8 vs [0.2, 0.6] -> above by 0.2
    # turn 2 (H = 7) has no history -> skipped. P = (0 + 0.04) / 2 turns
    term, metrics = epo_regularizer(entropy, mask, hist, 0, 10, entropy_coef=0.0, turn_ids=turns)
    assert float(term.detach()) == pytest.approx(0.02, abs=1e-6)
    assert metrics["epo_band_turns"] == 2.0
    term.backward()
    expected = torch.zeros_like(entropy)
    expected[:, 2] = 0.5 * 2 * 0.2 / 2  # (1/2 turns) * 2 * excess / 2 tokens of turn 1
    torch.testing.assert_close(entropy.grad, expected, atol=1e-6, rtol=1e-5)
    # with the global value instead (no turn ids), the band is far off: a different penalty
    glob, _ = epo_regularizer(entropy.detach(), mask, hist, 0, 10, entropy_coef=0.0)
    assert float(glob) > 1.0


def test_epo_regularizer_fully_masked_no_nan():
    entropy = torch.rand(2, 3, requires_grad=True)
    term, metrics = epo_regularizer(entropy, torch.zeros(2, 3), 1.0, 3, 10)
    term.backward()
    assert float(term.detach()) == 0.0 and torch.equal(entropy.grad, torch.zeros(2, 3))
    assert all(math.isfinite(v) for v in metrics.values())
    with pytest.raises(ValueError, match="entropy shape"):
        epo_regularizer(torch.rand(2, 3), torch.ones(2, 4), None, 0, 10)


# ----------------------------------------------------------------------------- history


def test_entropy_history_running_means_and_state():
    hist = EntropyHistory()
    assert hist.value() is None and hist.value(turn=0) is None
    for v in (1.0, 2.0, 6.0):
        hist.update(v)
    hist.update(torch.tensor(0.5), turn=1)
    hist.update_turns({1: 1.5, 3: 2.0})
    assert hist.value() == pytest.approx(3.0)
    assert hist.value(1) == pytest.approx(1.0) and hist.value(3) == pytest.approx(2.0)
    assert hist.turns() == [1, 3]
    clone = EntropyHistory()
    clone.load_state_dict(hist.state_dict())
    assert clone.value() == hist.value() and clone.value(1) == hist.value(1) and clone.turns() == [1, 3]
    with pytest.raises(ValueError, match="finite"):
        hist.update(float("nan"))
