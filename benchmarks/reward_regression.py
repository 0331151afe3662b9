"""Before/after table of the reward on honest and wrong answers to every bundled benchmark row.

    .venv/bin/python benchmarks/reward_regression.py --out /tmp/reward_before.json
    ... change the reward code ...
    .venv/bin/python benchmarks/reward_regression.py --out /tmp/reward_after.json
    .venv/bin/python benchmarks/reward_regression.py --compare /tmp/reward_before.json /tmp/reward_after.json

For every row of every benchmark file (`--data-dir`, default ../shared/data/benchmarks from the
repository root; skipped with a message when absent) and every gold answer, a fixed set of model
outputs is scored with `aepo.rewards.score`, the real scoring path (docs/algorithms.md
section 7): the gold in a full response, in `\\boxed{}` (math), with a trailing period, in lower
case, in `$...$` (math) or after "the" (QA), and for a bare-number gold followed by a count
noun ("18 apples"), as "18.0" and with thousands separators; and wrong answers: the next row's and the previous
row's first gold, and for a bare-number gold the gold followed by "million" or "or later". `--compare`
prints every (benchmark, row, kind, output) whose accuracy changed, with counts per benchmark.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from aepo.data.datasets import TaskRow, load_dataset
from aepo.rewards import score
from aepo.rewards.math import PURE_NUMBER_RE
from aepo.rewards.scoring import get_scorer, math_scorer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "benchmarks"


def _wrap(answer: str) -> str:
    return f"<think>I looked it up.</think><answer>{answer}</answer>"


def outputs_for(rows: list[TaskRow], i: int) -> list[tuple[str, str]]:
    """(kind, full response) pairs for row `i`: honest variants of each gold, then wrong ones."""
    row, out = rows[i], []
    math = get_scorer(row.data_source, row.answers) is math_scorer
    for g, gold in enumerate(row.answers):
        out.append((f"gold{g}", _wrap(gold)))
        if math:
            out.append((f"boxed{g}", _wrap(f"\\boxed{{{gold}}}")))
        out.append((f"period{g}", _wrap(f"{gold}.")))
        if gold.lower() != gold:
            out.append((f"lower{g}", _wrap(gold.lower())))
        if math:
            out.append((f"dollars{g}", _wrap(f"${gold}$")))
        else:
            out.append((f"the{g}", _wrap(f"the {gold}")))
        if PURE_NUMBER_RE.fullmatch(gold.replace(",", "").strip()):
            out.append((f"noun{g}", _wrap(f"{gold} apples")))
            if gold.lstrip("-").isdigit():
                out.append((f"decimal{g}", _wrap(f"{gold}.0")))
                out.append((f"commas{g}", _wrap(f"{int(gold):,}")))
            out.append((f"wrong_million{g}", _wrap(f"{gold} million")))
            out.append((f"wrong_or_later{g}", _wrap(f"{gold} or later")))
    for kind, j in (("wrong_next", (i + 1) % len(rows)), ("wrong_prev", (i - 1) % len(rows))):
        other = rows[j].answers[0] if rows[j].answers else ""
        if j != i and other:
            out.append((kind, _wrap(other)))
    return out


def table(data_dir: Path) -> list[dict]:
    """One record per (benchmark, row, output): its accuracy and reward."""
    records = []
    for path in sorted(data_dir.glob("*.jsonl")):
        rows = load_dataset(path)
        for i, row in enumerate(rows):
            for kind, text in outputs_for(rows, i):
                s = score(text, row.answers, row.data_source)
                records.append({"benchmark": path.stem, "row": i, "kind": kind, "output": text,
                                "golds": row.answers, "acc": s["acc"], "reward": s["reward"]})
    return records


def compare(before_path: Path, after_path: Path) -> int:
    """Print every output whose accuracy changed; returns the number of 1 -> 0 changes of
    honest outputs (kinds not starting with "wrong")."""
    key = lambda r: (r["benchmark"], r["row"], r["kind"], r["output"])  # noqa: E731
    before = {key(r): r for r in json.loads(before_path.read_text())}
    after = {key(r): r for r in json.loads(after_path.read_text())}
    counts: Counter = Counter()
    lost_honest = 0
    for k in sorted(before.keys() & after.keys()):
        b, a = before[k], after[k]
        if b["acc"] == a["acc"]:
            continue
        direction = f"{b['acc']:g}->{a['acc']:g}"
        honest = not k[2].startswith("wrong")
        counts[(k[0], direction, "honest" if honest else "wrong")] += 1
        lost_honest += honest and a["acc"] < b["acc"]
        print(f"{k[0]:10s} row {k[1]:4d} {k[2]:10s} acc {direction} reward {b['reward']:g}->{a['reward']:g} "
              f"golds={b['golds']} output={k[3]!r}")
    missing = len(before.keys() ^ after.keys())
    print(f"\n{len(before)} outputs before, {len(after)} after, {missing} not in both")
    for (bench, direction, kind), c in sorted(counts.items()):
        print(f"{bench:10s} {kind:6s} acc {direction}: {c}")
    if not counts:
        print("no accuracy changed")
    return lost_honest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("reward_table.json"))
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.compare:
        lost = compare(*args.compare)
        print(f"honest outputs that went from correct to wrong: {lost}")
        return 0
    if not args.data_dir.is_dir() or not any(args.data_dir.glob("*.jsonl")):
        print(f"reward_regression: no benchmark files in {args.data_dir}; skipped (give --data-dir)")
        return 0
    records = table(args.data_dir)
    args.out.write_text(json.dumps(records, ensure_ascii=False, indent=0))
    accs = Counter((r["benchmark"], r["kind"].rstrip("0123456789"), r["acc"]) for r in records)
    for (bench, kind, acc), c in sorted(accs.items()):
        print(f"{bench:10s} {kind:10s} acc={acc:g}: {c}")
    print(f"wrote {args.out}: {len(records)} scored outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
