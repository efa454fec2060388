"""The harness's evaluation (``eclip.harness``): the checkpoint's embeddings, computed in
processes that never hold a pair, ranked by the harness against the cache's own pairs.

``evaluate`` writes the scored split's images and its captions, each in an order only the
harness knows, for two ``eclip.encode`` processes (neither sees the other side, nor the
cache's path), runs them, checks what they wrote and ranks it (``eclip.scoring``). With
``--isolate`` each runs in a sandbox (``eclip.sandbox``) holding the recipe, the
checkpoint's two files and its own folder (``part_dir``), one after another; without, all
at once. Each gets ``START_LIMIT_S`` to start and then ``EVAL_GRACE_S`` plus an allowance
for the number of items; on the CPU that limit is on compute (CPU time over
``torch_threads``), with wall time capped at ``WALL_FACTOR`` times it.

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

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from eclip import sandbox
from eclip.errors import EclipError
from eclip.fileio import check_regular, remove, tail_lines
from eclip.process import child_setup, cpu_seconds, relay
from eclip.scoring import score

# one eclip.encode process each: the scored split's images; its captions (none sees both
# sides of a pair); and fresh copies of a few of each, encoded in pairs (the batch check)
PARTS = ("images", "texts", "batch_check")
BATCH_PROBES = 16  # images, and as many captions, that the batch check encodes again
# Encoding is cheap next to training (one forward, no backward, over a split far smaller
# than the training data), so an encoder whose recipe code takes longer than this is
# refused: that time would be training nobody counted.
START_LIMIT_S = 120.0  # an encoding process's start-up (imports, device): before any recipe code
EVAL_GRACE_S = 10.0  # then, per encoding process: the recipe's import, its model, the weights
EVAL_SHARE = 0.1  # at most this fraction of the budget on top, for large splits and slow models
WALL_FACTOR = 3.0  # on the CPU, where the limits are on CPU time: the wall-clock backstop
TRAIN_DATA = "train_data"  # in the run directory: an isolated training process's copy of its split


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


def hide_gpu(env: dict) -> dict:
    """``env`` for a child of a CPU run: the limits count CPU time there, which a GPU's
    work would not show, so the recipe gets no GPU."""
    return dict(env, CUDA_VISIBLE_DEVICES="")


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
            files[part] = open(fd, "w+", encoding="utf-8", errors="replace")  # a recipe may write any bytes
            procs[part] = subprocess.Popen(cmd + ["--signal-ready"], preexec_fn=child_setup(preexec),
                                           stdout=subprocess.PIPE, stderr=files[part], env=env, text=True,
                                           errors="replace")  # bytes that are not UTF-8 must not end the relay
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
        for f in files.values():  # in pieces: a recipe may have written gigabytes there
            f.seek(0)
            shutil.copyfileobj(f, sys.stderr)
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


def encode_error(part: str, rc: int, log: Path) -> str:
    """One line for a failed encoding process: its own error, else the last line of a
    traceback (the recipe's exception), else the exit code."""
    try:
        lines = [line.strip() for line in tail_lines(log, 1000) if line.strip()]  # the last 64 KB
    except OSError:
        lines = []
    said = [line for line in lines if line.startswith("encode: error: ")]
    why = said[-1][len("encode: error: "):] if said else lines[-1] if lines else f"exit code {rc}"
    return f"evaluation (eclip.encode, {part}) failed: {why}"


def check_isolated_tower(tower: str) -> None:
    """Refuse (EclipError) an isolated run's text tower that names a local folder. The
    sandboxed processes see the hub cache's models and, of local folders, only those they may
    write (the run directory): there a recipe could plant the tokenizer that this process,
    outside the sandbox, would load to tokenize the held-out captions."""
    from eclip.pretrained import parse_spec

    name, _ = parse_spec(tower, "hf")
    if os.path.exists(name):  # as the tokenizer's loader resolves it: a folder before a hub id
        raise EclipError(f"text_tower {tower!r}: with --isolate a text tower comes from the Hugging Face hub cache (a "
                         "model id), not a local folder")


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

        if getattr(args, "isolate", False):
            check_isolated_tower(tower)

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
