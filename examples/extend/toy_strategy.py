"""A new rollout strategy in one file: half the budget as global rows, and one branch at each
global row's first tool result, until the budget is spent.

    aepo train src/aepo/configs/demo.yaml plugins=[examples/extend/toy_strategy.py] \
        rollout.strategy=toy_branch_first

A strategy chooses the first rows (`begin`) and what to do after each tool result
(`on_tool_feedback`); the agent loop, the budget of exactly rollout.n rows per prompt, the
sampler's prefix sharing and the tree records are the library's.
"""
from aepo.rollout.strategies import PromptGroup, RolloutStrategy, register_strategy


@register_strategy("toy_branch_first")
class BranchAtFirstTool(RolloutStrategy):
    def begin(self, groups: list[PromptGroup]) -> None:
        for g in groups:
            g.m = max(1, g.n // 2)
            self.start_globals(g, g.m)

    def on_tool_feedback(self, g: PromptGroup, outcome) -> None:
        s = outcome.state
        if s.traj.parent_row_id is None and s.n_tool_calls == 1:
            self.branch(g, s, outcome.segment_start)
