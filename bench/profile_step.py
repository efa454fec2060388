"""Where a training step's time goes: the template's step under ``torch.profiler``.

Runs the template recipe through the real loop on random data (``train_check.random_cache``),
skips the compile steps, profiles a few steady steps and prints, per step: the wall time,
the time the device was busy running kernels and the number of kernel launches — a busy
fraction far below 1 means the step is bound by launching (CUDA graphs help), near 1 means
by the kernels (then the top-kernel table says which). Metrics are read back every step
here (log_every=1), so the host never runs more than about one step ahead of the device:
the wall time is an upper bound.

    python bench/profile_step.py --preset vit-s16 --batch 64 [--compile-mode default]

Needs torch, numpy, safetensors and tqdm; on a CPU it profiles CPU operators instead.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_check import random_cache, train  # noqa: E402
from eclip.errors import EclipError  # noqa: E402

LAUNCH = re.compile(r"^cu(da)?(Graph)?Launch")  # cudaLaunchKernel(ExC), cuLaunchKernel(Ex), cudaGraphLaunch


def profile_step(preset: str, batch: int, image_size: int, context: int, skip: int, active: int,
                 device: str, overrides: dict | None = None, top: int = 12) -> dict:
    """Profile ``active`` steps after ``skip`` (compilation, CUDA-graph recording); prints the
    report and returns its figures."""
    cuda = device.startswith("cuda")
    cache = random_cache(max(4 * batch, 256), image_size, context, 8192)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:  # CUPTI set up before any CUDA graph is captured (PyTorch's cudagraphs + profiler workaround)
        try:
            from torch.profiler._utils import _init_for_cuda_graphs
        except ImportError:  # pragma: no cover - a PyTorch without the private helper
            pass
        else:
            _init_for_cuda_graphs()
    marks: list[float] = []
    # repeat=1: one cycle, so the steps after it cannot start a second trace that replaces it
    with profile(activities=acts, schedule=schedule(wait=skip, warmup=1, active=active, repeat=1)) as prof:
        def on_log(row):
            marks.append(time.perf_counter())
            prof.step()

        run = train(cache, skip + 1 + active + 1, {"preset": preset, "batch_size": str(batch), "expert": "false",
                                                   **(overrides or {})}, log_every=1, device=device, on_log=on_log)
    if run["status"] != "ok":
        raise SystemExit(f"profile: the run ended {run['status']}: {run['last'].get('reason')}")
    # Rows arrive one log point late (eclip.readback): marks[k] is taken once step k+2 is
    # launched, and the profiler steps at the same points; the active steps are
    # skip+3 … skip+2+active, one window of ``active`` steps either way.
    wall_ms = (marks[skip + active] - marks[skip]) / active * 1e3
    averages = prof.key_averages()
    # Device-side events only: the CPU operator that launched a kernel carries its time too.
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    busy_ms = sum(e.self_device_time_total for e in kernels) / active / 1e3
    # Launches are counted on the host side: a replayed CUDA graph is one launch of many kernels.
    launch_calls = [e for e in averages if LAUNCH.match(e.key)]
    launches = sum(e.count for e in launch_calls if "Graph" not in e.key) / active
    graph_launches = sum(e.count for e in launch_calls if "Graph" in e.key) / active
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}  preset {preset}, batch {batch}, "
          f"{image_size} px, overrides {overrides or {}}")
    if cuda:
        print(f"per step: wall {wall_ms:.2f} ms, kernels busy {busy_ms:.2f} ms "
              f"({busy_ms / wall_ms:.0%} of wall), {launches:.0f} kernel launches, "
              f"{graph_launches:.0f} CUDA-graph launches, {len(kernels)} distinct kernels")
    else:
        print(f"per step: wall {wall_ms:.2f} ms")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    pool = kernels if cuda else list(averages)
    rows = sorted(pool, key=lambda e: getattr(e, sort), reverse=True)[:top]
    print(f"{'ms/step':>8} {'share':>6} {'calls':>6}  {'kernel' if cuda else 'operator'}")
    total = sum(getattr(e, sort) for e in pool) or 1
    for e in rows:
        t = getattr(e, sort)
        print(f"{t / active / 1e3:8.3f} {t / total:6.1%} {e.count / active:6.0f}  {e.key[:90]}")
    return {"wall_ms": wall_ms, "busy_ms": busy_ms, "launches": launches, "graph_launches": graph_launches,
            "rows": len(rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="vit-s16", help="model preset")
    ap.add_argument("--batch", type=int, default=64, help="samples per step")
    ap.add_argument("--image-size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--context", type=int, default=77, help="caption tokens")
    ap.add_argument("--skip", type=int, default=6, help="steps before profiling (compilation, graph recording)")
    ap.add_argument("--active", type=int, default=5, help="steps profiled")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--compile-mode", default="auto", help="the recipe's compile_mode (auto: CUDA graphs on CUDA)")
    args = ap.parse_args(argv)
    for flag, value, least in (("--batch", args.batch, 1), ("--image-size", args.image_size, 1),
                               ("--context", args.context, 1), ("--skip", args.skip, 0), ("--active", args.active, 1)):
        if value < least:
            ap.error(f"{flag} {value}: must be at least {least}")
    try:
        profile_step(args.preset, args.batch, args.image_size, args.context, args.skip, args.active, args.device,
                     {"compile_mode": args.compile_mode})
    except EclipError as e:  # a device this machine lacks, a preset or option the recipe refuses
        print(f"profile_step: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
