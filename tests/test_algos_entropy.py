"""Token, probe and segment entropy against hand-computed values and a float64 numpy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aepo.algos import segment_entropy, token_entropy, topk_probe_entropy

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


# ----------------------------------------------------------------------------- topk_probe_entropy


def test_topk_probe_hand_value():
    logits = torch.tensor([3.0, 1.0, 0.5, -2.0, 0.0])
    p = 1.0 / (1.0 + math.exp(-2.0))  # renormalised over the top-2 {3, 1}
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert float(topk_probe_entropy(logits, k=2)) == pytest.approx(expected, abs=1e-6)


def test_topk_probe_same_from_logits_or_topk_logprobs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 100, generator=g) * 3
    from_logits = topk_probe_entropy(logits, k=10)
    server_topk = torch.topk(torch.log_softmax(logits, -1), 10, dim=-1).values  # what vLLM returns
    from_logprobs = topk_probe_entropy(server_topk, k=10)
    ref = np_entropy(torch.topk(logits, 10, dim=-1).values.numpy())
    np.testing.assert_allclose(from_logits.numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(from_logprobs.numpy(), ref, atol=1e-5)


def test_topk_probe_fewer_entries_than_k_and_missing():
    x = torch.tensor([[0.0, 0.0, -float("inf")], [-float("inf")] * 3])
    h = topk_probe_entropy(x, k=10)
    assert h.tolist() == pytest.approx([math.log(2), 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        topk_probe_entropy(x, k=0)


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
