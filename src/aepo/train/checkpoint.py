"""Checkpoints: HF-format model + tokenizer, optimizer, scheduler, RNG and trainer state.

Each checkpoint is written into a temporary directory `.step_N.<random>.tmp` and renamed to
`step_N`, so a kill never leaves a half-written `step_N`; only the last `keep_last` are kept.
A pruned checkpoint is first renamed to `.step_N.pruning` and then deleted, so a kill during
the delete never leaves a half-deleted `step_N` that looks like a checkpoint.
`remove_incomplete_checkpoints` clears what a kill leaves behind; the trainer calls it on
start and on resume.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aepo.io import atomic_dir, format_bytes
from aepo.models.loading import write_model_files

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
# leftovers of a killed save (atomic_dir's temp and swap dirs) or prune
_LEFTOVER_DIR = re.compile(r"^\.step_\d+\.(?:[^/]+\.tmp|old|pruning)$")
STATE_FILE = "trainer_state.pt"
_WEIGHTS_INDEX = "model.safetensors.index.json"


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds the trainer state and every weights file that resume loads."""
    path = Path(path)
    if not path.is_dir() or not (path / STATE_FILE).is_file():
        return False
    index = path / _WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all((path / name).is_file() for name in shards)
    return any(path.glob("*.safetensors"))


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and is_complete_checkpoint(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def remove_incomplete_checkpoints(root: str | Path) -> list[Path]:
    """Delete what a kill during a save or prune left under `root`; return what was removed.

    Removes `.step_N.*.tmp`, `.step_N.old` and `.step_N.pruning` directories and `step_N`
    directories that are not complete checkpoints (no trainer_state.pt or missing weights).
    Nothing else is touched: other names, plain files and symlinks stay. Assumes no other
    process is writing checkpoints under `root` at the same time.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if p.is_symlink() or not p.is_dir():
            continue
        if _LEFTOVER_DIR.match(p.name) or (_STEP_DIR.match(p.name) and not is_complete_checkpoint(p)):
            _delete_dir(p)
            logger.warning("removed %s: %s", p, "left by an interrupted checkpoint save or prune"
                           if p.name.startswith(".") else "an incomplete checkpoint")
            removed.append(p)
    return removed


def _delete_dir(path: Path) -> None:
    """rmtree that reports, rather than raises, what it could not delete (the next start retries).
    A symlink is unlinked; what it points to is left alone."""
    if path.is_symlink():
        path.unlink()
        return
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        logger.warning("could not delete all of %s; delete it by hand", path)


def prune_checkpoint(path: str | Path) -> None:
    """Delete checkpoint `path` so that a kill at any moment never leaves a partial `step_N`:
    rename it to `.step_N.pruning` (atomic), then delete that. A checkpoint that cannot be
    moved is kept, with a warning: pruning never stops training."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}.pruning")
    if doomed.exists() or doomed.is_symlink():
        _delete_dir(doomed)
    try:
        os.replace(path, doomed)
    except OSError as exc:
        logger.warning("could not prune old checkpoint %s (%s); it is kept", path, exc)
        return
    _delete_dir(doomed)
    logger.info("pruned old checkpoint %s", path)


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | Path, step: int, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer,
    scheduler: Any, extra: dict[str, Any], keep_last: int = 2,
) -> Path:
    """Write `root/step_{step}` atomically and prune all but the newest `keep_last` (0: keep all).

    A full disk raises `aepo.io.DiskFullError` naming the path, the free space and what to do;
    the partial checkpoint is removed and the older ones are untouched.
    """
    root = Path(root)
    final = root / f"step_{step}"
    with atomic_dir(final, disk_full_hint=_disk_full_hint(root, keep_last)) as tmp:
        write_model_files(tmp, model, tokenizer)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "extra": extra,
        }
        # through a Python file, so a full disk surfaces as OSError(ENOSPC) rather than as
        # torch's "unexpected pos" RuntimeError
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
    if keep_last > 0:
        for old in checkpoint_dirs(root)[:-keep_last]:
            prune_checkpoint(old)
    return final


def _disk_full_hint(root: Path, keep_last: int) -> str:
    """Advice for a checkpoint that did not fit, with the size of the newest existing one."""
    dirs = checkpoint_dirs(root)
    size = ""
    if dirs:
        n = sum(f.stat().st_size for f in dirs[-1].rglob("*") if f.is_file())
        size = f" (one checkpoint takes about {format_bytes(n)})"
    return (f"free space there, point trainer.out_dir at a disk with room, or lower trainer.keep_last "
            f"(now {keep_last}; 0 keeps every checkpoint) so fewer checkpoints are kept{size}")


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG/step state of a checkpoint; a clear error when it is damaged."""
    f = Path(path) / STATE_FILE
    if not f.exists():
        raise FileNotFoundError(f"checkpoint {path} has no {STATE_FILE}; it is incomplete or not a checkpoint")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise RuntimeError(f"checkpoint {f} is corrupted ({type(e).__name__}: {e}); "
                           f"delete {path} to resume from the previous one") from None
