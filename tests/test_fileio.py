"""eclip.fileio: a file is replaced whole, and its data reach the disk before its new name."""

from __future__ import annotations

import os

import pytest

from eclip import fileio


def _record(monkeypatch):
    """Log every fsync (by what the descriptor names) and every rename, in order."""
    events, opened = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def open_(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        opened[fd] = os.fspath(path)
        return fd

    def fsync(fd):
        events.append(("fsync", opened.get(fd, fd)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "open", open_)
    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    return events


def test_data_then_rename_then_folder_reach_the_disk(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    path.write_text("old\n")
    events = _record(monkeypatch)
    fileio.atomic_write(path, lambda p: p.write_text("new\n"))
    assert path.read_text() == "new\n"
    tmp = os.fspath(tmp_path / f".result.json.tmp-{os.getpid()}")
    assert events == [("fsync", tmp), ("replace", tmp, os.fspath(path)), ("fsync", os.fspath(tmp_path))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old\n")

    def half(p):
        p.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write(path, half)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_folder_that_refuses_fsync_still_gets_the_file(tmp_path, monkeypatch):
    # Some file systems answer a folder's fsync with EINVAL; the rename has happened by then.
    events = _record(monkeypatch)
    recorded = os.fsync  # _record's: logs, then flushes

    def fsync(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(22, "Invalid argument")
        return recorded(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    path = tmp_path / "a.txt"
    fileio.atomic_write(path, lambda p: p.write_text("x"))
    assert path.read_text() == "x"
    assert [e[0] for e in events] == ["fsync", "replace"]  # the file's, then the rename


def test_a_file_whose_fsync_fails_is_not_renamed(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        fileio.atomic_write(path, lambda p: p.write_text("new"))
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
