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
from dataclasses import dataclass
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
    scheduler: Any, extra: dict[str, Any], keep_last: int = 2, text_files: dict[str, str] | None = None,
) -> Path:
    """Write `root/step_{step}` atomically and prune all but the newest `keep_last` (0: keep all).

    A full disk raises `aepo.io.DiskFullError` naming the path, the free space and what to do;
    the partial checkpoint is removed and the older ones are untouched.
    """
    root = Path(root)
    final = root / f"step_{step}"
    with atomic_dir(final, disk_full_hint=_disk_full_hint(root, keep_last)) as tmp:
        write_model_files(tmp, model, tokenizer)
        for name, text in (text_files or {}).items():  # the run config, so eval runs it as trained
            (tmp / name).write_text(text, encoding="utf-8")
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: damaged files, or weights of another model.
    The message names the checkpoint and says what to do."""


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG/step state of a checkpoint; CheckpointError when it is damaged."""
    f = Path(path) / STATE_FILE
    if not f.exists():
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}; it is incomplete or not a checkpoint: "
                              f"delete {path} to resume from the previous one")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"checkpoint {f} is corrupted ({type(e).__name__}: {e}); "
                              f"delete {path} to resume from the previous one") from None


# ----------------------------------------------------------------------------- run directories

# config keys that may change between a run and its resumption without changing what it trains
RESUME_IGNORED_KEYS = ("out_dir", "model.device", "trainer.logger", "trainer.save_every", "trainer.keep_last",
                      "trainer.threads", "rollout.engine_options", "rollout.decode_graphs",
                      "rollout.pause_below")


class RunDirError(ValueError):
    """A run directory that does not fit the requested start: a fresh run into a directory that
    holds another run's checkpoints, or a resume with a config that differs from the run's
    (`differences`: (key, value in the run, value now) triples)."""

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]] | None = None) -> None:
        super().__init__(message)
        self.differences = list(differences or [])


@dataclass
class RunStart:
    """Where a run starts: `step` (0 for a fresh run), the checkpoint it resumes from, and a
    one-line `note` saying so (empty for a fresh run without --resume)."""

    step: int
    checkpoint: Path | None
    note: str


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, tuple):
        d = list(d)
    out[prefix[:-1]] = d
    return out


def _short(v: Any, width: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= width else text[: width - 3] + "..."


def config_differences(saved: dict[str, Any], current: Any,
                       ignore: tuple[str, ...] = RESUME_IGNORED_KEYS) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every key set in both `saved` (a run's
    config.yaml, as a dict) and `current` (a Config) whose values differ; keys in `ignore` (and
    keys only one side knows, e.g. a field added in a newer version) are left out."""
    import dataclasses

    import yaml

    cur = current if isinstance(current, dict) else dataclasses.asdict(current)
    # through YAML, as save_config writes it, so tuples, floats and the like compare equal
    cur = yaml.safe_load(yaml.safe_dump(_plain(cur), sort_keys=False))
    a, b = _flatten(saved), _flatten(cur)
    return [(k, a[k], b[k]) for k in b if k in a and k not in ignore and a[k] != b[k]]


def _plain(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


def format_differences(diffs: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """`key (old in the run, new now), ...` for at most `limit` differences."""
    shown = ", ".join(f"{k} ({_short(a)} in the run, {_short(b)} now)" for k, a, b in diffs[:limit])
    return shown + (f" and {len(diffs) - limit} more" if len(diffs) > limit else "")


def check_run_dir(out_dir: str | Path, cfg: Any, *, resume: bool, force: bool = False) -> RunStart:
    """Decide, before any work and without changing anything, where a run into `out_dir` starts.

    - fresh (`resume=False`): refused (RunDirError) when out_dir already holds complete
      checkpoints, unless `force` (the trainer then deletes them and starts over): a fresh run
      there would mix its checkpoints with the old run's and could prune its own;
    - `resume=True` without a checkpoint: starts at step 0, and the note says there was nothing
      to resume (so a job script can always pass --resume);
    - `resume=True` with a checkpoint: refused when `cfg` differs from the run's saved
      config.yaml (the differing keys are listed; RESUME_IGNORED_KEYS may differ), unless
      `force`; the note names the step and checkpoint it resumes from.
    """
    out = Path(out_dir)
    root = out / "checkpoints"
    ckpts = checkpoint_dirs(root)
    if not resume:
        if ckpts and not force:
            raise RunDirError(
                f"out_dir {out} already holds checkpoints of a run (newest {ckpts[-1].name}); pass --resume "
                f"to continue it, --force to start over (its checkpoints are deleted), or set another out_dir")
        note = f"starting over (force): the {len(ckpts)} checkpoint(s) in {root} are deleted" if ckpts else ""
        return RunStart(0, None, note)
    if not ckpts:
        return RunStart(0, None, f"nothing to resume: no checkpoint in {root}; starting at step 0")
    ck = ckpts[-1]
    step = int(_STEP_DIR.match(ck.name).group(1))  # type: ignore[union-attr]
    saved_file = out / "config.yaml"
    if saved_file.is_file():
        import yaml

        try:
            saved = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RunDirError(f"the run's saved config {saved_file} cannot be read ({type(e).__name__}); "
                              f"restore it, or pass --force to resume with the current config") from None
        diffs = config_differences(saved if isinstance(saved, dict) else {}, cfg)
        if diffs and not force:
            raise RunDirError(
                f"--resume: the config differs from the run's saved {saved_file} in {len(diffs)} key(s): "
                f"{format_differences(diffs)}; resume with the run's config, pass --force to resume with "
                f"this one, or set another out_dir", diffs)
    total = getattr(getattr(cfg, "trainer", None), "total_steps", None)
    left = f"; trainer.total_steps={total}: nothing left to train" if isinstance(total, int) and step >= total else ""
    return RunStart(step, ck, f"resuming from step {step} ({ck}){left}")


def start_fresh(root: str | Path, *, force: bool = False) -> int:
    """Clear `root` for a run that starts at step 0 (the step returned): what a kill left is
    removed, and with `force` the old run's checkpoints too, which would otherwise mix with (and
    be pruned with) the new run's."""
    remove_incomplete_checkpoints(root)
    if force:
        for ck in checkpoint_dirs(root):
            prune_checkpoint(ck)
    return 0


def load_checkpoint_weights(ck: Path, model: torch.nn.Module) -> None:
    """Load checkpoint `ck`'s weights into `model`: the adapter of a LoRA (peft) model, else the
    full state dict (the tied lm_head may be absent). A file that cannot be read, or weights
    that do not fit the model, raise CheckpointError saying what to do."""
    from safetensors.torch import load_file

    from aepo.models.lora import is_peft_model

    if is_peft_model(model):
        _load_adapter(ck, model)
        return
    weights = {}
    for f in sorted(ck.glob("*.safetensors")):
        try:
            weights.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - a damaged file, whatever safetensors calls it
            raise CheckpointError(f"checkpoint {f} is corrupted ({type(e).__name__}: {e}); "
                                  f"delete {ck} to resume from the previous one") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"checkpoint {ck} does not fit the model ({str(e).splitlines()[0]}); "
                              "resume with the model the run started from") from None
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ck} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}; resume with the model the run started from")
    model.tie_weights()


def _load_adapter(ck: Path, model: torch.nn.Module) -> None:
    """Load the adapter weights of checkpoint `ck` into the wrapped model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from aepo.models.lora import ADAPTER_WEIGHTS

    f = ck / ADAPTER_WEIGHTS
    try:
        weights = load_file(str(f))
    except Exception as e:  # noqa: BLE001 - missing or damaged, whatever safetensors calls it
        raise CheckpointError(f"checkpoint {ck}: its adapter {f.name} cannot be read ({type(e).__name__}: {e}); "
                              f"delete {ck} to resume from the previous one") from None
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # shape mismatch: another rank or model
        raise CheckpointError(f"checkpoint {ck} does not fit the model ({str(e).splitlines()[0]}); resume with "
                              "the model and actor.lora settings the run started from") from None
    lora_missing = [k for k in result.missing_keys if "lora_" in k]
    if lora_missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {ck}: its adapter does not match the model's (missing "
                              f"{lora_missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}); resume with "
                              "the actor.lora settings the run started from")


def restore_trainer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                          entropy_history: Any) -> int:
    """Optimizer, scheduler, RNG and entropy history of a checkpoint's state; the step to continue from."""
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    extra = state.get("extra", {})
    if "entropy_history" in extra:
        entropy_history.load_state_dict(extra["entropy_history"])
    return int(state["step"])
