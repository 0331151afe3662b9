"""The fork world's numbers for benchmarks/RESULTS.md ("Does AEPO's branching pay?"): the expert's
solve rate per kind, then an `aepo analyze branching` report's tables (benchmarks/branching_table.py)
with the AUROC of dH against q(1 - q) split by question kind (docs/algorithms.md, "Fork worlds").

    .venv/bin/python benchmarks/branching_fork.py --world runs/fork/world [--report runs/branching_fork.json]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def expert_rates(world_dir: Path, passes: int = 4) -> None:
    """The quiet expert's solve rate per kind of the test split (search top 3), against the
    expectation from the forks' candidate counts, and the clean expert's."""
    from aepo.config import ToolsConfig
    from aepo.demo.expert import ExpertNoise, run_expert
    from aepo.demo.stages import build_tools
    from aepo.demo.world import World, expected_solve_rate

    world = World.load(world_dir)
    runner = build_tools(world, ToolsConfig(search_topk=3, python_timeout=5.0))
    try:
        def tool(name: str, arg: str) -> str:
            return runner.tools[name](arg)

        rng = random.Random(0)
        solved, expected, clean, n = Counter(), Counter(), Counter(), Counter()
        for _ in range(passes):
            for row in world.test:
                solved[row["kind"]] += run_expert(row, world, tool, rng, ExpertNoise.quiet()).correct
                expected[row["kind"]] += expected_solve_rate(world, row, 0.5)
                n[row["kind"]] += 1
        for row in world.test:
            clean[row["kind"]] += run_expert(row, world, tool, rng, ExpertNoise.clean()).correct
    finally:
        runner.close()
    print(f"Expert on {world_dir}/test.jsonl ({passes} passes of the quiet expert, 1 of the clean one):\n")
    print("| kind | questions | quiet expert solve rate | expected 0.5 + 0.5/n per fork | clean expert |")
    print("|---|---|---|---|---|")
    for kind in n:
        q = n[kind] // passes
        print(f"| {kind} | {q} | {solved[kind] / n[kind]:.3f} | {expected[kind] / n[kind]:.3f} | "
              f"{clean[kind] / q:.3f} |")
    print()


def by_kind(report_path: Path, data: Path) -> None:
    """AUROC of dH against q(1 - q) and the mean q(1 - q) for the states of each question kind."""
    from aepo.eval.branching import auroc_interval, concordance_auroc
    from aepo.io import read_jsonl

    r = json.loads(report_path.read_text())
    kinds = [row["kind"] for row in read_jsonl(data)][: r["prompts"]]
    states: dict[str, list[dict]] = {}
    for s in r["state_records"]:
        states.setdefault(kinds[s["question"]], []).append(s)
    print("| question kind | questions | states | mean q | 0 < q < 1 | mean q(1 - q) | where branched | "
          "AUROC dH vs q(1 - q) | 95% interval |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, st in sorted(states.items()):
        u = [s["q"] * (1 - s["q"]) for s in st]
        br = [s["q"] * (1 - s["q"]) for s in st if s["branched"]]
        auc = concordance_auroc([s["dH"] for s in st], u)
        ci = auroc_interval([s["question"] for s in st], [s["dH"] for s in st], u)
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        print(f"| {kind} | {kinds.count(kind)} | {len(st)} | {sum(s['q'] for s in st) / len(st):.3f} | "
              f"{sum(0 < s['q'] < 1 for s in st) / len(st):.3f} | {sum(u) / len(u):.3f} | "
              f"{(sum(br) / len(br)) if br else float('nan'):.3f} | {auc:.3f} | {ci_text} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, required=True, help="a fork world directory (aepo world build --kinds)")
    ap.add_argument("--report", type=Path, help="an aepo analyze branching report on the world's test split")
    args = ap.parse_args()
    expert_rates(args.world)
    if args.report:
        import branching_table

        branching_table.main(str(args.report))
        print()
        by_kind(args.report, args.world / "test.jsonl")


if __name__ == "__main__":
    main()
