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


REWARD_KEYS = {"reward_mean": "mean", "reward_std": "std", "accuracy": "accuracy", "f1": "f1",
               "format_ok": "format_ok", "dynamic_sampling_kept": "dynamic_sampling_kept"}


def step_metrics(rollout: dict[str, float], actor: dict[str, float], timing: dict[str, float]) -> dict[str, float]:
    """One step's metrics under namespaces, the keys of metrics.jsonl, TensorBoard and wandb:
    `reward/` (mean, std, accuracy, f1, format_ok), `rollout/` (entropy of the sampled tokens,
    tool calls, length, m and dH spread, branching and the paper's analyses, finish/<reason>),
    `tools/<name>/` (calls, error and timeout rates), `audit/<check>` (rows that violate a token-level
    check, `aepo.rollout.audit`), `actor/` (the update: pg_loss, grad_norm,
    entropy_all / entropy_clipped of the training pass, clip fractions, lr, ...) and
    `timing/` (seconds: rollout, step)."""
    out: dict[str, float] = {}
    for k, v in rollout.items():
        if k in REWARD_KEYS:
            out[f"reward/{REWARD_KEYS[k]}"] = v
        elif k.startswith(("tools/", "audit/")):
            out[k] = v
        else:
            out[f"rollout/{k}"] = v
    out.update({f"actor/{k}": v for k, v in actor.items()})
    out.update({f"timing/{k}": v for k, v in timing.items()})
    return out


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
