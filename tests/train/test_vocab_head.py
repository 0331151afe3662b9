"""The chunked LM-head log-prob / entropy against direct autograd, values and gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aepo.train.vocab_head import head_logprobs_and_entropy


def direct(hidden, weight, targets, temperature):
    logp_all = F.log_softmax((hidden @ weight.t()) / temperature, dim=-1)
    return logp_all.gather(-1, targets[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("chunk_elements", [1, 37, 10_000])  # one row per chunk, ragged chunks, one chunk
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_direct_autograd(chunk_elements, temperature):
    gen = torch.Generator().manual_seed(0)
    n, d, v = 9, 6, 13
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    g_lp, g_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

    lp, h = head_logprobs_and_entropy(hidden, weight, targets, temperature, chunk_elements=chunk_elements)
    (lp @ g_lp + h @ g_h).backward()
    # the reference in float64 on the same values
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    ref_lp, ref_h = direct(hidden64, weight64, targets, temperature)
    (ref_lp @ g_lp.double() + ref_h @ g_h.double()).backward()

    assert lp.dtype == torch.float32 and h.dtype == torch.float32
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5) and torch.allclose(h.double(), ref_h, atol=1e-5)
    assert torch.allclose(hidden.grad.double(), hidden64.grad, atol=1e-4)
    assert torch.allclose(weight.grad.double(), weight64.grad, atol=1e-4)


def test_hand_computed_uniform_head():
    """A zero head gives the uniform distribution: log p = -log V and H = log V; d lp / d W is
    (onehot(y) - 1/V) h^T and d H / d W is 0 at the maximum of the entropy."""
    v = 4
    hidden = torch.tensor([[1.0, 2.0]])
    weight = torch.zeros(v, 2, requires_grad=True)
    lp, h = head_logprobs_and_entropy(hidden, weight, torch.tensor([2]))
    assert lp.item() == pytest.approx(-math.log(v)) and h.item() == pytest.approx(math.log(v))
    lp.sum().backward()
    expected = (torch.eye(v)[2] - 1 / v)[:, None] * hidden
    assert torch.allclose(weight.grad, expected)
    weight.grad = None
    head_logprobs_and_entropy(hidden, weight, torch.tensor([2]))[1].sum().backward()
    assert torch.allclose(weight.grad, torch.zeros(v, 2), atol=1e-7)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="hidden must be"):
        head_logprobs_and_entropy(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        head_logprobs_and_entropy(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        head_logprobs_and_entropy(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), 0.0)


@pytest.mark.parametrize("which", [0, 1])
def test_gradient_of_one_output_alone(which):
    """A loss that reads only log p (SFT) or only H gets the gradient of that output alone."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 4, generator=gen, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen, requires_grad=True)
    targets = torch.randint(0, 7, (5,), generator=gen)
    head_logprobs_and_entropy(hidden, weight, targets, 0.8, chunk_elements=14)[which].sum().backward()
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    direct(hidden64, weight64, targets, 0.8)[which].sum().backward()
    assert torch.allclose(hidden.grad.double(), hidden64.grad, atol=1e-5)
    assert torch.allclose(weight.grad.double(), weight64.grad, atol=1e-5)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_bfloat16_matches_float64(device):
    """The GPU path users train with: bfloat16 weights and hidden states, float32 outputs; the
    weight gradient's product in bfloat16, summed over 6 chunks."""
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(300, 64, generator=gen).to(device, torch.bfloat16).requires_grad_()
    weight = (torch.randn(5000, 64, generator=gen) / 8).to(device, torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 5000, (300,), generator=gen).to(device)
    lp, h = head_logprobs_and_entropy(hidden, weight, targets, 0.7, chunk_elements=250_000)
    (lp.sum() + h.sum()).backward()
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    ref_lp, ref_h = direct(hidden64, weight64, targets, 0.7)
    (ref_lp.sum() + ref_h.sum()).backward()
    assert lp.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert torch.allclose(lp.double(), ref_lp, atol=0.05) and torch.allclose(h.double(), ref_h, atol=0.05)
    assert torch.allclose(hidden.grad.double(), hidden64.grad, rtol=0.05, atol=0.05)
    assert torch.allclose(weight.grad.double(), weight64.grad, rtol=0.05, atol=0.05)


def test_default_chunk_size_follows_the_device():
    from aepo.train import vocab_head

    assert vocab_head.default_chunk_elements(torch.device("cpu")) == vocab_head.CHUNK_ELEMENTS
    assert vocab_head.default_chunk_elements(torch.device("cuda")) == vocab_head.CUDA_CHUNK_ELEMENTS
    assert vocab_head.CUDA_CHUNK_ELEMENTS > vocab_head.CHUNK_ELEMENTS
