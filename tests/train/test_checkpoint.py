"""Checkpoint directories survive kills during a save or a prune, and a full disk is named."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import repo_paths
import torch
from safetensors.torch import save_file

from aepo import io as aepo_io
from aepo.io import DiskFullError, atomic_dir, is_disk_full
from aepo.train import checkpoint as ck
from aepo.train.checkpoint import (
    STATE_FILE,
    checkpoint_dirs,
    is_complete_checkpoint,
    latest_checkpoint,
    load_trainer_state,
    remove_incomplete_checkpoints,
    save_checkpoint,
)

SRC = str(repo_paths.SRC)


class FakeModel:
    """Writes a one-tensor safetensors file, as `save_pretrained(safe_serialization=True)` does."""

    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def save_pretrained(self, directory: str, safe_serialization: bool = True) -> None:
        save_file({"w": torch.full((4,), self.value)}, os.path.join(directory, "model.safetensors"))
        Path(directory, "config.json").write_text("{}")


class FakeTokenizer:
    def save_pretrained(self, directory: str) -> None:
        Path(directory, "tokenizer.json").write_text("{}")


def save(root: Path, step: int, keep_last: int = 2) -> Path:
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.1)
    return save_checkpoint(root, step, FakeModel(step), FakeTokenizer(), opt, None, {"k": step}, keep_last)


def make_complete(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / STATE_FILE).write_bytes(b"state")
    save_file({"w": torch.zeros(1)}, str(path / "model.safetensors"))
    return path


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ----------------------------------------------------------------------------- completeness


def test_complete_checkpoint_needs_state_and_every_weights_file(tmp_path):
    good = make_complete(tmp_path / "step_1")
    assert is_complete_checkpoint(good)
    no_state = make_complete(tmp_path / "step_2")
    (no_state / STATE_FILE).unlink()
    assert not is_complete_checkpoint(no_state)
    no_weights = make_complete(tmp_path / "step_3")
    (no_weights / "model.safetensors").unlink()
    assert not is_complete_checkpoint(no_weights)
    sharded = make_complete(tmp_path / "step_4")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert not is_complete_checkpoint(sharded)  # a shard is missing
    save_file({"w": torch.zeros(1)}, str(sharded / "model-00002-of-00002.safetensors"))
    assert is_complete_checkpoint(sharded)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_1", "step_4"]


# ----------------------------------------------------------------------------- the cleaner


def test_cleaner_removes_only_checkpoint_leftovers_and_logs_them(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    make_complete(root / "step_1")
    make_complete(root / "step_2")
    (root / "step_2" / STATE_FILE).unlink()  # half pruned, or not a checkpoint at all
    make_complete(root / "step_3")
    (root / "step_3" / "model.safetensors").unlink()  # state, but no weights
    leftovers = [Path(tempfile.mkdtemp(dir=root, prefix=".step_4.", suffix=".tmp")),  # atomic_dir's naming
                 root / ".step_1.old", root / ".step_0.pruning"]
    for p in leftovers[1:]:
        p.mkdir()
    (root / ".step_0.pruning" / "half").write_text("x")
    # what a user may keep there: none of it is touched
    (root / "notes.txt").write_text("mine")
    (root / "step_9").write_text("a file, not a directory")
    (root / "my_step_5").mkdir()
    (root / "step_best").mkdir()
    (root / ".step_6.tmp").mkdir()  # not atomic_dir's `.step_N.<random>.tmp`
    (root / ".keep").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "data").write_text("keep")
    (root / "step_7").symlink_to(outside, target_is_directory=True)

    with caplog.at_level(logging.WARNING, logger="aepo.train.checkpoint"):
        removed = remove_incomplete_checkpoints(root)
    assert sorted(p.name for p in removed) == sorted(["step_2", "step_3", *(p.name for p in leftovers)])
    assert names(root) == sorted([".keep", ".step_6.tmp", "my_step_5", "notes.txt", "step_1", "step_7",
                                  "step_9", "step_best"])
    assert (outside / "data").read_text() == "keep"
    for p in removed:
        assert any(str(p) in r.getMessage() for r in caplog.records), p
    assert remove_incomplete_checkpoints(root) == []
    assert remove_incomplete_checkpoints(tmp_path / "missing") == []


def test_a_killed_save_leaves_nothing_resume_would_pick(tmp_path):
    """A real SIGKILL while the model files are written: the temp dir stays behind, is never
    taken for a checkpoint, and the cleaner removes it."""
    root = tmp_path / "checkpoints"
    save(root, 1)
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {SRC!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        sys.path.insert(0, {str(repo_paths.ROOT / 'tests')!r})  # the helpers test_checkpoint imports
        import torch
        from test_checkpoint import FakeModel, FakeTokenizer
        from aepo.train.checkpoint import save_checkpoint

        class Hangs(FakeModel):
            def save_pretrained(self, directory, safe_serialization=True):
                super().save_pretrained(directory)
                Path({str(ready)!r}).write_text(directory)
                time.sleep(600)

        p = torch.nn.Parameter(torch.zeros(2))
        save_checkpoint({str(root)!r}, 2, Hangs(), FakeTokenizer(), torch.optim.SGD([p], lr=0.1), None, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the saving process did not start (exit status {proc.poll()})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    tmp = Path(ready.read_text())
    assert tmp.parent == root and tmp.name.startswith(".step_2.") and tmp.exists()
    assert latest_checkpoint(root).name == "step_1"
    assert [p.name for p in remove_incomplete_checkpoints(root)] == [tmp.name]
    assert names(root) == ["step_1"]


def test_a_kill_during_a_prune_never_leaves_a_partial_step_dir(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(root, 1)
    save(root, 2)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        (Path(path) / "model.safetensors").unlink()  # part of the directory is gone ...
        raise KeyboardInterrupt  # ... when the process dies

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save(root, 3)  # keep_last=2: prunes step_1
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert names(root) == [".step_1.pruning", "step_2", "step_3"]
    assert all(is_complete_checkpoint(p) for p in root.glob("step_*"))
    assert latest_checkpoint(root).name == "step_3"
    assert [p.name for p in remove_incomplete_checkpoints(root)] == [".step_1.pruning"]
    assert load_trainer_state(latest_checkpoint(root))["step"] == 3


def test_pruning_keeps_the_newest_and_clears_a_stale_pruning_dir(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step_1.pruning").mkdir(parents=True)  # left by an earlier interrupted prune
    for step in (1, 2, 3):
        save(root, step)
    assert names(root) == ["step_2", "step_3"]
    for step in (4, 5):
        save(root, step, keep_last=0)
    assert names(root) == ["step_2", "step_3", "step_4", "step_5"]


# ----------------------------------------------------------------------------- disk full


def assert_disk_full_message(exc: DiskFullError, path: Path) -> None:
    text = str(exc)
    assert "disk full" in text and "no space left on device" in text
    assert str(path) in text
    assert " free there" in text
    assert "trainer.out_dir" in text and "trainer.keep_last (now 2" in text
    assert "one checkpoint takes about" in text  # the size of the one that exists
    assert exc.errno == errno.ENOSPC and isinstance(exc, OSError)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_during_torch_save_is_named_and_cleaned_up(tmp_path, monkeypatch, code):
    root = tmp_path / "checkpoints"
    save(root, 1)

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(DiskFullError) as info:
        save(root, 2)
    assert_disk_full_message(info.value, root / "step_2")
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == code
    assert names(root) == ["step_1"]  # no temp dir left, the older checkpoint untouched
    assert load_trainer_state(root / "step_1")["step"] == 1


def test_torch_short_write_counts_as_disk_full_only_when_the_disk_is_nearly_full(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(root, 1)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def short_write(obj, f, *args, **kwargs):
        raise torch_error

    monkeypatch.setattr(ck.torch, "save", short_write)
    monkeypatch.setattr(aepo_io, "free_bytes", lambda path: 4096)
    with pytest.raises(DiskFullError) as info:
        save(root, 2)
    assert_disk_full_message(info.value, root / "step_2")
    assert "(4096 bytes) free there" in str(info.value)
    monkeypatch.setattr(aepo_io, "free_bytes", lambda path: 50 * 2**30)
    with pytest.raises(RuntimeError) as plain:
        save(root, 2)
    assert plain.value is torch_error  # plenty of room: some other write failure, passed on as is
    assert names(root) == ["step_1"]


def test_safetensors_disk_full_text_is_recognised(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(root, 1)

    class SafetensorError(Exception):
        """Stands in for safetensors_rust.SafetensorError, which keeps only the OS text."""

    class FullDisk(FakeModel):
        def save_pretrained(self, directory, safe_serialization=True):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                            'message: "No space left on device" })')

    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(root, 2, FullDisk(), FakeTokenizer(), torch.optim.SGD([p], lr=0.1), None, {})
    assert_disk_full_message(info.value, root / "step_2")
    assert names(root) == ["step_1"]


def dev_full_is_a_device() -> bool:
    try:
        return stat.S_ISCHR(os.stat("/dev/full").st_mode)
    except OSError:
        return False


@pytest.mark.skipif(not dev_full_is_a_device(), reason="needs the /dev/full device")
def test_torch_save_through_a_file_reports_enospc():
    """Why save_checkpoint hands torch.save an open file: a full device then raises
    OSError(ENOSPC), not torch's bare "unexpected pos" RuntimeError."""
    with pytest.raises(OSError) as info, open("/dev/full", "wb") as f:
        torch.save({"x": torch.zeros(100_000)}, f)
    assert is_disk_full(info.value, free=None)


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(PermissionError), atomic_dir(tmp_path / "step_1"):
        raise PermissionError(errno.EACCES, "Permission denied")
    assert names(tmp_path) == []


def test_pruning_a_symlinked_checkpoint_removes_only_the_link(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 2)
    elsewhere = tmp_path / "archive" / "step_1"
    elsewhere.parent.mkdir()
    shutil.move(str(save(tmp_path / "other", 1)), elsewhere)
    (root / "step_1").symlink_to(elsewhere, target_is_directory=True)
    assert [p.name for p in checkpoint_dirs(root)] == ["step_1", "step_2"]
    save(root, 3)
    assert names(root) == ["step_2", "step_3"]
    assert is_complete_checkpoint(elsewhere)  # the link went, its target stayed
