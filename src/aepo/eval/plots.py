"""PNG plots of training curves: one run, or several runs overlaid (one line per algorithm)."""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from aepo.catalogue import get_metric, shown
from aepo.io import atomic_write_bytes


def panels(view: str = "plot") -> list[tuple[str, str]]:
    """(key, label) of the catalogue's metrics in `view` ("plot": the demo's curves, "compare")."""
    return [(m.key, m.label) for m in shown(view)]


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or len(y) < w:
        return y
    k = np.ones(w) / w
    pad = np.concatenate([np.full(w - 1, y[0]), y])
    return np.convolve(pad, k, mode="valid")


def plot_curves(runs: dict[str, Sequence[dict]], out_path: str | Path, *,
                keys: Sequence[tuple[str, str]] | None = None, smooth: int = 5, title: str = "") -> Path:
    """Plot `keys` (default: the catalogue's `plot` panels) against step for each named run (a
    list of per-step metric dicts); panels no run has are left out."""
    keys = [(k, lab) for k, lab in (panels() if keys is None else keys)
            if any(any(k in r for r in rows) for rows in runs.values())]
    if not keys:
        keys = [("reward/mean", get_metric("reward/mean").label)]
    cols = 2 if len(keys) > 1 else 1
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.2 * nrows), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {name: palette[i % len(palette)] for i, name in enumerate(runs)}  # one colour per run everywhere
    for ax, (key, label) in zip(axes.flat, keys):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            x, y = map(np.array, zip(*pts))
            ax.plot(x, _smooth(y.astype(float), smooth), label=name, lw=1.8, color=color[name])
            if smooth > 1:
                ax.plot(x, y, color=color[name], alpha=0.25, lw=0.8)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out_path)


def plot_bars(values: dict[str, dict[str, float]], out_path: str | Path, *, title: str = "",
              errors: dict[str, dict[str, float]] | None = None) -> Path:
    """Grouped bars: values[group][series] (e.g. {'SFT': {'pass@1': .4}, 'RL': {...}}), fractions
    shown as %; `errors` (same shape) draws ± error bars (e.g. the sd over seeds)."""
    groups = list(values)
    series = sorted({s for g in values.values() for s in g})
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(series) * len(groups) / 2, 3.5))
    w = 0.8 / max(1, len(groups))
    x = np.arange(len(series))
    for i, g in enumerate(groups):
        ys = [100 * values[g].get(s, 0.0) for s in series]
        err = [100 * (errors or {}).get(g, {}).get(s, 0.0) for s in series] if errors else None
        bars = ax.bar(x + i * w - 0.4 + w / 2, ys, w, label=g, yerr=err, capsize=3 if errors else 0)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(x, series)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, Path(out_path))


def _save(fig: plt.Figure, out_path: Path) -> Path:
    """Write `fig` as a PNG through a uniquely named temporary file: two processes writing the
    same plot (the runs of `aepo compare --jobs N`) never move each other's file away."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out_path, buf.getvalue())
    return out_path
