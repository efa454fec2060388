"""``python -m bench.plot RUN.json --out loss.png``: time and memory against B for each
contrastive-loss implementation, from a saved benchmark run (a baseline or a guard run)."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from bench.guard import load_run  # noqa: E402


def loss_series(run: dict, suite: str) -> dict[str, list[tuple[int, float, float | None]]]:
    """impl → sorted [(B, median ms, peak extra MiB or None)] for one loss suite."""
    series = defaultdict(list)
    for b in run["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("suite") != suite or not b.get("stats"):
            continue
        mem = info.get("peak_extra_bytes")
        series[info["impl"]].append((int(info["B"]), b["stats"]["median"] * 1e3, mem / 2**20 if mem else None))
    return {k: sorted(v) for k, v in series.items()}


def plot(run: dict, out: Path, suite: str = "loss-fwd+bwd") -> Path:
    series = loss_series(run, suite)
    if not series:
        raise SystemExit(f"plot: error: no '{suite}' benchmarks with timings in this run")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, pts in series.items():
        bs = [p[0] for p in pts]
        ax_t.plot(bs, [p[1] for p in pts], marker="o", label=impl)
        if any(p[2] is not None for p in pts):
            ax_m.plot(bs, [p[2] or 0 for p in pts], marker="o", label=impl)
    for ax, label in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    if ax_m.lines:
        ax_m.legend()
    else:
        ax_m.text(0.5, 0.5, "not measured on this device", ha="center", va="center", transform=ax_m.transAxes)
    ax_t.legend()
    fig.suptitle(f"contrastive loss, {suite.removeprefix('loss-')} — {run.get('device', 'unknown device')}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a benchmark JSON (e.g. bench/baselines/<device>.json)")
    ap.add_argument("--out", type=Path, default=Path("loss.png"), help="PNG to write (default: loss.png)")
    ap.add_argument("--suite", default="loss-fwd+bwd", choices=["loss-fwd", "loss-fwd+bwd"],
                    help="which loss benchmarks (default: loss-fwd+bwd)")
    args = ap.parse_args(argv)
    if args.out.suffix.lower() not in (".png", ".pdf", ".svg"):
        ap.error(f"--out {args.out}: expected a .png, .pdf or .svg file")
    print(plot(load_run(args.run, "plot"), args.out, args.suite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
