"""A new policy loss in one file: plain REINFORCE on the ratio, no clipping.

    aepo train src/aepo/configs/demo.yaml plugins=[examples/extend/toy_loss.py] \
        actor.policy_loss=toy_unclipped actor.policy_loss_options={scale: 0.5}

The function receives `PolicyLossInputs` (validated [B, T] tensors: ratio r, advantages A, mask)
and its own keyword options, and returns the per-token loss and extra metrics; aggregation,
clip-fraction metrics and config checks are the library's.
"""
import torch

from aepo.algos.losses import PolicyLossInputs, register_policy_loss


@register_policy_loss("toy_unclipped")
def toy_unclipped(inp: PolicyLossInputs, *, scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_t = -scale * A_t * r_t (the unclipped surrogate)."""
    loss = -scale * inp.advantages * inp.ratio
    return loss, {"toy_ratio_mean": inp.ratio[inp.mask].mean() if inp.mask.any() else inp.ratio.sum() * 0}
