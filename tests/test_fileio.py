"""eclip.fileio: a file is replaced whole, and its data reach the disk before its new name."""

from __future__ import annotations

import os
import re

import pytest
import torch

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


def test_a_leftover_temporary_of_this_pid_is_cleared_first(tmp_path):
    # a process killed mid-write leaves its temporary behind; a later process given the same
    # pid must start from an empty one (a writer that creates its file exclusively, or one
    # that appends, would otherwise fail or keep the stale bytes)
    path = tmp_path / "a.txt"
    (tmp_path / f".a.txt.tmp-{os.getpid()}").write_text("stale")

    def exclusive(p):
        with open(p, "x") as f:
            f.write("new")

    fileio.atomic_write(path, exclusive)
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_writes_leave_no_descriptor_open(tmp_path):
    # a checkpoint or result is written many times in a long run: a descriptor kept per fsync
    # would run the process out of them
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        fileio.atomic_write(tmp_path / "a.txt", lambda p: p.write_text("x"))
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("prefix", [None, "model."])
@pytest.mark.parametrize("damage", ["missing", "cut short", "not safetensors"])
def test_an_unreadable_tensors_file_is_one_error_naming_it(tmp_path, prefix, damage):
    from safetensors.torch import save_file

    from eclip.errors import EclipError

    path = tmp_path / "w.safetensors"
    if damage != "missing":
        save_file({"model.a": torch.ones(64)}, str(path))
        path.write_bytes(path.read_bytes()[:40] if damage == "cut short" else b"\x00" * 3)
    with pytest.raises(EclipError, match=rf"^{re.escape(str(path))}: unreadable \(.+\); rebuild it$"):
        fileio.read_tensors(path, "rebuild it", prefix=prefix)


def test_a_prefix_reads_only_the_tensors_it_names(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    tensors = {"model.a": torch.arange(3.0), "model.b": torch.ones(2, 2), "optim.0.model.c": torch.zeros(1)}
    save_file(tensors, str(path))
    got = fileio.read_tensors(path, prefix="model.")
    assert got.keys() == {"model.a", "model.b"}
    assert all(torch.equal(got[k], tensors[k]) for k in got)
    assert fileio.read_tensors(path).keys() == tensors.keys()


def test_a_failed_write_names_the_path_asked_for_not_the_temporary_file(tmp_path):
    # the rename's error carried the temporary sibling (".out.tmp-<pid>") as its file name
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        fileio.atomic_write(tmp_path / "out", lambda p: p.write_text("x"))
    assert e.value.filename == str(tmp_path / "out") and e.value.filename2 is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary file left


def test_a_missing_folder_is_named_before_anything_is_written(tmp_path):
    # each writer failed its own way there (safetensors with an error that is not an OSError)
    called = []
    with pytest.raises(FileNotFoundError, match="its folder .*missing does not exist") as e:
        fileio.atomic_write(tmp_path / "missing" / "f.json", called.append)
    assert e.value.filename == str(tmp_path / "missing" / "f.json") and not called
