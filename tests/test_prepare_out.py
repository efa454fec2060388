"""``python -m eclip.prepare`` and its --out directory: folders that are not ours, file
permissions, damaged caches rebuilt or refused, and what makes a cache be reused or rebuilt."""

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from prepare_support import manifest_args
from safetensors.numpy import load_file, save_file
from test_prepare import run

from eclip import prepare
from eclip.data.cache import load_cache, read_manifest
from eclip.errors import EclipError

ROOT = Path(__file__).resolve().parents[1]


def test_out_with_a_manifest_of_another_tool_is_left_alone(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "ext"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my extension"}')
    (out / "precious.txt").write_text("precious")
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 2 and "exists and is not a cache; refusing to replace it" in err, err
    assert (out / "precious.txt").read_text() == "precious" and len(list(out.iterdir())) == 2
    # a real cache with a file of the user's put in it is not replaced either
    cache = tmp_path / "cache"
    assert run(manifest_args(images, path, cache), capsys)[0] == 0
    (cache / "notes.txt").write_text("mine")
    rc, _, err = run(manifest_args(images, path, cache, "--image-size", 4), capsys)
    assert rc == 2 and "holds 'notes.txt', which is not part of the cache" in err, err
    assert (cache / "notes.txt").read_text() == "mine" and load_cache(cache).image_size == 8
    (cache / "notes.txt").unlink()
    rc, stdout, err = run(manifest_args(images, path, cache, "--image-size", 4), capsys)
    assert rc == 0 and "status:             built" in stdout and load_cache(cache).image_size == 4


def test_cache_files_are_as_readable_as_the_cache_directory(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "c"
    old = os.umask(0o022)
    try:
        rc, _, err = run(manifest_args(images, path, out), capsys)
    finally:
        os.umask(old)
    assert rc == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert "images.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_the_working_directory_is_refused_as_out_before_the_build(images, tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"image": "0.png", "caption": "fine"}) + "\n")
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", ".."):
        rc, _, err = run(manifest_args(images, path, out), capsys)
        assert rc == 2 and err.strip().splitlines()[-1] == (
            f"prepare: error: {out}: is the working directory or holds it, and a build replaces --out whole; "
            f"name a folder inside it (--out {out}/cache)")
        assert err.count("error") == 1
    assert here.is_dir() and not any(here.iterdir())


@pytest.mark.parametrize("damage", ["cut short", "deleted"])
def test_a_damaged_cache_is_rebuilt_not_reused(images, tmp_path, capsys, damage):
    # a copy cut short keeps its manifest: the sizes recorded at build time tell it apart
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "c"
    assert run(manifest_args(images, path, out), capsys)[0] == 0
    f = out / "images.safetensors"
    if damage == "cut short":
        f.write_bytes(f.read_bytes()[:-7])
        with pytest.raises(EclipError, match="images.safetensors: has another size than when it was built; rebuild"):
            load_cache(out)
    else:
        f.unlink()
    rc, stdout, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0 and "status:             built" in stdout, err
    assert load_cache(out).images.shape == (1, 3, 8, 8)


def test_a_cache_missing_a_tensor_is_refused_by_name(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "c"
    assert run(manifest_args(images, path, out), capsys)[0] == 0
    ann = out / "annotations.safetensors"
    arrays = load_file(str(ann))
    del arrays["fold"]  # as written by an older prepare, say
    save_file(arrays, str(ann))
    m = read_manifest(out)
    m["sizes"]["annotations.safetensors"] = ann.stat().st_size
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EclipError, match=r"annotations.safetensors: missing tensors fold$"):
        load_cache(out)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"'])
def test_out_with_a_manifest_json_that_is_no_object_is_left_alone(images, tmp_path, capsys, text):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "other"
    out.mkdir()
    (out / "manifest.json").write_text(text)
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 2 and "other: exists and is not a cache; refusing to replace it" in err, err
    assert (out / "manifest.json").read_text() == text
    with pytest.raises(EclipError, match="not a prepared cache, manifest.json missing or unreadable"):
        load_cache(out)


def test_an_existing_empty_out_directory_is_used(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "made-by-hand"
    out.mkdir()
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0, err
    assert load_cache(out).images.shape[0] == 1


def test_a_cache_holding_several_foreign_files_names_the_first_and_counts_the_rest(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "c"
    assert run(manifest_args(images, path, out), capsys)[0] == 0
    for name in ("b.txt", "a.txt", "c.txt"):
        (out / name).write_text("mine")
    # --force: without it the unchanged cache is reused as it is, and nothing is replaced
    rc, _, err = run(manifest_args(images, path, out, "--force"), capsys)
    assert rc == 2 and "holds 'a.txt' and 2 more, which is not part of the cache" in err, err


@pytest.mark.parametrize("change", [["--force"], ["--resize", "center-crop"], ["--seed", "7"],
                                    ["--phrase-length", "5"], ["bump", "READ_VERSION"], ["bump", "DECODE_VERSION"]],
                         ids=lambda c: " ".join(c))
def test_a_changed_option_or_reader_version_rebuilds(images, tmp_path, capsys, monkeypatch, change):
    # the same inputs and options reuse the cache; each of these must build it afresh
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "c"
    assert run(manifest_args(images, path, out), capsys)[0] == 0
    rc, stdout, _ = run(manifest_args(images, path, out), capsys)
    assert rc == 0 and "status:             reused" in stdout
    if change[0] == "bump":  # a new reader or decoder: caches of the old one are stale
        monkeypatch.setattr(prepare, change[1], getattr(prepare, change[1]) + 1)
        change = []
    rc, stdout, err = run(manifest_args(images, path, out, *change), capsys)
    assert rc == 0 and "status:             built" in stdout, err


def test_out_with_an_undecodable_manifest_json_is_refused_in_one_line(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    out = tmp_path / "other"
    out.mkdir()
    (out / "manifest.json").write_bytes(b"\xff\xfe binary, another tool's")
    rc, _, err = run(manifest_args(images, path, out), capsys)
    assert rc == 2 and "exists and is not a cache; refusing to replace it" in err, err


# prepare in a process that signals itself as it saves its first file into the temporary folder
STOPPED_DRIVER = """
import os, signal, sys
from eclip.data import cache
_save = cache.CacheWriter.save_arrays
def save_arrays(self, name, arrays):
    os.kill(os.getpid(), int(sys.argv[1]))
    return _save(self, name, arrays)
cache.CacheWriter.save_arrays = save_arrays
from eclip import prepare
sys.exit(prepare.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_build_stopped_by_a_signal_leaves_nothing(tmp_path, sig):
    # SIGTERM (a scheduler's stop, timeout's) once ended the build at once, exit 143 and no
    # word, leaving the hidden half-written cache beside --out for good
    out = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", STOPPED_DRIVER, str(int(sig)), "--dataset", "synthetic", "--out",
                           str(out), "--num-train", "60", "--num-val", "10", "--num-test", "10", "--image-size", "16",
                           "--workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "prepare: interrupted; nothing was written", proc.stderr
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its temporary folder


def test_a_subset_written_for_an_isolated_run_is_rebuilt_not_reused(images, tmp_path, capsys):
    # it keeps its cache's fingerprint: prepare took it for current, "reused" with the whole
    # cache's counts, and the cache held the training images only
    import torch

    from eclip.data.cache import write_subset

    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n1.png,another\n2.png,a third\n")
    full = tmp_path / "c"
    assert run(manifest_args(images, path, full), capsys)[0] == 0
    sub = tmp_path / "sub"
    write_subset(load_cache(full), torch.tensor([0, 2]), sub)
    rc, stdout, err = run(manifest_args(images, path, sub), capsys)
    assert rc == 0 and "status:             built" in stdout, err
    assert load_cache(sub).images.shape[0] == 3 and "subset_of" not in read_manifest(sub)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_what_a_killed_build_left_is_cleaned_up_by_the_next(images, tmp_path, capsys):
    # kill -9 mid-build left .c.tmp-* (a whole cache's size) for ever; one killed between
    # moving the old cache aside and putting the new one in place left no cache at --out
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n1.png,another\n")
    out = tmp_path / "c"
    assert run(manifest_args(images, path, out), capsys)[0] == 0
    pid = dead_pid()
    aside = tmp_path / f".c.old-{pid}"
    os.replace(out, aside)  # where a killed commit left the previous cache
    (tmp_path / f".c.tmp-{pid}-x1y2").mkdir()
    (tmp_path / f".c.tmp-{pid}-x1y2" / "images.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / ".c.lock").write_text("")  # the killed build's lock file (its flock went with it)
    others = [tmp_path / ".cx.tmp-1-abc", tmp_path / ".c.tmp-backup", tmp_path / ".c.old-12x"]  # not a build's
    for other in others:
        other.mkdir()
    rc, stdout, err = run(manifest_args(images, path, out), capsys)
    assert rc == 0 and "status:             reused" in stdout, err  # the old cache back, and current
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".c")) == sorted(o.name for o in others)


def test_a_second_build_of_a_cache_under_way_is_refused_and_leaves_the_first_alone(images, tmp_path, capsys):
    # leftovers are recognised under the build's lock, not by a pid (another host, another
    # PID namespace, would see the first build's pid as dead and remove its folder)
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n1.png,another\n")
    out = tmp_path / "c"
    code = ("import sys, time; from eclip.data.cache import CacheWriter; w = CacheWriter(sys.argv[1]).__enter__(); "
            "print(w.tmp, flush=True); time.sleep(120)")
    first = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(first.stdout.readline().strip())  # the first build's folder, under way
        rc, _, err = run(manifest_args(images, path, out), capsys)
        assert rc == 2 and err.splitlines()[-1] == (
            f"prepare: error: {out}: another build of this cache is under way (it holds {tmp_path / '.c.lock'}); "
            "wait for it to end")
        assert tmp.is_dir() and tmp.name.startswith(f".c.tmp-{first.pid}-")
    finally:
        first.kill()
        first.wait()
    assert run(manifest_args(images, path, out), capsys)[0] == 0  # killed: its folder and lock cleaned up
    assert not tmp.exists() and not (tmp_path / ".c.lock").exists()


def test_an_out_that_is_a_link_leaves_nothing_aside_when_replaced(images, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n0.png,a picture\n")
    real = tmp_path / "real"
    assert run(manifest_args(images, path, real), capsys)[0] == 0
    (tmp_path / "c").symlink_to(real)
    assert run(manifest_args(images, path, tmp_path / "c", "--force"), capsys)[0] == 0
    assert not (tmp_path / "c").is_symlink() and real.is_dir()  # the link replaced, its target kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".c")] == []
