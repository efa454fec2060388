"""GPU checks and comparison table of the kernels (run by bench/gpu_check.sh).

Sections, in priority order so that a cut-off run still tells the most:
  1. a torch.compile(fullgraph=True, mode="reduce-overhead") training step through the
     fused loss (lean with either backward, fast): finite, matches eager, captured by CUDA
     graphs;
  2. accuracy against float64 at B = 4,096 and 16,384, and the lean extra memory at
     B = 16,384 and 32,768;
  3. the table: median fwd+bwd time (CUDA events), peak extra memory, TFLOP/s counted as
     6·B²·D for every implementation, for lean:fused, lean:panel, fast, plain eager,
     plain + torch.compile; the device time per kernel of each fused mode at B = 16,384;
     lean:panel against the size of its Ĝ panel at B = 32,768; then retrieval ranks at
     N = 100,000;
  4. B = 1,048,576 in lean mode (its default backward at D = 512, the panel; fixed
     configs, no autotuning);
  5. the config each autotuned kernel chose, per key.
Needs only torch, triton and numpy; random data; prints the device first and a short
table last, and writes the table to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from bench import tuning  # noqa: E402

MIB = 1 << 20
FUSED_MODES = ("lean:fused", "lean:panel", "fast")  # the two lean backwards side by side
LINES: list[str] = []  # the short table printed last
DEV = "cuda"  # "cpu" for --dry-run: every section on tiny sizes through the references

# Sizes of each section: the GPU check, --quick, and --dry-run (CPU, seconds in all).
SIZES = {
    "full": dict(accuracy=(4096, 16384), memory=(16384, 32768), d=512, breakdown=16384, sweep=32768,
                 sweep_mib=(16, 32, 56, 64, 96), ranks=100_000, huge=1 << 20,
                 table=[(4096, 512), (16384, 512), (32768, 512), (65536, 512), (32768, 256), (32768, 768)]),
    "dry": dict(accuracy=(96,), memory=(64, 128), d=48, breakdown=64, sweep=256, sweep_mib=(1, 2),
                ranks=300, huge=512, table=[(64, 48), (100, 40)]),
}
SIZES["quick"] = dict(SIZES["full"], table=[(16384, 512), (32768, 512)])  # where the targets are


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> int:
    """Start a peak-memory window; returns the bytes allocated now (0 on the CPU)."""
    if DEV != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_since(base: int) -> float:
    """MiB allocated at the peak of the window beyond ``base`` (0 on the CPU)."""
    if DEV != "cuda":
        return 0.0
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def timed_ms(fn) -> float:
    """Milliseconds of ``fn()``: CUDA events on the GPU, the wall clock on the CPU."""
    if DEV != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def say(line: str = "") -> None:
    print(line, flush=True)


OUT: Path | None = None  # --out: each recorded line is appended at once (a run cut off
                         # by a time limit still leaves what it measured)


def record(line: str) -> None:
    LINES.append(line)
    say(line)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(line + "\n")


def plain_loss(img, txt, scale):
    """The textbook loss (logits materialised), as timed by the reference figures."""
    with torch.autocast(img.device.type, dtype=torch.bfloat16):
        logits = scale * img @ txt.T
        y = torch.arange(img.shape[0], device=img.device)
        return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2


_COMPILED = {}


def plain_compiled(img, txt, scale):
    """plain_loss through torch.compile (Inductor on the GPU; on the CPU dry run the eager
    backend, which exercises the same path without minutes of C++ compilation). Every shape
    gets its own static-shape graph, as a caller with one batch size would: reusing one
    compiled function across the table's sizes made Dynamo mark B and D dynamic from the
    second size on, so rows after the first timed a different kind of graph."""
    key = (DEV, tuple(img.shape))
    if key not in _COMPILED:
        torch._dynamo.reset()  # a fresh cache: no recompile limit, no dynamic shapes
        _COMPILED.clear()
        _COMPILED[key] = torch.compile(plain_loss, dynamic=False, backend="inductor" if DEV == "cuda" else "eager")
    return _COMPILED[key](img, txt, scale)


def inputs(b, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    img = F.normalize(torch.randn(b, d, device=DEV, generator=g), dim=1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, d, device=DEV, generator=g), dim=1).to(dtype).requires_grad_()
    scale = torch.tensor(14.3, device=DEV, requires_grad=True)
    return img, txt, scale


def step(fn, img, txt, scale):
    img.grad = txt.grad = scale.grad = None
    loss = fn(img, txt, scale)
    loss.backward()
    return loss


def measure(fn, img, txt, scale, reps):
    """(median ms, peak extra MiB beyond the inputs, gradients included)."""
    step(fn, img, txt, scale)  # warm-up: compilation, autotuning
    step(fn, img, txt, scale)
    img.grad = txt.grad = scale.grad = None
    base = reset_peak()
    step(fn, img, txt, scale)
    peak = peak_since(base)
    times = []
    for _ in range(reps):
        img.grad = txt.grad = scale.grad = None
        times.append(timed_ms(lambda: step(fn, img, txt, scale)))
    return statistics.median(times), peak


def fused(mode: str):
    """Our loss in one mode, as (img, txt, scale) -> loss."""
    return functools.partial(kernels.contrastive_loss, mode=mode)


def impls():
    return {
        **{m: fused(m) for m in FUSED_MODES},
        "plain eager": plain_loss,
        "plain + compile": plain_compiled,
    }


# ---------------------------------------------------------------------------------------


def check_compiled_step() -> bool:
    ok = True
    for mode in FUSED_MODES:
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = torch.nn.Linear(256, 128, device=DEV)
        log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=DEV))
        opt = torch.optim.AdamW([*model.parameters(), log_scale], lr=1e-3)
        b = 2048 if DEV == "cuda" else 64
        x = torch.randn(b, 256, device=DEV)
        t = F.normalize(torch.randn(b, 128, device=DEV), dim=1).bfloat16()

        def fwd(x, t, mode=mode, model=model, log_scale=log_scale):
            with torch.autocast(DEV, dtype=torch.bfloat16):
                img = F.normalize(model(x).float(), dim=1).bfloat16()
            return kernels.contrastive_loss(img, t, log_scale.exp(), mode=mode)

        eager_loss = fwd(x, t).detach().item()
        how = dict(mode="reduce-overhead") if DEV == "cuda" else dict(backend="aot_eager")
        compiled = torch.compile(fwd, fullgraph=True, **how)
        from torch._dynamo.utils import counters

        counters.clear()
        losses = []
        for _ in range(6):
            loss = compiled(x, t)
            loss.backward()
            losses.append(loss.detach().item())
            opt.step()
            opt.zero_grad(set_to_none=True)
        skips = sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",))
        good = all(math.isfinite(v) for v in losses) and abs(losses[0] - eager_loss) <= 1e-3 * abs(eager_loss)
        good = good and losses[-1] < losses[0] and skips == 0
        ok &= good
        record(
            f"compiled step ({mode}): {'ok' if good else 'FAIL'}; losses {losses[0]:.4f} → {losses[-1]:.4f} "
            f"(eager {eager_loss:.4f}); cudagraph skips {skips}"
        )
    return ok


def check_accuracy(sizes, d) -> bool:
    """Loss and gradients of every fused mode against float64 autograd (the long-K gradient
    products at 16k are where half-precision reductions would show). False if any misses."""
    ok = True
    for b in sizes:
        img, txt, scale = inputs(b, d, seed=1)
        a = img.detach().double().requires_grad_()
        c = txt.detach().double().requires_grad_()
        s = scale.detach().double().requires_grad_()
        logits = s * a @ c.T
        y = torch.arange(b, device=DEV)
        ref = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
        ref.backward()
        want = [ref.detach(), a.grad, c.grad, s.grad]
        del logits, a, c, s
        for mode in FUSED_MODES:
            loss = step(fused(mode), img, txt, scale)
            got = [loss.detach(), img.grad, txt.grad, scale.grad]
            errs = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want, strict=True)]
            good = errs[0] <= 1e-3 and max(errs[1:]) <= 1e-2
            ok &= good
            record(
                f"accuracy B={b} D={d} bf16 {mode}: loss {errs[0]:.1e}, dI {errs[1]:.1e}, dT {errs[2]:.1e}, "
                f"ds {errs[3]:.1e} ({'ok' if good else 'FAIL'}: targets 1e-3 / 1e-2)"
            )
        img = txt = scale = want = None
        empty_cache()
    return ok


def check_lean_memory(sizes, d, limit=64) -> bool:
    """Extra memory of both lean backwards beyond the input gradients (target: ≤ 64 MiB at
    B = 32k; B²·2 bytes, a bf16 S, would be 512 MiB at 16k and 2 GiB at 32k). False if
    either exceeds ``limit``."""
    ok = True
    for b in sizes:
        for mode in FUSED_MODES[:2]:
            img, txt, scale = inputs(b, d)
            _, peak = measure(fused(mode), img, txt, scale, 1)
            extra = peak - 2 * b * d * img.element_size() / MIB
            ok &= extra <= limit
            record(
                f"{mode} memory B={b}: {extra:.1f} MiB beyond the input gradients "
                f"({'ok' if extra <= limit else 'FAIL'}: target {limit} MiB; B²·2 bytes = {b * b * 2 / MIB:.0f} MiB)"
            )
            img = txt = scale = None
    return ok


def table(sizes) -> bool:
    """The speed table; False when an implementation raised. Out of memory is a cell, not a
    failure, for the plain losses only: they are expected to run out at the largest B, and
    the fused modes exist not to."""
    failed = False
    header = f"{'B':>8} {'D':>4} | " + " | ".join(f"{n:^26}" for n in impls())
    record("loss fwd+bwd, bf16: median ms / peak extra MiB / TFLOP/s (6·B²·D)")
    record(header)
    for b, d in sizes:
        cells = []
        reps = 20 if b <= 16384 else (10 if b <= 32768 else 5)
        for name, fn in impls().items():
            empty_cache()
            try:
                img, txt, scale = inputs(b, d)
                ms, peak = measure(fn, img, txt, scale, reps)
                tflops = 6 * b * b * d / (ms * 1e-3) / 1e12
                cells.append(f"{ms:10.2f} {peak:8.0f} {tflops:6.0f}")  # 26 wide, as the header
            except torch.cuda.OutOfMemoryError:
                cells.append(f"{'OOM':^26}")
                if not name.startswith("plain"):
                    say(f"  {name} at B={b}: out of memory")
                    failed = True
            except Exception as e:  # keep the table going; the error is printed
                say(f"  {name} at B={b}: {type(e).__name__}: {e}")
                cells.append(f"{'error':^26}")
                failed = True
            finally:
                img = txt = scale = None
        record(f"{b:>8} {d:>4} | " + " | ".join(cells))
    if failed:
        record("table: FAIL (a fused mode raised or ran out of memory: see the error and OOM cells)")
    return not failed


def panel_sweep(b, d, sizes_mib) -> None:
    """lean:panel fwd+bwd against the size of its Ĝ panel (L2 residency against the width
    of the cuBLAS products); the default is kernels._contrastive_panel.PANEL_BYTES. The
    panel kernel's tuned config is keyed on (D, B bucket), not the panel height: every
    height here runs the config tuned for the default one (at 32k, by the sections before)."""
    from kernels import _contrastive_panel as panel

    default, floor = panel.PANEL_BYTES, panel.MIN_PANEL_ROWS
    cells = []
    try:
        panel.MIN_PANEL_ROWS = 128  # the sizes as given, not the floor's 256 rows
        for mib in sizes_mib:
            panel.PANEL_BYTES = mib << 20
            img, txt, scale = inputs(b, d)
            ms, peak = measure(fused("lean:panel"), img, txt, scale, 5)
            rows = panel.panel_rows(b, img.element_size())
            cells.append(f"{mib} MiB ({rows} rows): {ms:.2f} ms, {peak:.0f} MiB")
            img = txt = scale = None
    finally:
        panel.PANEL_BYTES, panel.MIN_PANEL_ROWS = default, floor
    record(f"panel sweep B={b} D={d} bf16 (default {default >> 20} MiB): " + "; ".join(cells))


def breakdown(b, d, top=6) -> None:
    """Device time per kernel of one fwd+bwd of each fused mode (torch.profiler), and the
    number of kernels launched: which kernel to work on next. Kernel names are cut to 40 characters."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for mode in FUSED_MODES:
        img, txt, scale = inputs(b, d)
        fn = fused(mode)
        step(fn, img, txt, scale)  # autotuning stays out of the trace
        sync()
        cuda = DEV == "cuda"  # on the CPU dry run: CPU operators
        # CPU activity too on CUDA: some setups record no kernels with CUDA activity alone
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            step(fn, img, txt, scale)
            sync()
        events = [e for e in prof.key_averages() if e.device_type == (DeviceType.CUDA if cuda else DeviceType.CPU)]

        def us(e, cuda=cuda):
            return e.self_device_time_total if cuda else e.self_cpu_time_total

        events.sort(key=lambda e: -us(e))
        total = sum(us(e) for e in events) / 1e3
        parts = ", ".join(f"{e.key[:40]} ×{e.count} {us(e) / 1e3:.2f}" for e in events[:top])
        parts = parts or "none recorded (profiler)"
        count = sum(e.count for e in events)  # the fast mode's small ops once made this about 45 kernels
        what = "kernels" if cuda else "operator events"  # the CPU dry run counts nested aten ops
        record(f"breakdown {mode} B={b} D={d}: {total:.2f} ms of kernels, {count} {what}: {parts}")
        img = txt = scale = None


def tuned_configs() -> None:
    """Records what the autotuners chose and timed (``tuning.tuned_lines``). Run after the
    table, which tuned them."""
    for line in tuning.tuned_lines():
        record(line)


def ranks(n, d) -> bool:
    """Time, memory and correctness of the rank kernel; False if a collapsed model does not
    rank N-1 (the time target is reported, MISS or ok, as the table's are)."""
    g = torch.Generator(device=DEV).manual_seed(2)
    img = F.normalize(torch.randn(n, d, device=DEV, generator=g), dim=1).bfloat16()
    txt = F.normalize(img.float() + 0.5 * torch.randn(n, d, device=DEV, generator=g), dim=1).bfloat16()
    kernels.retrieval_ranks(img, txt)  # warm-up, autotuning
    base = reset_peak()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        got = kernels.retrieval_ranks(img, txt)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = peak_since(base)
    ref = kernels.retrieval_ranks_ref(img, txt)
    diff = (got.i2t != ref.i2t).sum().item() + (got.t2i != ref.t2i).sum().item()
    const = torch.full((n, d), 0.03, device=DEV, dtype=torch.bfloat16)
    flat = kernels.retrieval_ranks(const, const)
    collapsed = bool((flat.i2t == n - 1).all() and (flat.t2i == n - 1).all())
    ms = statistics.median(times)
    record(
        f"ranks N={n} D={d} bf16: {ms:.1f} ms ({'ok' if ms < 100 else 'MISS'}: target < 100 ms), "
        f"peak extra {peak:.0f} MiB, mean rank i2t {got.i2t.float().mean():.1f}; ranks differing from "
        f"the fp32 reference: {diff}; collapsed model ranks N-1: {'ok' if collapsed else 'FAIL'}"
    )
    return collapsed


def huge(b, d) -> bool:
    """B = 1M in lean mode: completes with finite loss and gradients (False otherwise)."""
    img, txt, scale = inputs(b, d, seed=3)
    base = reset_peak()
    t0 = time.perf_counter()
    loss = step(fused("lean"), img, txt, scale)
    sync()
    sec = time.perf_counter() - t0
    peak = peak_since(base)
    finite = bool(torch.isfinite(loss) and torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all())
    record(
        f"lean B={b} D={d} bf16: {sec:.1f} s fwd+bwd (first call, compilation included), peak extra "
        f"{peak / 1024:.2f} GiB, loss {loss.detach().item():.4f}, finite: {'ok' if finite else 'FAIL'}"
    )
    return finite


def main(argv=None) -> int:
    global DEV, OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="write the short table here, line by line as it is measured")
    ap.add_argument("--quick", action="store_true", help="smaller table (B = 16k and 32k, D = 512)")
    ap.add_argument("--table", default=None, metavar="B:D,...",
                    help="the comparison table's sizes instead of the mode's, e.g. 16384:512,65536:512")
    ap.add_argument("--dry-run", action="store_true",
                    help="every section on the CPU with tiny sizes through the PyTorch references: "
                         "checks this script, measures nothing")
    args = ap.parse_args(argv)
    sizes = None  # checked before --out is emptied: a refused command leaves an earlier table
    if args.table:
        try:
            sizes = [tuple(int(v) for v in item.split(":")) for item in args.table.split(",")]
            if not sizes or any(len(t) != 2 or min(t) < 1 for t in sizes):
                raise ValueError
        except ValueError:
            ap.error(f"--table: expected B:D pairs of positive integers, comma-separated, got {args.table!r}")
    if args.out is not None and args.out.is_dir():
        ap.error(f"--out {args.out}: a folder; name the file the table goes to")
    LINES.clear()
    DEV = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        say("no CUDA device: nothing to check")
        return 1
    OUT = args.out
    if OUT is not None:  # after every refusal: a refused command leaves an earlier table
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text("")  # this run's lines only
    z = SIZES["dry" if args.dry_run else "quick" if args.quick else "full"]
    if sizes:
        z = dict(z, table=sizes)
    name = "CPU dry run (nothing measured)" if args.dry_run else torch.cuda.get_device_name()
    record(f"device: {name} (torch {torch.__version__})")
    tuning.TIMINGS.clear()
    tuning.watch_tuning()
    ok = True
    d = z["d"]
    sections = [
        ("compiled training step", check_compiled_step),
        ("accuracy", lambda: check_accuracy(z["accuracy"], d)),
        ("lean memory", lambda: check_lean_memory(z["memory"], d)),
        ("table", lambda: table(z["table"])),
        ("ranks", lambda: ranks(z["ranks"], d)),
        ("B = 1M", lambda: huge(z["huge"], d)),
        ("tuned configs", tuned_configs),
        # diagnostics last: a run cut by its time limit still reports every target above
        ("kernel breakdown", lambda: breakdown(z["breakdown"], d)),
        ("panel sweep", lambda: panel_sweep(z["sweep"], d, z["sweep_mib"])),
    ]
    for name, fn in sections:
        say(f"== {name}")
        t0 = time.perf_counter()
        try:
            res = fn()
            ok &= res is not False
        except Exception as e:
            ok = False
            record(f"{name}: FAILED with {type(e).__name__}: {e}")
        say(f"   ({time.perf_counter() - t0:.0f} s)")
        empty_cache()
    say("\n==== summary")
    for line in LINES:
        say(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
