"""The training loop on the GPU with random data: a smoke run of the whole path, then speed.

1. ``smoke``: the template recipe, preset ``tiny`` (64 px), a few dozen steps, then the
   loop's own evaluation — compile, bf16 autocast, fused AdamW, the fused loss and the
   Triton rank kernel all in one run; fails on a non-ok status or a non-finite loss;
   then ``harness_smoke``: the referee as the research loop runs it (``eclip.harness run``
   on the template and a random cache written to disk: training, then the three encoding
   processes), its status, the time to the score and how the run's time was spent.
2. ``speed``: preset ``vit-s16`` (224 px, 77 tokens), batch 64, random data, expert path
   off: fp32 eager with TF32 off (PyTorch defaults) against the template's fast path
   (bf16 autocast + torch.compile + fused AdamW + fused loss, the step replayed as CUDA
   graphs: ``compile_mode=auto``), the fast path without graphs (``compile_mode=default``),
   with the images in pinned host memory (the prefetch thread's path), and with each
   transformer block compiled on its own (``compile_scope=blocks``: a shorter first step,
   no graphs). Steady-state samples/s (from the first logged step at or after step
   ``SETTLE_STEPS``: compilation and the CUDA graphs' warm-up and recording behind it) and
   the first step's time (``warmup_s``, compilation included).
3. ``sync_check``: the host syncs of the template's steady steps, by call site (skipped with
   the smoke runs). A diagnostic, so last: a time limit that cuts the run falls on it, not on
   a speed row.

Needs torch, triton, numpy, safetensors and tqdm. Prints one ``key: value`` line per figure.
A section or speed row that raises prints ``FAILED <section>: <error>`` (the end of its
traceback on stderr), fails the check and the rest still run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

from eclip.data.cache import ANNOTATION_KEYS, Cache, CacheWriter
from eclip.loop import LoopConfig, apply_overrides, evaluate_split, load_recipe, run_loop

TEMPLATE = Path(__file__).resolve().parents[1] / "eclip" / "recipe.py"


def random_cache(n: int, size: int, context: int, vocab: int, seed: int = 0) -> Cache:
    """An in-memory cache of random images, captions and one region per image."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, context + 1, (n,), generator=g, dtype=torch.int32)
    tokens = torch.randint(4, vocab, (n, context), generator=g, dtype=torch.int32)
    tokens[torch.arange(context)[None, :] >= lengths[:, None]] = 0
    xy = torch.rand(n, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.25 + torch.rand(n, 2, generator=g) * 0.25], dim=1)
    phrase = torch.randint(4, vocab, (n, 8), generator=g, dtype=torch.int32)
    split = torch.zeros(n, dtype=torch.int8)
    split[-n // 8:] = 1
    return Cache(path=Path("random"), manifest={"tokenizer": {"vocab_size": vocab}, "fingerprint": "random"},
                 images=torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                 tokens=tokens, lengths=lengths, caption_image=torch.arange(n),
                 region_boxes=boxes, region_image=torch.arange(n), region_tokens=phrase,
                 region_lengths=torch.full((n,), 8, dtype=torch.int32), split=split,
                 fold=torch.zeros(n, dtype=torch.int8))


DEVICE = "cuda"
# CUDA graph trees run a compiled step's first call unrecorded and record the next one, a
# cost the graphed rows alone would pay inside a window that began after step 1
SETTLE_STEPS = 5

# Lines of a failure's traceback printed: the step's output shares the few KB of a device
# run's output that come back, and a compile error's traceback runs to hundreds of lines
TRACEBACK_LINES = 25


def attempt(name: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or False when it raised: one ``FAILED name: error`` line (the
    end of the traceback on stderr), so that one broken section or row does not cost the
    ones after it. A KeyboardInterrupt (gpu_check.sh's time limit) still ends the run."""
    try:
        return fn(*args, **kwargs)
    except (Exception, SystemExit) as e:  # a sys.exit deep in one section is that section's failure too
        lines = "".join(traceback.format_exception(e)).splitlines()
        print("\n".join(lines[-TRACEBACK_LINES:]), file=sys.stderr, flush=True)
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        print(f"FAILED {name}: {type(e).__name__}{': ' + first.strip() if first else ''}", flush=True)
        return False


def train(cache: Cache, steps: int, overrides: dict, log_every: int = 10, placement: str = "auto",
          device: str | None = None, on_log=None) -> dict:
    recipe = load_recipe(TEMPLATE)
    apply_overrides(recipe.HPARAMS, overrides)
    cfg = LoopConfig(steps=steps, device=device or DEVICE, log_every=log_every, progress_bar=False,
                     data_placement=placement)
    run = run_loop(recipe, cache, cache.split_images("train"), cfg, on_log=on_log)
    if run["status"] == "interrupted":  # a SIGTERM (gpu_check.sh's time limit) or Ctrl-C: no more rows
        raise KeyboardInterrupt
    # From the first logged step at or after SETTLE_STEPS to the end of the run (synchronised).
    # That row's clock is the host's, taken without a sync: work still queued on the device
    # then falls inside the window, so the figure errs low, never high.
    # A run too short for a row at SETTLE_STEPS with steps after it falls back to its first row
    # with steps after it (warm-up included); with none, the figure is NaN, never 0 or a guess.
    rows = [r for r in run["history"] if r["samples"] < run["samples"]]
    first = next((r for r in rows if r["step"] >= SETTLE_STEPS), rows[0] if rows else None)
    steady = (math.nan if first is None else
              (run["samples"] - first["samples"]) / max(run["train_s"] - first["elapsed_s"], 1e-9))
    return dict(run, steady_sps=steady)


def trained(run: dict) -> bool:
    """A run that ended ``ok`` with a finite last loss: its figures measure something."""
    return run["status"] == "ok" and math.isfinite(run["last"].get("loss", math.nan))


def smoke(steps: int = 60, batch: int = 128) -> bool:
    cache = random_cache(2048, 64, 32, 512)
    t0 = time.perf_counter()
    run = train(cache, steps, {"preset": "tiny", "batch_size": str(batch), "expert_cold_start": "0.0"})
    m = evaluate_split(run["model"], cache, cache.split_images("val"), run["device"],
                       bf16=run["device"].type == "cuda")
    ok = trained(run) and math.isfinite(m["mean_rank"])
    print(f"smoke_status: {run['status']}  loss: {run['last']['loss']:.3f}  val_mean_rank: {m['mean_rank']:.1f} "
          f"(random {(m['n_images'] - 1) / 2:.0f})  warmup_s: {run['warmup_s']:.1f}  "
          f"total_s: {time.perf_counter() - t0:.1f}  {'OK' if ok else 'FAILED'}", flush=True)
    return ok


def write_cache(cache: Cache, out: Path) -> Path:
    """``cache`` as a cache directory the harness can load (no tokenizer file: the template
    recipe does not read one)."""
    with CacheWriter(out) as w:
        w.save_arrays("images.safetensors", {"images": cache.images.numpy()})
        w.save_arrays("annotations.safetensors", {k: getattr(cache, k).numpy() for k in ANNOTATION_KEYS})
        w.commit(dict(cache.manifest))
    return out


def harness_smoke(budget_s: float, dry: bool = False, isolate: bool = False) -> bool:
    """One harness run of the template on a random 64-px cache (1,792 train, 256 val);
    ``isolate``: with ``--isolate`` (the recipe's processes in the sandbox, GPU included)."""
    device = "cpu" if dry else "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        data = write_cache(random_cache(2048, 64, 32, 512), Path(tmp) / "cache")
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "eclip.harness", "run", "--recipe", str(TEMPLATE), "--data", str(data),
               "--budget-s", str(budget_s), "--out", str(out), "--device", device,
               "--compile-cache", str(Path(tmp) / "compile_cache"), *["--isolate"] * isolate]
        t0 = time.perf_counter()
        try:  # the harness's own limits end a slow run long before this one
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=TEMPLATE.parents[1], env=dict(os.environ),
                               timeout=2 * budget_s + 300)
        except subprocess.TimeoutExpired as e:
            p = subprocess.CompletedProcess(cmd, -9, "", f"killed after {e.timeout:.0f} s")
        wall = time.perf_counter() - t0
        try:
            r = json.loads((out / "result.json").read_text())
        except (OSError, json.JSONDecodeError):
            r = {"status": f"no result (exit {p.returncode})"}
    ok = (p.returncode == 0 and r.get("status") == "ok" and r.get("ranked_by") == "harness"
          and r.get("isolated") is isolate)
    fmt = lambda k: "none" if r.get(k) is None else f"{r[k]:.1f}"  # noqa: E731
    gap = r.get("batch_gap") or {}  # 1 - cosine of the copies encoded again (bf16 rounding on a GPU)
    gaps = "/".join(f"{gap[k]:.1e}" if k in gap else "none" for k in ("images", "texts"))
    print(f"harness_status: {r.get('status')}  val_mean_rank: {fmt('val_mean_rank')} (random 127.5)  "
          f"steps: {r.get('steps')}  warmup_s: {fmt('warmup_s')}  train_s: {fmt('train_s')}  "
          f"after_s: {fmt('after_s')}  eval_s: {fmt('eval_s')}  batch_gap: {gaps}  "
          f"recipe_wall_s: {fmt('recipe_wall_s')}  isolated: {r.get('isolated')}  wall_s: {wall:.1f}  "
          f"{'OK' if ok else 'FAILED'}", flush=True)
    if r.get("reason"):
        print(f"harness_reason: {r['reason']}", flush=True)
    if not ok:
        print("\n".join(p.stderr.splitlines()[-15:]), flush=True)
    return ok


SYNC_CASES = {  # name: (HPARAMS overrides beyond preset tiny, batch 128; data placement)
    "device": ({"expert": "false"}, "auto"),
    "host": ({"expert": "false"}, "host"),  # images from pinned host memory, prefetched
    "expert": ({"expert": "true", "expert_cold_start": "0.0", "expert_probability": "1.0"}, "auto"),
}


def sync_check(steps: int = 30, batch: int = 128) -> None:
    """Host syncs in the template's steady steps (preset tiny), per case of SYNC_CASES: the
    loop is meant to make none until the end of the run, except the expert term's one
    (selecting the samples with regions reads their count). CUDA's sync debug mode is
    switched on when the first metrics row arrives (compilation behind) and every synchronising
    call is listed by its Python call site; the end of the run's synchronize accounts for
    one. (Waits on a CUDA event, as for a metrics copy that has not arrived, are invisible
    to the debug mode.)"""
    cuda = DEVICE == "cuda"
    if not cuda:  # the dry run: the cases' plumbing only, nothing to count
        steps, batch = 11, 16
    cache = random_cache(2048, 64, 32, 512)
    for case, (overrides, placement) in SYNC_CASES.items():
        armed = []

        def on_log(row, armed=armed):
            if not armed:
                armed.append(row["step"])
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                run = train(cache, steps, {"preset": "tiny", "batch_size": str(batch), **overrides},
                            placement=placement, on_log=on_log)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        if not cuda:
            print(f"sync_check {case}: dry run, status {run['status']}, first row at step {armed[0]}", flush=True)
            continue
        sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                        if "synchronizing" in str(w.message))
        listed = ", ".join(f"{site} ×{n}" for site, n in sites.most_common()) or "none"
        print(f"sync_check {case}: {sum(sites.values())} host syncs after the first row, {steps} steps, "
              f"status {run['status']}: {listed}", flush=True)


SPEED_ROWS = {  # name: (what it is, HPARAMS overrides, data placement)
    "fp32": ("fp32 eager, TF32 off", {"precision": "fp32", "compile": "false"}, "auto"),
    "template": ("bf16 + compile + fused + CUDA graphs (template)", {}, "auto"),
    "nographs": ("template without CUDA graphs (compile_mode=default)", {"compile_mode": "default"}, "auto"),
    "host": ("template, images in host memory (prefetch thread)", {}, "host"),
    "blocks": ("template, each transformer block compiled alone (compile_scope=blocks)",
               {"compile_scope": "blocks"}, "auto"),
}


def speed(steps: int, only: list[str], dry: bool = False) -> bool:
    """The speed rows; ``dry``: preset tiny at 64 px on the CPU (checks the rows run). False
    when a row raised or did not end ``ok`` with a finite loss (its samples/s would measure
    nothing); the rows after it still run."""
    good = True
    cuda = DEVICE == "cuda"
    cache = random_cache(256, 64, 32, 512) if dry else random_cache(4096, 224, 77, 8192)
    model = {"preset": "tiny", "batch_size": "16"} if dry else {"preset": "vit-s16", "batch_size": "64"}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    def row(name: str, extra: dict, placement: str) -> bool:
        gc.collect()  # the last row's model, optimizer and device images out of this row's peak
        if cuda:
            torch.cuda.empty_cache()
        run = train(cache, steps, {**model, "expert": "false", **extra}, placement=placement)
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0  # since run_loop reset it
        loss = run["last"].get("loss", math.nan)
        row_ok = trained(run)
        rate = f"{run['steady_sps']:.0f} samples/s" if row_ok else "FAILED"
        print(f"speed: {name}: {rate}, warmup_s {run.get('warmup_s') or 0.0:.1f}, "
              f"peak {mem:.1f} GiB, status {run['status']}, loss {loss:.3f}", flush=True)
        return row_ok

    for key in only:
        good = attempt(f"speed {key}", row, *SPEED_ROWS[key]) and good
    return good


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="steps per speed configuration")
    ap.add_argument("--skip-speed", action="store_true", help="smoke run only")
    ap.add_argument("--skip-smoke", action="store_true", help="speed runs only")
    # 45 s: on an H100 the tiny model's first step (cold compile cache) took 26 s, and the
    # harness refuses a budget that the first step outlasts
    ap.add_argument("--harness-budget-s", type=float, default=45.0,
                    help="training budget of the harness smoke run (0: skip it)")
    ap.add_argument("--harness-isolate", action="store_true",
                    help="run the harness smoke run with --isolate (the recipe's processes in the sandbox)")
    ap.add_argument("--only", default=",".join(SPEED_ROWS),
                    help=f"speed: comma-separated rows to run, of {', '.join(SPEED_ROWS)} (default: all)")
    ap.add_argument("--dry-run", action="store_true",
                    help="on the CPU, preset tiny, a few steps: checks this script, measures nothing")
    args = ap.parse_args(argv)
    only = [k for k in args.only.split(",") if k]
    if unknown := [k for k in only if k not in SPEED_ROWS]:
        ap.error(f"--only: unknown rows {', '.join(unknown)} (known: {', '.join(SPEED_ROWS)})")
    global DEVICE
    DEVICE = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    name = "CPU dry run (nothing measured)" if args.dry_run else torch.cuda.get_device_name()
    print(f"device: {name} (torch {torch.__version__})", flush=True)
    ok = True
    try:
        if not args.skip_smoke:
            ok = attempt("smoke", smoke, *((6, 32) if args.dry_run else ()))
            if args.harness_budget_s > 0:
                ok = attempt("harness_smoke", harness_smoke, 2.0 if args.dry_run else args.harness_budget_s,
                             dry=args.dry_run, isolate=args.harness_isolate) and ok
        if not args.skip_speed:
            ok = attempt("speed", speed, 3 if args.dry_run else args.steps, only, dry=args.dry_run) and ok
        if not args.skip_smoke:  # a diagnostic: after the speed rows, so a time limit cuts it first
            ok = attempt("sync_check", lambda: sync_check() or True) and ok
    except KeyboardInterrupt:  # past gpu_check.sh's limit for this step: the next step's time is not ours
        print("train_check: stopped (SIGTERM or Ctrl-C); the checks after this point did not run", flush=True)
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
