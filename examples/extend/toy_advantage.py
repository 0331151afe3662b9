"""A new advantage estimator in one file: the reward minus the group's best reward.

    aepo train src/aepo/configs/demo.yaml plugins=[examples/extend/toy_advantage.py] \
        actor.adv_estimator=toy_best_baseline actor.adv_estimator_options={scale: 2.0}

The function receives `AdvantageInputs` (rewards [B], group [B], mask [B, T]) and its own
keyword options, and returns the per-token advantage (0 on masked tokens).
"""
import torch

from aepo.algos.advantages import AdvantageInputs, register_advantage


@register_advantage("toy_best_baseline")
def toy_best_baseline(inp: AdvantageInputs, *, scale: float = 1.0) -> torch.Tensor:
    """A_i = scale * (R_i - max_{j in g(i)} R_j), broadcast to the row's response tokens."""
    best = torch.full((inp.num_groups,), -float("inf"), dtype=inp.rewards.dtype, device=inp.rewards.device)
    best = best.scatter_reduce(0, inp.group, inp.rewards, "amax")
    per_row = scale * (inp.rewards - best[inp.group])
    return torch.where(inp.mask, per_row.unsqueeze(-1), torch.zeros((), dtype=per_row.dtype))
