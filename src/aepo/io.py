"""Atomic file output: a kill mid-write never leaves a half-written file or directory.

A write that fails because the disk (or the user's quota) is full raises `DiskFullError`, whose
message names the path, the free space left and what to do, instead of a bare errno or one of
torch's "unexpected pos" errors.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What libraries put in the message when they drop the errno: the OS text (safetensors, ...) ...
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded")
# ... or, for torch.save to a path, only that a write came up short (the cause is lost)
_WRITE_FAILED_TEXTS = ("unexpected pos", "file write failed")
# a short write with less than this free is taken to be a full disk
RUN_CONFIG_FILE = "aepo_run.yaml"
"""The run config a model directory was made with, written beside its config.json by every
command that saves a model (sft, train, demo, checkpoints) and into every LoRA adapter
directory (its `model.path` names the base model); `aepo.config` re-exports it."""
NEARLY_FULL_BYTES = 64 * 2**20
DEFAULT_DISK_FULL_HINT = "free space on that disk, or write to another one (for training: set trainer.out_dir)"


class DiskFullError(OSError):
    """A write failed because the disk or quota is full; the message says where and what to do."""

    def __init__(self, path: str | Path, free_bytes: int | None, cause: BaseException, hint: str) -> None:
        if isinstance(cause, DiskFullError) and cause.__cause__ is not None:
            cause = cause.__cause__  # a nested atomic write already wrapped it; name the OS error once
        free = "unknown space" if free_bytes is None else format_bytes(free_bytes)
        super().__init__(
            f"disk full (no space left on device) while writing {path}: {free} free there "
            f"({type(cause).__name__}: {cause}). To fix: {hint}."
        )
        self.errno = errno.ENOSPC
        self.path = Path(path)
        self.free_bytes = free_bytes


def format_bytes(n: int) -> str:
    """`n` bytes in the largest binary unit that keeps it >= 1, e.g. "1.5 GiB (1610612736 bytes)"."""
    size, unit = float(n), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, name
    return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit} ({n} bytes)"


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the filesystem holding `path` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, free: int | None) -> bool:
    """Whether `exc` (or an error it was raised from) means the disk or quota is full.

    An OSError says so by errno; other libraries by the OS's text; torch.save to a path only
    says a write came up short, which counts when less than NEARLY_FULL_BYTES are `free`.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        text = str(e).lower()
        if any(t in text for t in _DISK_FULL_TEXTS):
            return True
        short_write = isinstance(e, RuntimeError) and any(t in text for t in _WRITE_FAILED_TEXTS)
        if short_write and free is not None and free < NEARLY_FULL_BYTES:
            return True
        e = e.__cause__ or e.__context__
    return False


def atomic_write_bytes(
    path: str | Path, data: bytes, *, disk_full_hint: str = DEFAULT_DISK_FULL_HINT
) -> None:
    """Write `data` to `path` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # no free inodes, or a full quota
        _raise_if_disk_full(exc, path, free_bytes(path.parent), disk_full_hint)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException as exc:
        free = free_bytes(path.parent)  # measured before the partial file is removed
        Path(tmp).unlink(missing_ok=True)
        _raise_if_disk_full(exc, path, free, disk_full_hint)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | Path, *, disk_full_hint: str = DEFAULT_DISK_FULL_HINT) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only when the block succeeds.

    The temporary directory is `.{name}.<random>.tmp` next to `path`; a `path` that already
    exists is moved to `.{name}.old` for the swap. On any failure the temporary directory is
    removed; a full disk raises `DiskFullError` (with `disk_full_hint` as the advice).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        _raise_if_disk_full(exc, path, free_bytes(path.parent), disk_full_hint)
        raise
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        free = free_bytes(path.parent)  # measured before the partial directory is removed
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(exc, path, free, disk_full_hint)
        raise


def _raise_if_disk_full(exc: BaseException, path: Path, free: int | None, hint: str) -> None:
    """Raise DiskFullError from `exc` when it means a full disk (interrupts pass through)."""
    if isinstance(exc, Exception) and is_disk_full(exc, free):
        raise DiskFullError(path, free, exc, hint) from exc


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a bad line raises
    ValueError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}; "
                                 f"write one {{...}} object per line")
            yield i, row


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file; a bad line raises ValueError naming the file and line."""
    return [row for _, row in iter_jsonl(path)]


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ----------------------------------------------------------------------------- output paths


class OutputPathError(ValueError):
    """An output path that cannot be written: occupied by a file where a directory is needed
    (or the reverse), or in a place this user cannot write to. The message names the path and
    the option that gave it, and what to do."""


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        p = p.parent
    return p


def _check_can_create_in(directory: Path, target: Path, what: str) -> None:
    """Raise OutputPathError unless a file can be created in `directory` (tried for real, so a
    read-only filesystem and missing permissions count; the probe file is removed at once)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".aepo-write-check.", suffix=".tmp")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputPathError(
            f"{what} {target} is not writable (creating a file in {directory} fails: {reason}); choose a writable location "
            f"or fix the permissions of {directory}") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def _check_creatable(directory: Path, target: Path, what: str) -> None:
    """`directory` (the target itself or the directory a file goes in) exists and is writable,
    or can be created under its nearest existing parent."""
    if directory.exists() and not directory.is_dir():
        raise OutputPathError(f"{what} {target} cannot be created because {directory} is a file, not a "
                              f"directory; choose another {what}")
    anchor = directory if directory.is_dir() else _nearest_existing(directory)
    if not anchor.is_dir():
        raise OutputPathError(f"{what} {target} cannot be created because {anchor} is a file, not a directory; "
                              f"choose another {what}")
    _check_can_create_in(anchor, target, what)


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """Check, without creating anything, that `path` can be used as an output directory: it is
    a writable directory, or it does not exist and can be created (no file on the way, and the
    nearest existing parent is writable). `what` names the option in the message."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{what} {p} is a file, but a directory is needed there; "
                              f"move the file away or choose another {what}")
    _check_creatable(p, p, what)
    return p


def check_output_file(path: str | Path, what: str = "--out") -> Path:
    """Check, without creating anything, that a file can be written at `path` (atomically, so its
    directory must be writable): `path` is not a directory and its directory exists or can be
    created."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{what} {p} is a directory, but a file is needed there; "
                              f"give a file path (e.g. {p / 'rollouts.jsonl'}) or choose another {what}")
    _check_creatable(p.parent if str(p.parent) else Path("."), p, what)
    return p


# ----------------------------------------------------------------------------- keyed outputs


class StaleOutputError(ValueError):
    """An output on disk was made with other settings or another model than the ones asked for."""

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


def key_file(output: str | Path) -> Path:
    """Where the key of `output` (a file or directory) is kept: beside it, `NAME.key.json`."""
    output = Path(output)
    return output.with_name(output.name + ".key.json")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def key_differences(stored: Any, wanted: dict[str, Any]) -> list[str]:
    """`key: stored -> wanted` for each dotted key whose value differs (one line saying so when
    there is no stored key: an output of an aepo that kept none)."""
    if stored is None:
        return ["(made by an earlier version of aepo: no key)"]
    a, b = _flatten(stored if isinstance(stored, dict) else {}), _flatten(wanted)
    return [f"{k}: {a.get(k, '(none)')!r} -> {b.get(k, '(none)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(none)") != b.get(k, "(none)")]


def shown_differences(diffs: list[str], limit: int) -> str:
    """The first `limit` of `diffs`, "; "-joined, and how many more there are."""
    return "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


def remove_output(path: Path) -> None:
    """Remove a stale output, a file or a whole directory (nothing when it is not there)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def claim_keyed_output(output: str | Path, key: dict[str, Any], *, force: bool = False, what: str = "output",
                       hint: str = "") -> bool:
    """Make `output` belong to `key` (the settings and model identity that produce it) before
    any of it is reused. Returns True when an existing `output` was made with exactly `key`
    (reuse it), False when there is none yet (its key is now recorded). An `output` made with
    another key raises StaleOutputError naming the differences, or with `force` is removed
    and started afresh. So a result is never reported under settings that did not make it."""
    output = Path(output)
    key = json.loads(json.dumps(key, default=str))  # as it reads back from disk (tuples are lists)
    kf = key_file(output)
    if output.exists() or kf.exists():
        try:
            stored = json.loads(kf.read_text())
        except (OSError, ValueError):
            stored = None
        if stored == key and output.exists():
            return True
        if stored != key and not force:
            diffs = key_differences(stored, key)
            raise StaleOutputError(f"{what} {output} was made with other settings ({shown_differences(diffs, 6)}); "
                                   f"{hint or 'use another output path'}, or pass --force to replace it", diffs)
        remove_output(output)
    atomic_write_json(kf, key)
    return False
