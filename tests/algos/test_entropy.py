"""Token, probe and segment entropy against hand-computed values and a float64 numpy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aepo.algos import segment_entropy, token_entropy, topk_entropy

torch.set_num_threads(1)


def np_entropy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(axis=-1)


# ----------------------------------------------------------------------------- token_entropy


def test_token_entropy_hand_values():
    # uniform over 4 -> log 4; two outcomes with p = (e^2/(1+e^2), 1/(1+e^2))
    p = 1.0 / (1.0 + math.exp(-2.0))
    two = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -float("inf"), -float("inf")]])
    h = token_entropy(logits)
    assert h.dtype == torch.float32
    assert h.tolist() == pytest.approx([math.log(4), two], abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_token_entropy_matches_numpy(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 4
    h = token_entropy(logits, temperature=temperature)
    assert h.shape == (3, 5)
    np.testing.assert_allclose(h.numpy(), np_entropy(logits.numpy(), temperature), atol=1e-5)


def test_token_entropy_gradient_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 30, generator=g, dtype=torch.float64) * 3
    x = base.clone().float().requires_grad_(True)
    token_entropy(x, temperature=0.8).sum().backward()
    ref = base.clone().requires_grad_(True)
    logp = torch.log_softmax(ref / 0.8, dim=-1)
    (-(logp.exp() * logp).sum(-1)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), ref.grad.numpy(), atol=1e-5)


def test_token_entropy_is_stable_for_huge_and_masked_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [-float("inf"), 5.0, -float("inf")]], requires_grad=True)
    h = token_entropy(logits)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(logits.grad).all()
    assert h.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_token_entropy_bf16_input():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 3, 40, generator=g) * 2).bfloat16()
    h = token_entropy(logits)
    assert h.dtype == torch.float32
    np.testing.assert_allclose(h.numpy(), np_entropy(logits.float().numpy()), atol=1e-5)


def test_token_entropy_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="logits"):
        token_entropy(torch.tensor(1.0))


# ----------------------------------------------------------------------------- topk_entropy


def test_topk_entropy_hand_value():
    # known: p = (0.5, 0.25); tail r = 0.25 on V - 2 = 8 tokens, each <= 0.25
    lp = torch.log(torch.tensor([0.5, 0.25]))
    known = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25))
    low, high = 0.25 * -math.log(0.25), 0.25 * -math.log(0.25 / 8)
    assert float(topk_entropy(lp, vocab_size=10)) == pytest.approx(known + (low + high) / 2, abs=1e-6)


def test_topk_entropy_exact_cases():
    # all mass in the top k: exact; a uniform distribution: both bounds meet
    logits = torch.tensor([2.0, 1.0, 0.0])
    lp = torch.log_softmax(logits, -1)
    assert float(topk_entropy(lp, vocab_size=50)) == pytest.approx(float(token_entropy(logits)), abs=1e-6)
    uniform = torch.full((4,), -math.log(10.0))
    assert float(topk_entropy(uniform, vocab_size=10, k=4)) == pytest.approx(math.log(10.0), abs=1e-5)


def test_topk_entropy_beats_the_top_k_sum_and_the_renormalised_top_k():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 500, generator=g) * 2.5
    lp = torch.log_softmax(logits, -1)
    exact = token_entropy(logits)
    top = torch.topk(lp, 20, dim=-1).values  # what vLLM returns
    est = topk_entropy(top, vocab_size=500, k=20)
    only_known = -(top.exp() * top).sum(-1)
    renormalised = token_entropy(top)
    err = (est - exact).abs().mean()
    assert err < 0.5 * (only_known - exact).abs().mean()
    assert err < 0.5 * (renormalised - exact).abs().mean()


def test_topk_entropy_extra_sampled_token_missing_entries_and_order():
    lp = torch.log_softmax(torch.tensor([3.0, 1.0, 0.5, -2.0, 0.0, -1.0]), -1)
    top3 = torch.topk(lp, 3).values
    with_sampled = torch.cat([top3, lp[3:4]])  # the sampled token, outside the top 3
    a = topk_entropy(with_sampled, vocab_size=6, k=3)
    b = topk_entropy(with_sampled.flip(0), vocab_size=6, k=3)
    assert float(a) == pytest.approx(float(b), abs=1e-6)
    padded = torch.cat([top3, torch.tensor([-float("inf")] * 2)])
    assert float(topk_entropy(padded, vocab_size=6, k=3)) == pytest.approx(
        float(topk_entropy(top3, vocab_size=6, k=3)), abs=1e-6)
    assert float(topk_entropy(torch.tensor([-float("inf")] * 3), vocab_size=6)) == 0.0
    with pytest.raises(ValueError, match="logprobs"):
        topk_entropy(torch.tensor(1.0), vocab_size=6)


# ----------------------------------------------------------------------------- segment_entropy


def test_segment_entropy_short_segment_is_rescaled():
    # docs/algorithms.md section 1: H_seg = (n_probe / n) * sum_{t <= n} H_t, n = min(n_probe, length)
    assert float(segment_entropy([0.5, 1.5], n_probe=20)) == pytest.approx(20.0)  # (20 / 2) * 2.0
    assert float(segment_entropy([0.5, 1.5], n_probe=20, vocab_size=100)) == pytest.approx(20.0 / math.log(100))
    assert float(segment_entropy([0.3, 0.6, 0.9], n_probe=4)) == pytest.approx(4 / 3 * 1.8)


def test_segment_entropy_long_segment_cut_at_n_probe():
    h = torch.arange(1, 31, dtype=torch.float32)  # 1..30
    for reduce in ("rescaled_sum", "sum"):  # n = n_probe: the rescale factor is 1
        assert float(segment_entropy(h, n_probe=20, reduce=reduce)) == pytest.approx(210.0)  # 1 + ... + 20
    assert float(segment_entropy(h, n_probe=20, vocab_size=50)) == pytest.approx(210.0 / math.log(50))
    assert float(segment_entropy(h, n_probe=20, reduce="mean")) == pytest.approx(10.5)


def test_segment_entropy_compat_is_the_plain_sum():
    # the released code: sum over the first n_probe, no rescale, so a short segment looks calm
    assert float(segment_entropy([0.5, 1.5], n_probe=20, reduce="sum")) == pytest.approx(2.0)
    assert float(segment_entropy([0.5, 1.5], n_probe=20, vocab_size=100, reduce="sum")) == pytest.approx(
        2.0 / math.log(100))
    assert float(segment_entropy([0.5] * 25, n_probe=20, reduce="sum")) == pytest.approx(10.0)


def test_segment_entropy_mask_selects_the_first_valid_tokens():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [9.0, 9.0, 9.0, 9.0, 9.0], [1.0, 1.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 0, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0]])
    # n_probe 2: row 0 takes 1 and 3 (n = 2); row 1 has no valid token; row 2 takes 1, 2 (n = 2)
    assert segment_entropy(h, mask, n_probe=2).tolist() == pytest.approx([4.0, 0.0, 3.0])
    # n_probe 5: row 0 has 4 valid tokens (13) -> 13 * 5 / 4; row 2 has 2 (3) -> 3 * 5 / 2
    assert segment_entropy(h, mask, n_probe=5).tolist() == pytest.approx([16.25, 0.0, 7.5])
    assert segment_entropy(h, mask, n_probe=5, reduce="sum").tolist() == pytest.approx([13.0, 0.0, 3.0])
    assert segment_entropy(h, mask, n_probe=5, reduce="mean").tolist() == pytest.approx([3.25, 0.0, 1.5])


@pytest.mark.parametrize("reduce", ["rescaled_sum", "sum", "mean"])
def test_segment_entropy_empty_is_zero(reduce):
    assert float(segment_entropy(torch.zeros(0), n_probe=20, reduce=reduce)) == 0.0
    assert float(segment_entropy([], n_probe=20, vocab_size=100, reduce=reduce)) == 0.0


def test_segment_entropy_normalised_lies_in_zero_n_probe():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 25, 64, generator=g) * 5
    seg = segment_entropy(token_entropy(logits), vocab_size=64)
    assert ((seg >= 0) & (seg <= 20)).all()
    uniform = segment_entropy(token_entropy(torch.zeros(2, 7, 64)), n_probe=20, vocab_size=64)
    assert uniform.tolist() == pytest.approx([20.0, 20.0])  # every token at log|V|: the maximum


def test_segment_entropy_bad_input():
    with pytest.raises(ValueError, match="mask shape"):
        segment_entropy(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="reduce"):
        segment_entropy(torch.zeros(3), reduce="max")
    with pytest.raises(ValueError, match="vocab_size"):
        segment_entropy(torch.zeros(3), vocab_size=1)
    with pytest.raises(ValueError, match="n_probe"):
        segment_entropy(torch.zeros(3), n_probe=0)
