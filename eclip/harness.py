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
checkpoint's two files and its own folder (``harness_eval.part_dir``). The cache is checked invisible in
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
``harness_eval.EVAL_GRACE_S`` from the end of its start-up plus an allowance for the number of items; a
run over any limit ends with status ``error``. A training process still running
``DEADLINE_MARGIN_S`` past its wall limit (a step that never returns) is killed: status
``timeout``; one still running ``stop_grace`` (the last step's grace, the code after it and
``STOP_GRACE_S``) after a Ctrl-C or SIGTERM, status ``interrupted``; one that has not
printed that line ``start_limit`` after its launch (a start-up that hangs), status ``error``. A write of the
harness's own that meets a full disk ends the run with ``disk_full`` in its result, a field
the training process's result cannot carry. On the CPU, where other work on the machine
slows a run, the last step's overrun and the encoders' time are measured in compute instead:
CPU time divided by ``torch_threads`` (torch's default thread count, at most the CPUs the
harness may use), with wall time still capped at ``WALL_FACTOR`` times the limit; the
children see no GPU there, whose work CPU time would not show. GPU runs are timed in wall
time. The limits bound such work; they cannot tell it from slowness.

The encoding processes, their limits and the batch check (an embedding must depend on its
own input only) are ``eclip.harness_eval``'s.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from eclip import sandbox
from eclip.data.cache import out_in_cache_error
from eclip.errors import EclipError, OneLineParser, first_line, seed_value
from eclip.fileio import file_bytes, read_regular, remove
from eclip.hardware import torch_threads
from eclip.harness_eval import (
    PARTS,
    START_LIMIT_S,
    TRAIN_DATA,
    WALL_FACTOR,
    clear_part,
    evaluate,
    hide_gpu,
)
from eclip.loop import PROGRESS_ENV, write_json
from eclip.policy import check_file
from eclip.process import child, exit_code, exit_main, scrub_environment, sigterm_as_ctrl_c

# what only the harness's ranking writes into a result: never taken from a child's result.json
SCORED = ("val_mean_rank", "test_mean_rank", "metrics", "batch_gap")
# Work the recipe may do outside its budget, which would be training nobody counted.
AFTER_GRACE_S = 3.0  # after the last step: gathering the checkpoint's tensors to the host, the FLOP count
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
# past wall_limit (a run the harness refuses anyway) the training process is killed once this
# much more has passed: room for a checkpoint of up to 12 GB at IO_BYTES_PER_S
DEADLINE_MARGIN_S = 120.0
# told to stop (Ctrl-C, SIGTERM), it is killed once this much has passed on top of the last
# step's overrun and the code after it (stop_grace): the same room for the checkpoint as the
# deadline's, which may be hours away on a long budget
STOP_GRACE_S = 120.0
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
    if why := out_in_cache_error(args.out, args.data):  # checked before the run directory is made
        print(f"harness: error: {why}", file=sys.stderr)
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
            for other, name in ((args.out, "--out"), (args.data, "--data")):
                if args.compile_cache.is_relative_to(other) or other.is_relative_to(args.compile_cache):
                    # the run directory is the training's to write, and a recipe's private copy goes
                    # there (PRIVATE_CACHE): a cache inside it would be writable by any recipe, be
                    # deleted by the copy's removal, or hold the copy inside itself; and a copy of a
                    # compile cache that holds the data cache would put its pairs in the run directory
                    print(f"harness: error: --isolate: --compile-cache {args.compile_cache} and {name} {other} "
                          "must not lie one inside the other", file=sys.stderr)
                    return 2
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
    private = False  # whether the training process compiles into a copy of the compile cache
    try:
        if args.isolate:
            data = export_training_data(args)
            if args.compile_cache is not None:
                if not is_template(args.recipe):
                    args.compile_cache, private = private_cache(args.compile_cache, args.out), True
                # Triton's own cache, kept across runs like inductor's
                env = dict(env or os.environ, TRITON_CACHE_DIR=str(args.compile_cache / "triton"))
        cmd = [sys.executable, "-m", "eclip.train", "--data", str(data), "--out", str(args.out),
               "--recipe", str(args.recipe), "--budget-s", str(args.budget_s), "--seed", str(args.seed),
               "--device", args.device, "--train-only", "--signal-ready"]
        if args.compile_cache is not None:
            cmd += ["--compile-cache", str(args.compile_cache)]
        if args.final:
            cmd.append("--final")
        if args.isolate:  # (a private copy of the compile cache lies in the run directory)
            writable = [args.out] if args.compile_cache is None or private else [args.out, args.compile_cache]
            cmd = sandbox.command(cmd, ro=[args.recipe, data], rw=writable, hide=[args.data])
        from eclip.train import READY

        placed = file_bytes(data / "images.safetensors")  # before an isolated run's copy goes
        heard: list[int] = []  # the Ctrl-Cs and SIGTERMs that reached the harness while it trained
        deadline = wall_limit(args.budget_s, placed) + DEADLINE_MARGIN_S
        tail: list[str] = []  # its last stderr lines: the reason of a run that ends without a result
        if sys.stderr.isatty():  # its stderr is a pipe to this process: the bar still reaches the terminal
            env = dict(env or os.environ, **{PROGRESS_ENV: "1"})
        killed: list[str] = []  # "deadline", "grace" or "start" when the harness killed it
        rc, recipe_wall_s = child(cmd, capped, env=env, ready=READY, signals=heard, deadline_s=deadline,
                                  stderr_tail=tail, stop_grace_s=stop_grace(args.budget_s), killed=killed,
                                  start_s=start_limit(placed))
    except EclipError as e:  # the training split or the compile cache could not be copied
        return _finish(result_path, failure("error", e), 1 if disk_full(e) else 2)
    except OSError as e:  # a write of the training split's copy, say
        if not disk_full(e):
            raise
        return _finish(result_path, failure("error", e), 1)
    finally:
        if data != args.data:  # a copy of the training split: the checkpoint is what stays
            remove(data)
        if private:  # what this recipe compiled reaches no other run
            remove(args.compile_cache)
    if killed == ["grace"]:
        return _finish(result_path, {"status": "interrupted", "val_mean_rank": None, "reason": (
            f"the training process was still running {stop_grace(args.budget_s):.0f} s after it was told to stop, "
            "and was killed (a step that never returns?)")}, 130)
    if killed == ["start"]:  # before any of the recipe's code: not the recipe's failure
        return _finish(result_path, {"status": "error", "val_mean_rank": None, "reason": (
            f"the training process did not start within {start_limit(placed):.0f} s (its imports and the reading "
            "of the cache, before the recipe's import) and was killed")}, 1)
    if killed == ["deadline"]:
        return _finish(result_path, {"status": "timeout", "val_mean_rank": None, "reason": (
            f"the training process was still running {deadline:.0f} s after the recipe's import, on a budget of "
            f"{args.budget_s:g} s, and was killed (a step that never returns?)")}, 1)
    try:  # a regular file only: a FIFO the training process left there would block the read for ever
        result = json.loads(read_regular(result_path).decode("utf-8"))
        if not isinstance(result, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):  # no result, or a damaged one (ValueError: not JSON, not UTF-8)
        rc = rc or 1
        status = "error" if exit_code(rc) == 2 else "crash"  # 2: bad input (data, options), not the recipe
        if heard and exit_code(rc) in (130, 143):  # stopped before it could write one (its start-up)
            status = "interrupted"
        said = next((line.strip() for line in reversed(tail) if line.strip()), "")  # its error line, a traceback's end
        return _finish(result_path, {"status": status, "val_mean_rank": None, "reason": (
            f"the training process exited with code {rc} without a result"
            + (f" (its last line: {said[:300]})" if said else ""))}, rc)
    # A score comes from the harness's own ranking only: whatever the training process wrote
    # in its place (a recipe's code runs there and may write any result) is dropped.
    for key in (*SCORED, "disk_full"):  # disk_full: the harness's word only
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
    if result.get("status") in ("interrupted", "aborted") and not heard:
        # a recipe that raises KeyboardInterrupt itself: its failure, not a stop the loop asked for
        result.update(status="crash", reason=f"the training process ended {result['status']}, but no Ctrl-C or "
                                             "SIGTERM reached the harness (the recipe raised KeyboardInterrupt, or "
                                             "a signal was sent to the training process alone)")
        rc = 1
    result["isolated"] = bool(args.isolate)  # whether the recipe's processes could read the cache
    if args.isolate and args.compile_cache is not None:  # whether it could write into the next runs' compile cache
        result["compile_cache"] = "private copy" if private else "shared"
    result["recipe_wall_s"] = recipe_wall_s  # measured here: from the recipe's import to the process's end
    if result.get("status") == "ok":
        t_eval = time.perf_counter()
        try:
            check_wall(recipe_wall_s, args.budget_s, placed + file_bytes(args.out / "checkpoint.safetensors"))
            check_after(result, args.budget_s, threads)
            # eval_s: the encoding processes and the ranking, start-up included (not in the budget)
            result = dict(evaluate(result, args, capped, threads), eval_s=time.perf_counter() - t_eval)
        except (EclipError, OSError) as e:  # OSError: the harness's own writes (the encoders' inputs)
            if isinstance(e, OSError) and not disk_full(e):
                raise
            status = "oom" if "failed: out of memory" in str(e) else "error"
            result = dict(result, metrics=None, **failure(status, e))
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


PRIVATE_CACHE = "compile_cache"  # in the run directory: an isolated recipe's copy of the compile cache


def is_template(recipe: Path) -> bool:
    """Whether ``recipe`` is the template (``eclip/recipe.py``) byte for byte: the project's
    own code, whose compiled artefacts every run may share."""
    from eclip.train import TEMPLATE

    try:
        return read_regular(recipe) == read_regular(TEMPLATE)
    except OSError:
        return False


def private_cache(cache: Path, out: Path) -> Path:
    """A copy of the compile cache ``cache`` in the run directory ``out``, for an isolated
    run of a recipe other than the template; its path. The training process may write into
    its compile cache, and torch.compile and Triton load what they find there as code: a
    recipe writing into the shared one would run its code in every later run's training
    (another recipe's, the final run's). So only the template's runs write the shared cache,
    and a recipe compiles into a copy, removed when its training ends (links copied as links)."""
    copy = out / PRIVATE_CACHE
    remove(copy)
    try:
        shutil.copytree(cache, copy, symlinks=True)
    except (OSError, shutil.Error) as e:
        remove(copy)
        raise EclipError(f"{cache}: cannot copy the compile cache for the run ({first_line(e)})") from e
    return copy


def export_training_data(args) -> Path:
    """Write the images an isolated training process may see (train; train+val with
    ``--final``) as a cache of their own in the run directory; its path. Checks first that
    the split to be scored is not empty, as the training process does with the whole cache."""
    import torch

    from eclip.data.cache import load_cache, write_subset
    from eclip.evaluate import scored_split_problem

    cache = load_cache(args.data)
    split = "test" if args.final else "val"
    if why := scored_split_problem(cache.split_images(split).numel(), split):
        raise EclipError(f"{args.data}: {why}")
    rows = torch.nonzero(cache.split <= 1).flatten() if args.final else cache.split_images("train")
    from safetensors import SafetensorError

    out = args.out / TRAIN_DATA
    remove(out)  # a run killed before it removed its copy, or a recipe that added to it, left one
    try:
        write_subset(cache, rows, out)  # (a copy cut short is removed by its writer)
    except SafetensorError as e:  # its I/O errors are no OSError: a full disk must still say so
        if "No space left" in str(e) or "Disk quota" in str(e):
            raise OSError(errno.ENOSPC, f"cannot write the training split's copy ({first_line(e, 200)})",
                          str(out)) from e
        raise EclipError(f"{out}: cannot write the training split's copy ({first_line(e, 200)})") from e
    return out


def start_limit(io_bytes: int = 0) -> float:
    """The most a training process may take to start, from its launch to the line it prints
    before importing the recipe: ``START_LIMIT_S`` (an encoding process's) for the
    interpreter and torch's import, and the reading of the cache at ``IO_BYTES_PER_S``
    (``io_bytes``: its images' size)."""
    return START_LIMIT_S + io_bytes / IO_BYTES_PER_S


def stop_grace(budget_s: float) -> float:
    """How long a training process told to stop may take to end: its last step's overrun,
    the code after it and ``STOP_GRACE_S`` for the checkpoint."""
    return max(OVERRUN_GRACE_S, OVERRUN_SHARE * budget_s) + AFTER_GRACE_S + STOP_GRACE_S


def disk_full(e: BaseException | None) -> bool:
    """Whether ``e``, or an exception it was raised from, is a full disk (ENOSPC, EDQUOT)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def failure(status: str, e: BaseException) -> dict:
    """The result of a run the harness's own work ended: ``disk_full`` when a write of the
    harness's met a full disk (the loop then stops, never blaming the recipe; the training
    process's result cannot carry the field)."""
    return {"status": status, "val_mean_rank": None, "reason": first_line(e) if isinstance(e, OSError) else str(e),
            **({"disk_full": True} if disk_full(e) else {})}


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


if __name__ == "__main__":
    exit_main(main)
