"""Log-probs and entropies through the LM head in row chunks, without [N, V] activations.

For N scored positions with hidden states h [N, d], head weight W [V, d] and temperature T:

    z = h W^T / T,   log p = z - logsumexp(z),   lp = log p[y],   H = -sum_v p_v log p_v

Autograd through `F.log_softmax` keeps several [N, V] float32 tensors alive until the backward
pass (logits, log-probs, probabilities, their product): with a 151k-token vocabulary and a few
thousand response tokens that is gigabytes, more than the model. `head_logprobs_and_entropy`
keeps only h, W and two numbers per row; the backward pass recomputes z one chunk of rows at a
time and applies the closed-form gradients (docs/algorithms.md section 4 uses H_t only detached,
but EPO's regulariser and the entropy metrics differentiate it):

    dlp/dz = onehot(y) - p,    dH/dz = -p (log p + H)

so the extra cost is one more head matmul per chunk, and the peak is one chunk of [rows, V].
The weight gradient's product runs in the weights' dtype (bf16 on a GPU, as autograd through
the direct head computes it), summed over the chunks in float32.
"""
from __future__ import annotations

import torch

# Rows per chunk are chosen so one chunk's float32 logits hold about this many elements: 64 MiB
# on a CPU, 1 GiB on a GPU (where small chunks run skinny matmuls and many launches: an H100
# update of a 0.6B Qwen3 took 3.6 s at 64 MiB chunks, 3.2 s at 2 GiB; benchmarks/RESULTS.md).
# `aepo.train.batch.selected_logprobs` uses the chunked head when all logits would be more.
CHUNK_ELEMENTS = 1 << 24
CUDA_CHUNK_ELEMENTS = 1 << 28


def default_chunk_elements(device: torch.device) -> int:
    """Logits per chunk on `device` (`CUDA_CHUNK_ELEMENTS` on CUDA, else `CHUNK_ELEMENTS`)."""
    return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS


def _logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Tempered float32 logits of one chunk (the matmul in the weights' dtype, as the HF head)."""
    return (h @ weight.t()).float() / temperature


class _HeadLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                temperature: float, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n, dtype=torch.float32)
        for s in range(0, n, rows):
            z = _logits(hidden[s : s + rows], weight, temperature)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            log_p = z.sub_(lse)  # in place: z is not needed again
            logp[s : s + rows] = log_p.gather(-1, targets[s : s + rows, None])[:, 0]
            entropy[s : s + rows] = -(log_p.exp() * log_p).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, entropy)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.set_materialize_grads(False)  # an output the loss does not use gets None, not zeros
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_entropy: torch.Tensor):  # type: ignore[override]
        hidden, weight, targets, entropy = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s : s + rows]
            z = _logits(h, weight, t)
            log_p = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))
            p = log_p.exp()
            # dL/dz = g_lp (onehot(y) - p) - g_H p (log p + H), then dz/d(h W^T) = 1 / T
            if grad_entropy is not None:
                g_h = grad_entropy[s : s + rows, None].float()
                dz = log_p.add_(entropy[s : s + rows, None]).mul_(p).mul_(-g_h)
                if grad_logp is not None:
                    dz.sub_(p.mul_(grad_logp[s : s + rows, None].float()))
            else:
                dz = p.mul_(-grad_logp[s : s + rows, None].float())
            if grad_logp is not None:
                dz.scatter_add_(-1, targets[s : s + rows, None], grad_logp[s : s + rows, None].float())
            dz = dz.div_(t).to(weight.dtype)
            if need_h:
                grad_h[s : s + rows] = (dz @ weight).to(hidden.dtype)
            if need_w:
                if weight.dtype == torch.float32:
                    grad_w.addmm_(dz.t(), h.float())
                else:  # a low-precision product, as autograd's; float32 only for the sum
                    grad_w.add_(dz.t() @ h.to(weight.dtype))
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def head_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              temperature: float = 1.0, *, chunk_elements: int | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) and the entropy H of softmax(hidden W^T / T) per row, both float32 [N],
    differentiable in `hidden` and `weight`, computed `chunk_elements` logits at a time
    (default: `default_chunk_elements(hidden.device)`)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"head_logprobs_and_entropy: hidden must be [N, d] and weight [V, d], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"head_logprobs_and_entropy: targets must be [N] = [{hidden.shape[0]}], "
                         f"got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"head_logprobs_and_entropy: temperature must be > 0, got {temperature}")
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(hidden.device)
    rows = max(1, chunk_elements // max(weight.shape[0], 1))
    return _HeadLogprobEntropy.apply(hidden, weight, targets.long(), float(temperature), rows)
