"""Atomic writes leave either the old file or the new one, never a torn one."""
import errno
import json
import os

import pytest

from aepo.io import (
    NEARLY_FULL_BYTES,
    DiskFullError,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    format_bytes,
    is_disk_full,
    read_jsonl,
    write_jsonl,
)


def test_atomic_text_replaces(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]


def test_atomic_dir_failure_keeps_old(tmp_path):
    d = tmp_path / "ck"
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "x").write_text("new")
            raise RuntimeError("killed")
    assert (d / "x").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_jsonl_round_trip_and_bad_line(tmp_path):
    p = tmp_path / "r.jsonl"
    write_jsonl(p, [{"a": 1}, {"b": "é"}])
    assert read_jsonl(p) == [{"a": 1}, {"b": "é"}]
    p.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"r\.jsonl:2"):
        read_jsonl(p)
    p.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="JSON object"):
        read_jsonl(p)


def test_atomic_json(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"x": 1.5})
    assert json.loads((tmp_path / "s.json").read_text()) == {"x": 1.5}


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_on_a_full_disk_says_so_and_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "metrics.json"
    atomic_write_text(p, "old")
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(DiskFullError) as info:
        atomic_write_text(p, "new")
    text = str(info.value)
    assert text.startswith("disk full (no space left on device) while writing ")
    assert str(p) in text and " free there" in text and "trainer.out_dir" in text
    assert info.value.errno == errno.ENOSPC and info.value.path == p
    assert isinstance(info.value.free_bytes, int)
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_atomic_dir_on_a_full_disk_removes_the_temp_dir(tmp_path, code):
    d = tmp_path / "model"
    hint = "delete old runs"
    with pytest.raises(DiskFullError, match="disk full") as info, atomic_dir(d, disk_full_hint=hint) as tmp:
        (tmp / "part").write_text("x")
        raise OSError(code, os.strerror(code))
    assert str(d) in str(info.value) and str(info.value).endswith("To fix: delete old runs.")
    assert list(tmp_path.iterdir()) == []


def test_nested_disk_full_names_the_os_error_once(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(DiskFullError) as info, atomic_dir(tmp_path / "model") as tmp:
        atomic_write_text(tmp / "history.jsonl", "{}")
    text = str(info.value)
    assert str(tmp_path / "model") in text and text.count("disk full") == 1
    assert "(OSError: [Errno 28] No space left on device)" in text
    assert list(tmp_path.iterdir()) == []


def test_disk_full_recognition():
    assert is_disk_full(OSError(errno.ENOSPC, "x"), None)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), 0)
    wrapped = RuntimeError("writing failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert is_disk_full(wrapped, None)
    assert is_disk_full(ValueError("IoError: No space left on device (os error 28)"), None)
    short = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert is_disk_full(short, NEARLY_FULL_BYTES - 1)
    assert not is_disk_full(short, NEARLY_FULL_BYTES)
    assert not is_disk_full(short, None)  # free space unknown: not claimed


def test_format_bytes():
    assert format_bytes(0) == "0 bytes"
    assert format_bytes(1023) == "1023 bytes"
    assert format_bytes(1536) == "1.5 KiB (1536 bytes)"
    assert format_bytes(3 * 2**30) == "3.0 GiB (3221225472 bytes)"
