"""Per-step metrics: a JSONL file (always), tensorboard and wandb (optional)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from aepo.config import check_loggers
from aepo.io import atomic_write_text


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a kill: ignore it
    return rows


class MetricsLogger:
    """Appends one JSON line per step; on resume, drops lines past the resumed step."""

    def __init__(self, out_dir: str | Path, backends: list[str] | None = None, resume_step: int = 0,
                 run_name: str = "aepo", config: dict | None = None) -> None:
        backends = backends or []
        check_loggers(backends)
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._tb = None
        self._wandb = None
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("trainer.logger includes tensorboard: pip install 'aepo[tracking]'") from e
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        if "wandb" in backends:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("trainer.logger includes wandb: pip install 'aepo[tracking]'") from e
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "aepo"), name=run_name,
                                     config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
