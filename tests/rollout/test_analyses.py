"""The paper's rollout analyses on hand-built trajectories with known answers."""

from __future__ import annotations

import pytest

from aepo.rollout.analyses import branch_concentration, high_entropy_runs, rollout_analyses, tool_step_shifts
from aepo.types import SegmentRecord, Trajectory


def chain(entropies: list[float], *, prompt: str = "p", row_id: int = 0, parent: int | None = None,
          branch_at_step: int | None = None) -> Trajectory:
    """A row: model segment (H_init), then (tool, model) pairs with the given entropies, 10 tokens each."""
    segs, pos = [], 0
    branch_position = None
    for i, h in enumerate(entropies):
        if i > 0:
            segs.append(SegmentRecord("tool", pos, pos + 10))
            pos += 10
            if branch_at_step == i:
                branch_position = pos
        segs.append(SegmentRecord("model", pos, pos + 10, h))
        pos += 10
    return Trajectory(prompt_id=prompt, row_id=row_id, prompt_ids=[1], segments=segs, parent_row_id=parent,
                      branch_position=branch_position)


def test_tool_step_shifts_measure_against_the_first_segment():
    t = chain([1.0, 1.5, 0.5, 1.0])
    assert tool_step_shifts(t) == [(0.5, True), (-0.5, True), (0.0, True)]
    assert tool_step_shifts(chain([1.0])) == []


def test_runs_of_high_entropy_steps():
    # flags: H H L H H H L H  -> runs 2, 3, 1: 5 of 6 high steps are in runs of >= 2
    t = chain([0.0, 1, 1, -1, 1, 1, 1, -1, 1])
    got = high_entropy_runs([t])
    assert got["tool_steps"] == 8
    assert got["high_entropy_step_rate"] == pytest.approx(6 / 8)
    assert got["consecutive_high_entropy_rate"] == pytest.approx(5 / 6)
    assert got["max_high_entropy_run"] == 3
    calm = high_entropy_runs([chain([1.0, 0.5, 0.2])])
    assert calm["high_entropy_step_rate"] == 0 and calm["consecutive_high_entropy_rate"] == 0


def test_a_branch_counts_only_its_own_steps_but_runs_span_the_chain():
    parent = chain([0.0, 1.0, -1.0], row_id=0)
    # the branch left after the first tool result: step 1 is inherited, step 2 is its own
    child = chain([0.0, 1.0, 2.0], row_id=1, parent=0, branch_at_step=1)
    assert [own for _, own in tool_step_shifts(child)] == [True, True]  # both after position 10
    child_late = chain([0.0, 1.0, 2.0], row_id=1, parent=0, branch_at_step=2)
    assert [own for _, own in tool_step_shifts(child_late)] == [False, True]
    got = high_entropy_runs([parent, child_late])
    # steps: parent's two (H, L) + the child's own one (H, in a run of 2 with the inherited H)
    assert got["tool_steps"] == 3
    assert got["high_entropy_step_rate"] == pytest.approx(2 / 3)
    assert got["consecutive_high_entropy_rate"] == pytest.approx(1 / 2)
    assert got["max_high_entropy_run"] == 2


def test_branch_concentration():
    # prompt a: 8 rows, global 0..3; branches: 4<-0, 5<-4 (chain 0), 6<-1, 7<-2  -> top-3 chains hold 4 of 4
    rows = [Trajectory(prompt_id="a", row_id=i, prompt_ids=[1]) for i in range(4)]
    for rid, par in ((4, 0), (5, 4), (6, 1), (7, 2)):
        rows.append(Trajectory(prompt_id="a", row_id=rid, prompt_ids=[1], parent_row_id=par))
    assert branch_concentration(rows) == 1.0
    # prompt b: branches spread on 4 chains, one each -> top 3 hold 3 of 4
    rows_b = [Trajectory(prompt_id="b", row_id=i, prompt_ids=[1]) for i in range(4)]
    rows_b += [Trajectory(prompt_id="b", row_id=4 + i, prompt_ids=[1], parent_row_id=i) for i in range(4)]
    assert branch_concentration(rows_b) == pytest.approx(0.75)
    assert branch_concentration(rows + rows_b) == pytest.approx((1.0 + 0.75) / 2)
    assert branch_concentration(rows_b, top=1) == pytest.approx(0.25)
    independent = [Trajectory(prompt_id="c", row_id=i, prompt_ids=[1]) for i in range(8)]
    assert branch_concentration(independent) is None
    assert "branch_concentration" not in rollout_analyses(independent)
    assert rollout_analyses(rows)["branch_concentration"] == 1.0
    assert rollout_analyses(rows)["branch_top1_share"] == pytest.approx(2 / 4)  # chain 0 holds 4 and 5
    assert "branch_top1_share" not in rollout_analyses(independent)


def test_run_level_stats():
    from aepo.rollout.analyses import analysis_stats, entropy_stats

    metrics = [{"step": 1, "rollout/entropy": 1.0, "rollout/branch_concentration": 1.0,
                "rollout/max_high_entropy_run": 2},
               {"step": 2, "rollout/entropy": 3.0, "rollout/consecutive_high_entropy_rate": 0.5,
                "rollout/max_high_entropy_run": 4},
               {"step": 3, "rollout/entropy": 2.0, "rollout/branch_concentration": 0.5}]
    got = analysis_stats(metrics)
    assert got == {"branch_concentration": 0.75, "consecutive_high_entropy_rate": 0.5, "max_high_entropy_run": 4.0}
    ent = entropy_stats(metrics)
    assert ent["final_entropy"] == 2.0  # the last fifth of 3 steps is the last step
    assert ent["entropy_variation"] == pytest.approx((2 / 3) ** 0.5)
    assert analysis_stats([]) == {}


def decided(row_ids):
    return [{"dH": 0.1, "l": 0, "p": 0.5, "branched": False, "row_id": r} for r in row_ids]


def test_branch_top1_over_uniform_counts_the_chains_that_could_branch():
    from aepo.rollout.analyses import branch_top1_over_uniform

    # prompt a: decisions on chains 0, 1, 2, 3; branches 4<-0, 5<-4, 6<-1, 7<-2: top chain 0 holds
    # 2 of 4 branches against 1/4 uniform -> 2.0
    rows = [Trajectory(prompt_id="a", row_id=i, prompt_ids=[1], decisions=decided([i])) for i in range(4)]
    for rid, par in ((4, 0), (5, 4), (6, 1), (7, 2)):
        rows.append(Trajectory(prompt_id="a", row_id=rid, prompt_ids=[1], parent_row_id=par))
    assert branch_top1_over_uniform(rows) == pytest.approx(2.0)
    # prompt b: the same branches, but only chains 0-2 took decisions (3 never reached a tool)
    rows_b = [Trajectory(prompt_id="b", row_id=i, prompt_ids=[1], decisions=decided([i] if i < 3 else []))
              for i in range(4)]
    rows_b += [Trajectory(prompt_id="b", row_id=r, prompt_ids=[1], parent_row_id=p)
               for r, p in ((4, 0), (5, 4), (6, 1), (7, 2))]
    assert branch_top1_over_uniform(rows_b) == pytest.approx(2 / 4 * 3)
    # a decision taken on a branch row counts for its chain's root; an even spread gives 1
    rows_c = [Trajectory(prompt_id="c", row_id=0, prompt_ids=[1], decisions=decided([0])),
              Trajectory(prompt_id="c", row_id=1, prompt_ids=[1], decisions=decided([1])),
              Trajectory(prompt_id="c", row_id=2, prompt_ids=[1], parent_row_id=0, decisions=decided([0, 2])),
              Trajectory(prompt_id="c", row_id=3, prompt_ids=[1], parent_row_id=1)]
    assert branch_top1_over_uniform(rows_c) == pytest.approx(1.0)
    # one branchable chain (m = 1) says nothing about spreading, and no branches give None
    single = [Trajectory(prompt_id="d", row_id=0, prompt_ids=[1], decisions=decided([0])),
              Trajectory(prompt_id="d", row_id=1, prompt_ids=[1], parent_row_id=0)]
    assert branch_top1_over_uniform(single) is None
    assert branch_top1_over_uniform(rows + rows_b) == pytest.approx((2.0 + 1.5) / 2)
    assert rollout_analyses(rows)["branch_top1_over_uniform"] == pytest.approx(2.0)
