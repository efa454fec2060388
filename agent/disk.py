"""Disk use of a long study: which experiments keep their checkpoints, and room for the next.

Every harness run leaves a checkpoint (weights plus AdamW moments) in ``experiments/<n>/``.
That is 0.8 GiB per run for the ``vit-s16`` preset (71 M parameters, 12 bytes each), so a
night of 100 runs would fill a 64 GB disk, and the run that meets the full disk crashes,
then every run after it. So:

- ``--keep-checkpoints`` says whose checkpoints stay once a run has ended. ``kept`` keeps
  the baseline runs' and the kept experiments', the models the study's trail is made of;
  ``best`` keeps only the current best's (the last kept experiment's, or the best-scoring
  baseline run's before any keep); ``all`` and ``none`` say what they mean. Everything
  else in the folder (log, result, diff, transcript) always stays, except what a killed
  run left half-done: the evaluation inputs and embeddings, and temporary files of a
  save. The rule is applied to the whole journal after each run and at start-up, so a
  study resumed with a stricter rule frees the space of its earlier runs.
- Before each run the loop checks the free space under the workspace against what a run
  writes (``needed_bytes``), and stops cleanly, exit code 1, when it is short.
- A run that met a full disk is recorded ``interrupted``, not ``crash``: the recipe did
  nothing wrong and a proposer must not try to repair it; the loop stops. The harness says
  so (``disk_full``) when one of its own writes failed (an isolated run's copy of the
  training split, the evaluation's inputs); or the run's log says it (``No space left on
  device``) and a disk is still short of room: the workspace's for the next run, the
  temporary or home directory's of ``MIN_FREE``; or the workspace's disk has under
  ``LOW_FREE`` left, where the log could not even say it. A log that says it with room on
  all stays the recipe's failure: the words alone, which a recipe can print, or a disk its
  own files filled and freed as they went, must not stop a study. A full disk under the
  loop's own writes (journal, diffs), the session's start included, stops it too.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

POLICIES = ("kept", "best", "all", "none")
FILES = ("checkpoint.safetensors", "checkpoint.json")  # eclip.checkpoint's TENSORS and META
GIB = 1 << 30
MIN_FREE = 1 * GIB  # room asked before any checkpoint size is known, and on top of one after
ENOSPC_TEXT = "No space left on device"  # strerror(ENOSPC), as tracebacks and shells print it


class OutOfSpace(Exception):
    """The disk under the workspace is (nearly) full: the loop stops rather than fail every run."""


def checkpoint_bytes(out: Path) -> int | None:
    """Size of the checkpoint files a run left in ``out`` (None when it left none)."""
    sizes = [(out / name).stat().st_size for name in FILES if (out / name).is_file()]
    return sum(sizes) if sizes else None


def summary(experiments_dir: Path) -> str:
    """``<count> kept (<size>)``: the checkpoints left under ``experiments/`` (final runs too)."""
    sizes = [size for d in experiments_dir.iterdir() if (size := checkpoint_bytes(d)) is not None] \
        if experiments_dir.is_dir() else []
    return f"{len(sizes)} kept ({sum(sizes) / GIB:.2f} GiB)"


def keep_set(exps: list[dict], policy: str) -> set[int] | None:
    """Numbers of the ended experiments whose checkpoints stay; None means all of them."""
    if policy not in POLICIES:
        raise ValueError(f"keep-checkpoints policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if policy == "all":
        return None
    if policy == "none":
        return set()
    base = [e for e in exps if e.get("kind") == "baseline" and e.get("status") == "baseline"]
    kept = [e for e in exps if e.get("kept")]
    if policy == "kept":
        return {e["n"] for e in base + kept}
    if kept:
        return {kept[-1]["n"]}
    scored = [e for e in base if isinstance(e.get("val_mean_rank"), (int, float))]
    return {min(scored, key=lambda e: e["val_mean_rank"])["n"]} if scored else set()


# What a run killed mid-way (a timeout, the loop killed) leaves, whatever the policy: the
# harness's evaluation inputs and embeddings (in a folder per encoding process; loose files
# in runs of older versions), an isolated run's copies of the training split and of the
# compile cache, the temporary files of an atomic write (eclip.fileio.atomic_write:
# ".<name>.tmp-<pid>"), up to a whole checkpoint in size, and a cache build's temporary
# folder and lock (eclip.data.cache: ".train_data.tmp-<pid>-*", ".train_data.lock").
LEFTOVERS = ("eval_*.safetensors", "emb_*.safetensors", ".*.tmp-*", ".*.lock")
LEFTOVER_FOLDERS = ("eval_*", "train_data", "compile_cache", ".*.tmp-*")


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder``."""
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() and not path.is_symlink() else 0
        except OSError:
            pass
    return total


def clear_leftovers(run: Path) -> tuple[list[Path], int]:
    """Remove the LEFTOVER_FOLDERS of the run folder ``run``; returns its loose LEFTOVERS
    (for the caller to delete and count) and the bytes the folders held."""
    freed = 0
    for pattern in LEFTOVER_FOLDERS:
        for folder in run.glob(pattern):
            if folder.is_dir() and not folder.is_symlink():
                freed += folder_bytes(folder)
                shutil.rmtree(folder, ignore_errors=True)
    # files only: a folder matching a loose pattern went above, or is no leftover (unlink would fail on it)
    return [path for pattern in LEFTOVERS for path in run.glob(pattern) if path.is_file() or path.is_symlink()], freed


def prune(experiments_dir: Path, exps: list[dict], policy: str) -> tuple[int, int]:
    """Delete the checkpoints of ended experiments outside ``keep_set`` and, whatever the
    policy, the LEFTOVERS of ended runs (their logs stay); returns (checkpoints deleted,
    bytes freed). A run still in flight (no end journaled) is never touched. The final
    runs' folders (``final-<commit>``, written by ``agent.report --final``) lose their
    leftovers too, never their checkpoint (the study's product): the caller holds the
    workspace's lock, which a final run holds while it trains, so none is in flight."""
    keep = keep_set(exps, policy)
    count = freed = 0
    runs = [(experiments_dir / str(e["n"]), keep is not None and e["n"] not in keep) for e in exps if e.get("ended")]
    if experiments_dir.is_dir():
        runs += [(run, False) for run in sorted(experiments_dir.glob("final-*")) if run.is_dir() and not run.is_symlink()]
    for run, drop_checkpoint in runs:
        doomed, size = clear_leftovers(run)
        freed += size
        if drop_checkpoint:
            doomed += [run / name for name in FILES]
            count += (run / FILES[0]).is_file()
        for path in doomed:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            freed += size
    return count, freed


def needed_bytes(exps: list[dict], experiments_dir: Path | None = None) -> int:
    """What the next run may write: the largest checkpoint a run of this study has left
    (journaled as ``checkpoint_bytes``, so pruned ones count; or still on disk, for runs
    journaled before sizes were), a quarter more for a change that grows the model, plus
    ``MIN_FREE`` for logs, embeddings and the compile cache."""
    sizes = [(e.get("result") or {}).get("checkpoint_bytes") for e in exps]
    if experiments_dir is not None and experiments_dir.is_dir():
        sizes += [checkpoint_bytes(d) for d in experiments_dir.iterdir()]
    largest = max((s for s in sizes if isinstance(s, int) and not isinstance(s, bool)), default=0)
    return int(largest * 1.25) + MIN_FREE


def space_error(root: Path, exps: list[dict]) -> str | None:
    """The reason to stop before the next run, or None when the disk has room for it."""
    free, need = shutil.disk_usage(root).free, needed_bytes(exps, root / "experiments")
    if free >= need:
        return None
    return (f"{root}: {free / GIB:.1f} GiB free, a run needs about {need / GIB:.1f} GiB (its checkpoint, logs and "
            "compile cache); free some space, or resume with --keep-checkpoints best or none")


def ran_out_of_space(result: dict) -> bool:
    """Whether a failed run's log tail says a disk was full (a recipe can print that too:
    ``still_full`` decides)."""
    return result.get("status") != "ok" and ENOSPC_TEXT in str(result.get("log_tail", ""))


LOW_FREE = 64 << 20  # free bytes below which a run's log may have found no room to say why it failed


def nearly_full(root: Path) -> str | None:
    """After a run that failed without a word of a full disk: the reason to stop when the
    workspace's disk has under ``LOW_FREE`` left (its log, there, could not say), else None.
    Less room than a run needs is not enough: the failed run's own files, about to be pruned,
    may hold it, and the check before the next run decides that."""
    free = shutil.disk_usage(root).free
    if free >= LOW_FREE:
        return None
    return f"{root}: {free / (1 << 20):.0f} MiB free after the run; free some space"


def still_full(root: Path, exps: list[dict]) -> str | None:
    """After a run whose log said a disk was full: the reason to stop, the workspace's disk
    short of room for the next run or the temporary or home directory's of ``MIN_FREE``;
    None when all have room, and the run is then the recipe's failure (it filled a disk with
    files that went with it, or it printed the words)."""
    why = space_error(root, exps)
    if why is not None:
        return why
    for place, what in ((Path(tempfile.gettempdir()), "the temporary directory"),
                        (Path.home(), "the home directory, whose caches compilers write")):
        try:
            free = shutil.disk_usage(place).free
        except OSError:  # no such folder: nothing written there
            continue
        if free < MIN_FREE:
            return f"{place}: {free / GIB:.2f} GiB free in {what}, a run needs {MIN_FREE / GIB:.0f} GiB; free some space"
    return None
