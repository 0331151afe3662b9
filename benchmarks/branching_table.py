"""The markdown tables of an `aepo analyze branching` report (benchmarks/RESULTS.md, "Does AEPO's
branching pay?").

    .venv/bin/python benchmarks/branching_table.py runs/branching_sft.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def f(x: object, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def main(path: str) -> None:
    r = json.loads(Path(path).read_text())
    q = r["q"]
    print(f"`{r['command']}` ({r['seconds']:.0f} s): {r['prompts']} questions, k = {r['k']}, "
          f"C = {r['continuations']} continuations per state, m = {r['m_global']} global rows in the "
          f"random / oracle arms.\n")
    ci = r.get("auroc_interval")
    ci_text = f", 95% interval over questions [{f(ci[0])}, {f(ci[1])}]" if ci else ""
    print(f"- decision states: {r['states']}; AUROC of dH against q(1 - q): "
          f"{f(r['auroc_dH_vs_uncertainty'])}{ci_text} (ARPO trees {f(r['auroc_by_tree']['arpo'])}, AEPO trees "
          f"{f(r['auroc_by_tree']['aepo'])})")
    print(f"- mean q {f(q['mean'])}; states with 0 < q < 1: {f(q['uncertain_share'])}; mean q(1 - q) "
          f"{f(q['mean_q_one_minus_q'])}, where the trees branched {f(r['q_one_minus_q_where_branched'])}; "
          f"dH mean {f(q['dH_mean'])}, dH > 0 at {f(q['dH_positive_share'])} of states\n")
    cols = ["pass@1", "learnable_groups", "sibling_disagreement", "tokens", "distinct_tool_paths", "branch_depth",
            "branches_per_prompt"]
    print("| arm | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for arm, m in r["arms"].items():
        print(f"| {arm} | " + " | ".join(f(m[c], 1 if c == "tokens" else 3) for c in cols) + " |")
    print()
    print("| AEPO, m = k/2, lambda_pen | " + " | ".join(cols + ["mean_l"]) + " |")
    print("|---|" + "---|" * (len(cols) + 1))
    for lam, m in r["penalty_at_fixed_m"].items():
        print(f"| {lam} | " + " | ".join(f(m[c], 1 if c == "tokens" else 3) for c in cols + ["mean_l"]) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Markdown tables of an `aepo analyze branching` report.")
    ap.add_argument("report", help="the JSON report written by `aepo analyze branching --out`")
    main(ap.parse_args().report)
