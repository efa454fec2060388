"""``python -m eclip.harness run``: the referee. Runs one recipe file through the one
training loop and scores it; the research loop calls it as a subprocess.

    python -m eclip.harness run --recipe runs/T/recipe.py --data CACHE --budget-s 180 --out DIR

Before anything runs, the recipe passes the static policy check (``eclip.policy``); a
rejected recipe gets ``result.json`` with status ``rejected`` and the offending lines, exit 2.
The harness then removes secrets from its environment (a recipe has no reason to see an API
key), points ``TORCHINDUCTOR_CACHE_DIR`` at the given compile cache (shared by a
workspace's runs, so a second run of the same model compiles in seconds), caps the address
space on CPU so an allocation fails with ``oom`` instead of the kernel's OOM killer ending
the run, and runs the recipe in child processes, none of which holds the pairs it is
scored on:

1. ``eclip.train --train-only`` (the one training loop, its clock, its ``result.json``)
   drops every image but the training split's from memory before it imports the recipe,
   trains, and saves the checkpoint.
2. Three ``eclip.encode`` processes at once rebuild the model from the checkpoint; one
   encodes the scored split's images, another its captions, each handed over in an order
   only the harness knows, with no pairs and no cache path (neither sees the other side);
   the third encodes fresh copies of a few of each, for the batch check below.

None of them holds the pairs in memory, but without ``--isolate`` each can read the cache
on disk, which code that evades the recipe check (``eclip.policy``, a deny-list) can do.
With ``--isolate`` each runs in a sandbox (``eclip.sandbox``) whose file system has the
system, the interpreter and the project's packages, and otherwise only: for training, a
copy of its split (``TRAIN_DATA`` in the run directory, removed when training ends), the
recipe, the run directory and the compile cache; for each encoder, the recipe, the
checkpoint's two files and its own folder (``part_dir``). The cache is checked invisible in
each before the recipe's code runs; ``isolated`` in ``result.json`` says which way a run went.

The harness itself never imports the recipe: it puts the embeddings back in place, ranks
them against the cache's own pairs and writes the metrics into ``result.json``
(``ranked_by: harness``). Whatever a recipe changes in its own processes (an operator, a
module, a class, a frame it walks), it finds no evaluation data in them to exploit, and the
ranking does not run there. Training outside the clock is refused too: the harness times
the training process itself from a line it prints before importing the recipe to its end
(``recipe_wall_s``, a figure the recipe's code cannot misreport; at most the budget, the
grace below and ``RECIPE_WALL_SLACK_S``, plus time to move the data and the checkpoint); the last step may end
``OVERRUN_GRACE_S`` after the budget, the recipe's code after it (``after_s``, timed by the
loop, the checkpoint's file writes aside) gets ``AFTER_GRACE_S``, and each encoding process
``EVAL_GRACE_S`` from the end of its start-up plus an allowance for the number of items; a
run over any limit ends with status ``error``. On the CPU, where other work on the machine
slows a run, the last step's overrun and the encoders' time are measured in compute instead:
CPU time divided by ``torch_threads`` (torch's default thread count, at most the CPUs the
harness may use), with wall time still capped at ``WALL_FACTOR`` times the limit; the
children see no GPU there, whose work CPU time would not show. GPU runs are timed in wall
time. The limits bound such work; they cannot tell it from slowness.

An embedding must be a function of its own input: a model that uses the other items it is
given (their mean, their spread: up to 512 of the scored split per batch, and all of it
across the calls of one process) would make a transductive use of the split. So a third
``eclip.encode`` process, started fresh, encodes ``BATCH_PROBES`` images and as many
captions, drawn in secret, in pairs; each must get the embedding it got among the rest
(``eclip.scoring.batch_check``, within its ``BATCH_TOL``), or the run is an ``error``.
``batch_gap`` in ``result.json`` says how close they came. A use so slight that it stays
within the tolerance passes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from eclip import sandbox
from eclip.errors import EclipError, OneLineParser, seed_value
from eclip.fileio import check_regular, file_bytes, read_regular, remove
from eclip.loop import write_json
from eclip.policy import check_file
from eclip.process import (
    PR_SET_CHILD_SUBREAPER,
    cpu_seconds,
    die_with_parent,
    exit_main,
    kill_strays,
    own_children,
    prctl,
    scrub_environment,
    sigterm_as_ctrl_c,
)
from eclip.scoring import score

# one eclip.encode process each: the scored split's images; its captions (none sees both
# sides of a pair); and fresh copies of a few of each, encoded in pairs (the batch check)
PARTS = ("images", "texts", "batch_check")
# what only the harness's ranking writes into a result: never taken from a child's result.json
SCORED = ("val_mean_rank", "test_mean_rank", "metrics", "batch_gap")
BATCH_PROBES = 16  # images, and as many captions, that the batch check encodes again
# Work the recipe may do outside its budget. Encoding is cheap next to training (one
# forward, no backward, over a split far smaller than the training data), so a run whose
# recipe code takes longer than this after the clock stopped, or to encode, is refused:
# that time would be training nobody counted.
AFTER_GRACE_S = 3.0  # after the last step: gathering the checkpoint's tensors to the host, the FLOP count
START_LIMIT_S = 120.0  # an encoding process's start-up (imports, device): before any recipe code
EVAL_GRACE_S = 10.0  # then, per encoding process: the recipe's import, its model, the weights
EVAL_SHARE = 0.1  # at most this fraction of the budget on top, for large splits and slow models
WALL_FACTOR = 3.0  # on the CPU, where the encoders' limit is on CPU time: the wall-clock backstop
# The loop checks the clock between steps, so the last step ends after the budget. An
# honest step lasts well under a second; a recipe that packs many updates into one call
# would train past the budget, so the overrun is capped at this (or OVERRUN_SHARE of it).
OVERRUN_GRACE_S = 5.0
OVERRUN_SHARE = 0.05
# The harness's own bound on the training process, from the recipe's import to the process's
# end (check_wall, wall_limit): the data's placement on the device, the checkpoint's writing,
# the device's start-up and the interpreter's exit run in that span off the clock. Their
# time on a GPU has not been measured (the harness smoke of bench/gpu_check.sh prints it).
RECIPE_WALL_SLACK_S = 30.0
IO_BYTES_PER_S = 100e6  # placing the training images, writing the checkpoint: slow disks included


def limit_address_space(gigabytes: float) -> None:
    """Cap this process's address space (in a child, before exec) at ``gigabytes``, or at
    the cap it inherited (``ulimit -v``) when that is lower: a process may lower its hard
    limit but not raise it, and a refused ``setrlimit`` here would fail the child's start."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = min(int(gigabytes * 2**30), 2**62)  # beyond any machine, and within rlim_t
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def default_memory_limit_gb() -> float:
    """80% of the machine's physical memory."""
    return 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m eclip.harness", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="check, train and score one recipe file")
    r.add_argument("--recipe", type=Path, required=True, help="the recipe file to run")
    r.add_argument("--data", type=Path, required=True, help="cache directory from eclip.prepare")
    r.add_argument("--budget-s", type=float, required=True,
                   help="wall-clock training budget: the recipe's setup and its steps")
    r.add_argument("--out", type=Path, required=True, help="where result.json, logs and the checkpoint go")
    r.add_argument("--seed", type=seed_value, default=42,
                   help="seed of the model's initialisation and the batch sampler (never the evaluation's orders; "
                        "default: 42)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    r.add_argument("--compile-cache", type=Path, help="persistent torch.compile cache for the workspace")
    r.add_argument("--memory-limit-gb", type=float,
                   help="address-space cap on CPU runs (default: 80%% of physical memory; 0 = none)")
    r.add_argument("--final", action="store_true", help="train on train+val, score on the held-out test split")
    r.add_argument("--isolate", action="store_true",
                   help="run the recipe's processes in a sandbox (Linux user namespaces) that cannot read the "
                        "cache: training gets a copy of its split only, each encoder its own inputs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with sigterm_as_ctrl_c():  # a SIGTERM (a scheduler, `timeout`) is a Ctrl-C: the run ends cleanly
        try:
            return run(args)
        except KeyboardInterrupt:  # outside the training and the evaluation: nothing to save
            print("harness: interrupted", file=sys.stderr)
            return 130


def run(args) -> int:
    result_path = args.out / "result.json"
    try:  # first of all: an earlier run's result must never pass for this run's
        result_path.unlink(missing_ok=True)
    except OSError:  # no such folder (a file in the way, say): reported below
        pass
    gb = args.memory_limit_gb
    if gb is not None and not (math.isfinite(gb) and gb >= 0):
        print(f"harness: error: --memory-limit-gb {gb:g}: expected a finite number >= 0 (0 = no cap)",
              file=sys.stderr)
        return 2
    if not args.recipe.is_file():
        print(f"harness: error: {args.recipe}: recipe file not found", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        print(f"harness: error: {args.out}: cannot make the run directory ({e.strerror})", file=sys.stderr)
        return 2
    violations = check_file(args.recipe)
    if violations:
        lines = [v.format(str(args.recipe)) for v in violations]
        write_json(result_path, {"status": "rejected", "val_mean_rank": None, "violations": lines})
        print(f"harness: error: {lines[0]}" + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""),
              file=sys.stderr)
        return 2
    scrub_environment()
    if args.isolate:
        why = sandbox.probe()
        if why is not None:
            print(f"harness: error: --isolate: cannot build the sandbox on this machine: {why}", file=sys.stderr)
            return 2
        # absolute and real: inside the sandbox the working folder and symbolic links may not exist
        args.recipe, args.data, args.out = args.recipe.resolve(), args.data.resolve(), args.out.resolve()
        if args.compile_cache is not None:
            args.compile_cache = args.compile_cache.resolve()
            args.compile_cache.mkdir(parents=True, exist_ok=True)
    if args.compile_cache is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.compile_cache.resolve())
    threads = torch_threads(args.device)  # None: a GPU run, timed in wall time
    on_cpu = threads is not None
    limit = default_memory_limit_gb() if args.memory_limit_gb is None else args.memory_limit_gb
    capped = (lambda: limit_address_space(limit)) if on_cpu and limit > 0 else None
    for part in PARTS:  # only this run's files are read
        clear_part(args.out, part)
    data, env = args.data, hide_gpu(dict(os.environ)) if on_cpu else None
    if args.isolate:
        try:
            data = export_training_data(args)
        except EclipError as e:
            return _finish(result_path, {"status": "error", "val_mean_rank": None, "reason": str(e)}, 2)
        if args.compile_cache is not None:  # Triton's own cache, kept across runs like inductor's
            env = dict(env or os.environ, TRITON_CACHE_DIR=str(args.compile_cache / "triton"))
    cmd = [sys.executable, "-m", "eclip.train", "--data", str(data), "--out", str(args.out),
           "--recipe", str(args.recipe), "--budget-s", str(args.budget_s), "--seed", str(args.seed),
           "--device", args.device, "--train-only", "--signal-ready"]
    if args.compile_cache is not None:
        cmd += ["--compile-cache", str(args.compile_cache)]
    if args.final:
        cmd.append("--final")
    if args.isolate:
        writable = [args.out] if args.compile_cache is None else [args.out, args.compile_cache]
        cmd = sandbox.command(cmd, ro=[args.recipe, data], rw=writable, hide=[args.data])
    try:
        from eclip.train import READY

        placed = file_bytes(data / "images.safetensors")  # before an isolated run's copy goes
        rc, recipe_wall_s = child(cmd, capped, env=env, ready=READY)
    finally:
        if data != args.data:  # a copy of the training split: the checkpoint is what stays
            shutil.rmtree(data, ignore_errors=True)
    try:  # a regular file only: a FIFO the training process left there would block the read for ever
        result = json.loads(read_regular(result_path).decode("utf-8"))
        if not isinstance(result, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):  # no result, or a damaged one (ValueError: not JSON, not UTF-8)
        rc = rc or 1
        status = "error" if exit_code(rc) == 2 else "crash"  # 2: bad input (data, options), not the recipe
        return _finish(result_path, {"status": status, "val_mean_rank": None,
                                     "reason": f"the training process exited with code {rc} without a result"}, rc)
    # A score comes from the harness's own ranking only: whatever the training process wrote
    # in its place (a recipe's code runs there and may write any result) is dropped.
    for key in SCORED:
        result.pop(key, None)
    result["val_mean_rank"] = None
    if result.pop("ranked_by", None) != "caller":
        # written by the child before the run began (bad input, out of memory): its failure
        # passed on, never an ok the harness did not score
        if result.get("status") not in ("error", "oom"):
            result.update(status="crash", reason="the training process wrote a result the harness was not to score "
                                                 f"(status {result.get('status')!r})")
        write_json(result_path, result)
        return exit_code(rc or 1)
    # from here on the harness writes the result: "ranked_by: caller" never outlives it
    result["isolated"] = bool(args.isolate)  # whether the recipe's processes could read the cache
    result["recipe_wall_s"] = recipe_wall_s  # measured here: from the recipe's import to the process's end
    if result.get("status") == "ok":
        t_eval = time.perf_counter()
        try:
            check_wall(recipe_wall_s, args.budget_s, placed + file_bytes(args.out / "checkpoint.safetensors"))
            check_after(result, args.budget_s, threads)
            # eval_s: the encoding processes and the ranking, start-up included (not in the budget)
            result = dict(evaluate(result, args, capped, threads), eval_s=time.perf_counter() - t_eval)
        except EclipError as e:
            status = "oom" if "failed: out of memory" in str(e) else "error"
            result = dict(result, status=status, val_mean_rank=None, metrics=None, reason=str(e))
            rc = 1
        except KeyboardInterrupt:  # trained and checkpointed: the result says what is missing
            result = dict(result, status="interrupted", val_mean_rank=None, metrics=None,
                          reason="interrupted during the evaluation (the checkpoint is saved)")
            rc = 130
    return _finish(result_path, result, rc)


def _finish(result_path: Path, result: dict, rc: int) -> int:
    """Write the run's result (atomically), print its summary block; the exit code for ``rc``."""
    from eclip.train import summary_lines

    remove(result_path)  # a folder the training process made there would fail the write
    write_json(result_path, result)
    print("\n".join(summary_lines(result)))
    return exit_code(rc)


TRAIN_DATA = "train_data"  # in the run directory: an isolated training process's copy of its split


def export_training_data(args) -> Path:
    """Write the images an isolated training process may see (train; train+val with
    ``--final``) as a cache of their own in the run directory; its path. Checks first that
    the split to be scored is not empty, as the training process does with the whole cache."""
    import torch

    from eclip.data.cache import load_cache, write_subset

    cache = load_cache(args.data)
    split = "test" if args.final else "val"
    if cache.split_images(split).numel() == 0:
        raise EclipError(f"{args.data}: the {split} split is empty")
    rows = torch.nonzero(cache.split <= 1).flatten() if args.final else cache.split_images("train")
    out = args.out / TRAIN_DATA
    write_subset(cache, rows, out)
    return out


def part_dir(out: Path, part: str) -> Path:
    """The folder of one encoding process's inputs and embeddings in a run directory: the
    only one it may write to when isolated (``--isolate``)."""
    return out / f"eval_{part}"


def part_files(out: Path, part: str) -> tuple[Path, Path, Path]:
    """(inputs, embeddings, log) of one encoding process in a run directory; the log is
    the harness's, beside the part's folder."""
    folder = part_dir(out, part)
    return folder / "inputs.safetensors", folder / "emb.safetensors", out / f"eval_{part}.log"


def clear_part(out: Path, part: str) -> None:
    """Remove one encoding process's folder and log (secretly ordered, useless once ranked).
    Also what the training process may have left under those names: a link there would
    have the harness write the split's inputs, or a log, where the recipe chose."""
    remove(part_dir(out, part))
    remove(part_files(out, part)[2])


def wall_limit(budget_s: float, io_bytes: int = 0) -> float:
    """The most a training process may take from the recipe's import to its end: the budget,
    the last step's overrun, the code after it, ``RECIPE_WALL_SLACK_S`` for the device's
    start-up and the process's exit, and the data's placement and the checkpoint's writing
    at ``IO_BYTES_PER_S`` (``io_bytes``: their sizes)."""
    overrun = max(OVERRUN_GRACE_S, OVERRUN_SHARE * budget_s)
    return budget_s + overrun + AFTER_GRACE_S + RECIPE_WALL_SLACK_S + io_bytes / IO_BYTES_PER_S


def check_wall(recipe_wall_s: float | None, budget_s: float, io_bytes: int = 0) -> None:
    """Refuse a run whose training process, timed by the harness from the line it prints
    before importing the recipe to its end, ran past ``wall_limit``. The figures
    ``check_after`` reads come from that process, where the recipe's code runs and could
    misreport them (a review slowed the loop's clock 25-fold: 75 s of training reported as
    3); this one it cannot. The slack covers work off the clock after the recipe's import,
    so a recipe may still hide up to that much."""
    if recipe_wall_s is None:
        raise EclipError("the training process did not say when the recipe's import began (no ready line)")
    limit = wall_limit(budget_s, io_bytes)
    if recipe_wall_s > limit:
        raise EclipError(f"the training process ran {recipe_wall_s:.0f} s from the recipe's import to its end, on a "
                         f"budget of {budget_s:g} s (at most {limit:.0f} s, timed by the harness); work outside "
                         "train_step is not training time")


def check_after(result: dict, budget_s: float, threads: int | None = None) -> None:
    """Refuse a run whose recipe code kept running after its budget: a last step that ended
    long after it (``train_s``), or code after the last step (``after_s``, timed by the
    training loop: a checkpoint's ``recipe_state`` or ``state_dict`` that trains).
    ``threads`` (CPU runs): a last step late in wall time whose CPU time over ``threads``
    stays within the grace was slowed by a busy machine, not packed with work: allowed."""
    train_s, overrun = result.get("train_s"), max(OVERRUN_GRACE_S, OVERRUN_SHARE * budget_s)
    if not isinstance(train_s, (int, float)):
        raise EclipError("the run reported no train_s")
    cpu = result.get("last_step_cpu_s")
    compute = cpu / threads if threads and isinstance(cpu, (int, float)) else None  # None: wall time only
    slowed = compute is not None and compute <= overrun
    if train_s > budget_s + (WALL_FACTOR if slowed else 1) * overrun:
        first = (" (its first step, compilation included, outlasted the budget: give a longer one)"
                 if result.get("steps") == 1 else "; one train_step must be one step, not many")
        computed = f", its last step computed {compute:.1f} s over {threads} threads" if compute is not None else ""
        raise EclipError(f"training ran {train_s:.1f} s on a budget of {budget_s:g} s (a step may end at most "
                         f"{overrun:g} s late{computed}){first}")
    after = result.get("after_s")
    if not isinstance(after, (int, float)) or after > AFTER_GRACE_S:
        shown = f"{after:.1f} s" if isinstance(after, (int, float)) else "an unknown time"
        raise EclipError(f"the recipe's code ran {shown} after the budget ended (at most {AFTER_GRACE_S:g} s, "
                         "the checkpoint's writing aside); work outside train_step is not training time")


def child_setup(preexec):
    """``preexec_fn`` of every child: Ctrl-C back to its default (the harness ignores it while
    it waits, and children inherit that), killed if the harness dies, then ``preexec``."""
    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        die_with_parent()
        if preexec is not None:
            preexec()
    return setup


def hide_gpu(env: dict) -> dict:
    """``env`` for a child of a CPU run: the limits count CPU time there, which a GPU's
    work would not show, so the recipe gets no GPU."""
    return dict(env, CUDA_VISIBLE_DEVICES="")


def child(cmd: list[str], preexec, env: dict | None = None, ready: str | None = None):
    """Run one child to its end; its exit code. Ctrl-C reaches it too (same process group):
    it finishes its step, saves and writes an interrupted result; the harness waits for that
    instead of dying first. A SIGTERM sent to the harness is passed on to the child, which
    takes it as a Ctrl-C (and ignores a repeat: a SIGTERM to the whole group reaches it
    twice). With ``ready`` (a line the child prints on stdout), ``(exit code, seconds from
    the first such line to the child's end)`` instead, None for the seconds when it never
    printed one; its other lines are passed on."""
    procs: list[subprocess.Popen] = []
    seen: list[float] = []
    pending: list[int] = []  # a SIGTERM that came before the child existed

    def forward(signum, frame) -> None:
        if procs:
            procs[0].send_signal(signal.SIGTERM)
        else:
            pending.append(signum)

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    term = signal.signal(signal.SIGTERM, forward)
    # A process the child leaves behind (forked, in a session of its own) would work on
    # after the harness stopped timing it, and could rewrite the checkpoint before the
    # encoders read it: orphans of the child come to this process (a subreaper), which
    # kills them as soon as the child has ended.
    others = own_children()
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    reader = None
    try:
        procs.append(subprocess.Popen(cmd, preexec_fn=child_setup(preexec), env=env, text=True,
                                      stdout=subprocess.PIPE if ready else None))
        if pending:
            procs[0].send_signal(signal.SIGTERM)
        if ready:
            reader = relay(procs[0].stdout, ready, lambda: seen.append(time.monotonic()))
        rc = procs[0].wait()
        end = time.monotonic()
    finally:
        if not procs or procs[0].poll() is not None:  # never the child itself, while it runs
            kill_strays(others)  # before anything reads what the child wrote
        prctl(PR_SET_CHILD_SUBREAPER, 0)
        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGINT, previous)
    if reader is None:
        return rc
    reader.join(timeout=5)  # a grandchild still holding the pipe does not hold the harness
    return rc, (end - seen[0] if seen else None)


def relay(stream, ready: str, on_ready) -> threading.Thread:
    """A started thread that copies a child's stdout ``stream`` to this process's, but for
    the first ``ready`` line, for which it calls ``on_ready()`` instead (a child's code may
    print that line again later: it is passed on as output)."""
    def copy() -> None:
        said = False
        for line in stream:
            if not said and line.rstrip("\n") == ready:
                said = True
                on_ready()
            else:
                sys.stdout.write(line)
                sys.stdout.flush()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def encode_parts(cmds: dict[str, list[str]], logs: dict[str, Path], limit_s: float, preexec,
                 threads: int | None = None) -> dict[str, int]:
    """Run the encoding processes at once, each to its end; returns each part's exit code.
    Each gets ``START_LIMIT_S`` to start (imports, device) and then ``limit_s`` from the line
    it prints before importing the recipe (``--signal-ready``), so the limit on the recipe's
    time does not have to cover a slow start; past either, all are killed (EclipError).
    ``threads`` (CPU runs): ``limit_s`` is on the process's CPU time divided by ``threads``
    (compute, which a busy machine does not inflate), with wall time capped at
    ``WALL_FACTOR × limit_s``; None: on wall time. Their stderr goes to ``logs`` and is passed on."""
    from eclip.encode import READY

    env = dict(os.environ, TORCH_COMPILE_DISABLE="1")  # eager: a fast start, nothing to compile
    if threads:
        # The parts run at once: an OpenMP team of ⌈threads / parts⌉ each, not of ``threads``,
        # or the teams spin on each other's cores (2 CPUs, 3 parts: the evaluation took 5.1 s
        # instead of 3.6). The limit still divides CPU time by ``threads``, the count the
        # training ran with, from whose speed it is set; rounding up keeps threads / team at
        # most 3 = WALL_FACTOR, so a part can spend its whole CPU allowance before the wall
        # backstop (⌊threads / 3⌋ would give 4 threads one each: 4 times the wall time).
        env = dict(hide_gpu(env), OMP_NUM_THREADS=str(-(-threads // len(cmds))))
    # A Ctrl-C reaches the children too (they end, 130); the harness notes it rather than die
    # first. Only then is a child's 130 a Ctrl-C: a recipe can raise KeyboardInterrupt itself.
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    procs, files, ready, readers = {}, {}, {}, []

    def on_ready(part: str) -> None:
        ready[part] = (time.monotonic(), cpu_seconds(procs[part].pid) if threads else None)

    try:
        start = time.monotonic()
        for part, cmd in cmds.items():
            # a new file, never through a link (a recipe's process could have left one)
            fd = os.open(logs[part], os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
            files[part] = open(fd, "w+", encoding="utf-8")
            procs[part] = subprocess.Popen(cmd + ["--signal-ready"], preexec_fn=child_setup(preexec),
                                           stdout=subprocess.PIPE, stderr=files[part], env=env, text=True)
            readers.append(relay(procs[part].stdout, READY, lambda part=part: on_ready(part)))
        rcs = {}
        while len(rcs) < len(procs):
            if interrupted:
                raise KeyboardInterrupt  # the children still running are killed below
            now = time.monotonic()
            for part, proc in procs.items():
                if part in rcs:
                    continue
                rc = proc.poll()
                if rc is not None:
                    rcs[part] = rc
                elif why := _overdue(part, proc.pid, now, start, ready.get(part), limit_s, threads):
                    raise EclipError(f"evaluation (eclip.encode, {part}) {why}")
            time.sleep(0.02)
        if interrupted:
            raise KeyboardInterrupt
        return rcs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for t in readers:
            t.join(timeout=5)
        for f in files.values():
            f.seek(0)
            sys.stderr.write(f.read())
            f.close()
        signal.signal(signal.SIGINT, previous)


def _overdue(part: str, pid: int, now: float, start: float, ready: tuple | None, limit_s: float,
             threads: int | None) -> str | None:
    """Why an encoding process must stop now, or None. ``ready``: (wall, CPU seconds) when
    it printed its ready line, None before."""
    if ready is None:
        return f"did not start within {START_LIMIT_S:.0f} s" if now - start > START_LIMIT_S else None
    what = ("after its start-up (the recipe's model and weights, and twice the training time per item encoded, "
            "within a tenth of the budget); work outside train_step is not training time")
    wall, cpu0 = ready
    cpu = cpu_seconds(pid) if threads and cpu0 is not None else None
    if cpu is None:  # a GPU run, or no CPU clock to read: wall time
        return f"took longer than {limit_s:.0f} s {what}" if now - wall > limit_s else None
    if (cpu - cpu0) / threads > limit_s:
        return (f"computed for longer than {limit_s:.0f} s (CPU time {cpu - cpu0:.0f} s over {threads} threads) "
                f"{what}")
    if now - wall > WALL_FACTOR * limit_s:
        return f"took longer than {WALL_FACTOR * limit_s:.0f} s of wall time {what}"
    return None


def exit_code(rc: int) -> int:
    """A child's return code as this process's exit code: killed by signal N, 128 + N
    (the shells' convention; 130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 - rc if rc < 0 else rc


def runs_on_cpu(device: str) -> bool:
    """Whether ``--device`` puts the run on the CPU (``auto``: when there is no GPU)."""
    import torch

    if device == "auto":
        return not torch.cuda.is_available()
    try:
        return torch.device(device).type == "cpu"
    except (RuntimeError, ValueError):  # not a device: the training process says so
        return False


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, and a cgroup (v2) CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def torch_threads(device: str) -> int | None:
    """What the limits on a CPU run divide CPU time by: the threads a child computes with
    by default (torch's count, as the harness sees it), at most the CPUs it may use (a
    recipe that sets another count gains no compute by it); None for a GPU run."""
    import torch

    return max(1, min(torch.get_num_threads(), usable_cpus())) if runs_on_cpu(device) else None


def encode_error(part: str, rc: int, log: Path) -> str:
    """One line for a failed encoding process: its own error, else the last line of a
    traceback (the recipe's exception), else the exit code."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    said = [line for line in lines if line.startswith("encode: error: ")]
    why = said[-1][len("encode: error: "):] if said else lines[-1] if lines else f"exit code {rc}"
    return f"evaluation (eclip.encode, {part}) failed: {why}"


def evaluate(result: dict, args, preexec=None, threads: int | None = None) -> dict:
    """``result`` with the metrics of the checkpoint in ``args.out`` on the val split (test
    with ``--final``): the split's images and its captions go to two ``eclip.encode``
    processes, each in a secret order, and a few of each to a third (the batch check); the
    embeddings that come back are checked, then ranked here against the cache's pairs."""
    from eclip.checkpoint import META, TENSORS, read_meta
    from eclip.data.cache import load_cache
    from eclip.encode import write_inputs
    from eclip.loop import caption_length, secret_order

    split = "test" if args.final else "val"  # the harness's own choice, not what the run reported
    for name in (TENSORS, META):  # the training process wrote them: a FIFO would block read_meta
        check_regular(args.out / name, "the checkpoint")
    cache = load_cache(args.data)
    cache = cache.subset(cache.split_images(split))  # the rest is freed
    tower = (read_meta(args.out).get("hparams") or {}).get("text_tower") or ""
    if tower:  # the ids the trained text tower reads (its tokenizer, as in training)
        from eclip.pretrained import retokenize

        cache = retokenize(cache, tower)
    spec = {"vocab_size": cache.vocab_size, "context_length": cache.context_length,
            "phrase_length": int(cache.region_tokens.shape[1]), "image_size": cache.image_size}
    orders = {"images": secret_order(cache.images.shape[0]), "texts": secret_order(cache.tokens.shape[0])}
    # positions in the secret orders whose items a third process, fresh (no memory of the
    # split), encodes again in pairs: the batch check
    picks = {part: secret_order(orders[part].numel())[:BATCH_PROBES] for part in ("images", "texts")}
    # each process's (image rows, caption rows) of the split, and its options: the batch
    # check's in pairs, captions cut to the split's longest as in the texts process, so
    # that only the company differs
    rows = {"images": (orders["images"], None), "texts": (None, orders["texts"]),
            "batch_check": (orders["images"][picks["images"]], orders["texts"][picks["texts"]])}
    options = {"batch_check": ["--batch", "2", "--text-length", str(caption_length(cache.tokens))]}
    files = {part: part_files(args.out, part) for part in PARTS if part != "batch_check" or BATCH_PROBES > 0}
    cmds, logs = {}, {}
    try:
        for part, (inputs, emb, log) in files.items():
            image_rows, caption_rows = rows[part]
            clear_part(args.out, part)  # the training process could write here
            inputs.parent.mkdir()
            write_inputs(inputs, None if image_rows is None else cache.images[image_rows],
                         None if caption_rows is None else cache.tokens[caption_rows], spec)
            cmds[part] = [sys.executable, "-m", "eclip.encode", "--recipe", str(args.recipe), "--checkpoint",
                          str(args.out), "--inputs", str(inputs), "--out", str(emb), "--device", args.device,
                          *options.get(part, [])]
            logs[part] = log
        if getattr(args, "isolate", False):  # each sees the checkpoint, the recipe and its own folder
            for part in cmds:
                others = [part_dir(args.out, p) for p in files if p != part]
                cmds[part] = sandbox.command(
                    cmds[part], ro=[args.recipe, args.out / TENSORS, args.out / META], rw=[part_dir(args.out, part)],
                    hide=[args.data, args.out / TRAIN_DATA, *others])
        sps = float(result.get("samples_per_s") or 0.0)
        items = cache.images.shape[0] + cache.tokens.shape[0]
        # start-up and weights, plus twice the time training took per sample for each item;
        # that share is capped, since a recipe can make its own samples_per_s small
        per_items = min(2 * items / sps if sps > 0 else math.inf, EVAL_SHARE * args.budget_s)
        limit = EVAL_GRACE_S + per_items
        if getattr(args, "isolate", False):
            # One at a time: processes that run at once can talk through whatever they share
            # (a lock on a file all of them may read, the CPUs' load), and an images process
            # that learns the captions' embeddings could match the two sides between them.
            for part in cmds:
                rc = encode_parts({part: cmds[part]}, {part: logs[part]}, limit, preexec, threads=threads)[part]
                if rc != 0:
                    raise EclipError(encode_error(part, rc, logs[part]))
        else:
            rcs = encode_parts(cmds, logs, limit, preexec, threads=threads)  # KeyboardInterrupt on a Ctrl-C
            for part in cmds:  # the first failure in PARTS order, not the quickest
                if rcs[part] != 0:
                    raise EclipError(encode_error(part, rcs[part], logs[part]))
        for _, emb, _ in files.values():  # the encoders wrote them: no FIFO, device or link read
            check_regular(emb, "the embeddings")
        return score(result, files["images"][1], files["texts"][1], orders["images"], orders["texts"],
                     cache.caption_image, args.device, split,
                     (files["batch_check"][1], picks) if "batch_check" in files else None)
    finally:
        for part in files:
            clear_part(args.out, part)


if __name__ == "__main__":
    exit_main(main())
