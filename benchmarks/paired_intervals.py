"""Paired intervals of a finished comparison: `aepo.eval.stats.paired_comparison` on pass@1 per seed.

    .venv/bin/python benchmarks/paired_intervals.py runs/compare          # a compare.json of `aepo compare`
    .venv/bin/python benchmarks/paired_intervals.py --recorded 2026-11-26 # per-seed values RESULTS.md records

The second form recomputes the intervals of the five-seed GRPO / ARPO / AEPO comparison of
2026-11-26 from its per-seed pass@1 as RESULTS.md lists them (its run directories are gone).
Prints one line per pair: mean difference, 95% bootstrap interval, MDE at 80% power, verdict.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from aepo.eval.stats import paired_comparison

RECORDED = {  # pass@1 (%) per seed 0..4, benchmarks/RESULTS.md "GRPO vs ARPO vs AEPO, five seeds"
    "2026-11-26": {"grpo": [21.9, 23.6, 24.1, 22.8, 25.0], "arpo": [23.6, 19.5, 23.8, 23.2, 20.2],
                   "aepo": [24.8, 18.4, 21.4, 22.8, 23.4]},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("compare_dir", nargs="?", type=Path)
    ap.add_argument("--recorded", choices=sorted(RECORDED))
    args = ap.parse_args()
    if args.recorded:
        per_seed = {a: dict(enumerate(v)) for a, v in RECORDED[args.recorded].items()}
    elif args.compare_dir:
        res = json.loads((args.compare_dir / "compare.json").read_text())
        per_seed = {a: {r["seed"]: 100 * r["pass@1"] for r in runs} for a, runs in res.items()}
    else:
        ap.error("give a compare directory or --recorded DATE")
    names = list(per_seed)
    for j, a in enumerate(names):
        for b in names[:j]:
            p = paired_comparison(per_seed[a], per_seed[b], a, b)
            print(f"{a} - {b}: n {p['n']}, mean {p['mean']:+.2f}, sd {p['sd']:.2f}, 95% interval "
                  f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}], MDE(80%) {p['mde']:.2f}, {p['verdict']}")


if __name__ == "__main__":
    main()
