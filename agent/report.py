"""``python -m agent.report runs/<tag>``: the results table and ``progress.png``.

The plot shows every experiment's validation mean rank (lower is better): discards grey,
keeps green with their descriptions, baselines blue, and the running best as a step line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from agent import journal
from agent.runner import device_error, seconds_error
from agent.workspace import Workspace, WorkspaceError, locked
from eclip.errors import OneLineParser, first_line
from eclip.fileio import atomic_write
from eclip.process import exit_main, sigterm_as_ctrl_c


def summary(events: list[dict]) -> dict:
    """Counts, the best score by the loop's own rule (the baseline mean, then each keep),
    how far apart the baselines' speeds lay, and experiments per hour from the first start
    to the last end."""
    exps = journal.experiments(events)
    base = [e["val_mean_rank"] for e in exps if e.get("status") == "baseline"]
    trail = journal.running_best(exps)
    best = trail[-1][1] if trail else None
    counts: dict[str, int] = {}
    for e in exps:
        counts[e.get("status", "running")] = counts.get(e.get("status", "running"), 0) + 1
    times = [e["time"] for e in events if e.get("event") in ("start", "end") and "time" in e]
    hours = (max(times) - min(times)) / 3600 if len(times) > 1 else 0
    min_delta = journal.last_session(events).get("min_delta", 0.0)
    return {"experiments": len(exps), "counts": counts, "best": best,
            "noise_floor": journal.noise_floor(exps, min_delta)[1],
            "baseline_mean": sum(base) / len(base) if base else None,
            "baseline_spread": journal.throughput_spread(exps),
            "per_hour": len(exps) / hours if hours else None}


def plot_progress(ws: Workspace) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    events = journal.read(ws.journal_path)
    exps = journal.experiments(events)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = {"keep": ("tab:green", "keep"), "baseline": ("tab:blue", "baseline")}
    for e in exps:
        r, st = e.get("val_mean_rank"), e.get("status")
        if r is None:
            continue
        colour, label = labels.get(st, ("lightgrey", "discard"))
        ax.scatter(e["n"], r, color=colour, zorder=3, s=25, label=label)
        if st == "keep":
            # as written: matplotlib reads "$...$" as math, and a description's "$\\sqrt{2}^{1}^{2}$"
            # failed the whole report (and --final after it)
            ax.annotate(" ".join(str(e.get("description", "")).split())[:40], (e["n"], r), fontsize=7,
                        xytext=(4, 4), textcoords="offset points", parse_math=False)
    trail = journal.running_best(exps)
    if trail:
        ax.step(*zip(*trail, strict=True), where="post", color="tab:green", label="best so far")
        floor = journal.noise_floor(exps, journal.last_session(events).get("min_delta", 0.0))[1]
        last_base = max((e["n"] for e in exps if e.get("status") == "baseline"), default=0)
        after = [(n, b) for n, b in trail if n >= last_base]  # the floor exists once the baselines ran
        if floor > 0 and after:  # a change is kept only below this line: why a grey point under the best lost
            ax.step([n for n, _ in after], [b - floor for _, b in after], where="post", color="tab:green",
                    linestyle="--", linewidth=0.8, label="keep below (best − noise floor)")
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles, strict=True))
        ax.legend(unique.values(), unique.keys())
    ax.set_xlabel("experiment")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experiments are numbered, not measured
    ax.set_ylabel("validation mean rank (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = ws.root / "progress.png"
    try:  # written whole or not at all
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m agent.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace", type=Path, help="runs/<tag>")
    ap.add_argument("--final", action="store_true",
                    help="retrain the best commit on train+val and score the held-out test split (once)")
    ap.add_argument("--data", type=Path, help="--final: prepared cache (default: the loop session's)")
    ap.add_argument("--budget-s", type=float, help="--final: training budget (default: the loop session's)")
    ap.add_argument("--device", help="--final: device (default: the loop session's)")
    ap.add_argument("--force", action="store_true",
                    help="--final: score the test split again although another commit was already scored")
    args = ap.parse_args(argv)
    final_only = [flag for flag, given in (("--data", args.data is not None), ("--budget-s", args.budget_s is not None),
                                           ("--device", args.device is not None), ("--force", args.force)) if given]
    if final_only and not args.final:  # else silently ignored: the person would think them in force
        print(f"report: error: {final_only[0]} applies to --final only (add --final, or leave it out)", file=sys.stderr)
        return 2
    if message := seconds_error("--budget-s", args.budget_s) or (args.device is not None
                                                                  and device_error(args.device, auto=True)):
        print(f"report: error: {message}", file=sys.stderr)
        return 2
    ws = Workspace(args.workspace)
    if not ws.journal_path.exists():
        print(f"report: error: {ws.journal_path}: no journal here", file=sys.stderr)
        return 2
    try:
        events = journal.read(ws.journal_path)
    except WorkspaceError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    exps = journal.experiments(events)
    s = summary(events)
    priced = any(e.get("event") == "usage" for e in events)  # an LLM proposer: tokens and cost per experiment
    head = f"{'n':>4}  {'status':<11}{'val_mean_rank':>14}"
    if priced:
        head += f"  {'tokens in/out/cache w/r':>26}  {'cost $':>7}"
    print(head + "  description")
    for e in exps:
        r = e.get("val_mean_rank")
        line = f"{e['n']:>4}  {e.get('status', 'running'):<11}{'' if r is None else f'{r:.2f}':>14}"
        if priced:
            # summed over the row's usage events: they include replies of a proposal the loop
            # died in, which its start event never recorded
            u = e.get("api_usage") or {}
            tok = "/".join(str(u.get(k, 0)) for k in ("input_tokens", "output_tokens", "cache_write_tokens",
                                                       "cache_read_tokens")) if u else ""
            cost = e.get("api_cost_usd")
            line += f"  {tok:>26}  {'' if cost is None else f'{cost:.4f}':>7}"
        print(f"{line}  {' '.join(str(e.get('description', '')).split())}")  # one row a line
    print("---")
    fmt = lambda v: "none" if v is None else round(v, 2)
    print(f"best_mean_rank: {fmt(s['best'])}\nbaseline_mean:  {fmt(s['baseline_mean'])}")
    print("counts:         " + ", ".join(f"{k} {v}" for k, v in sorted(s["counts"].items())))
    print(f"noise_floor:    {s['noise_floor']:.2f}")
    spread = s["baseline_spread"]  # fastest over slowest baseline (steady samples/s): above 1.2, a shared machine
    print(f"baseline_speed: {'none' if spread is None else f'{spread:.2f}x apart'}")
    if priced:
        calls = [e for e in events if e.get("event") == "usage"]  # one per reply: the record of spending
        totals = {k: sum((e.get("usage") or {}).get(k, 0) for e in calls) for k in
                  ("calls", "input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens")}
        print("api_tokens:     " + ", ".join(f"{k} {v}" for k, v in totals.items()))
        print(f"api_cost_usd:   {journal.spent_usd(events):.4f}")
    print(f"per_hour:       {fmt(s['per_hour'] and round(s['per_hour'], 1))}")
    for e in events:
        if e.get("event") == "final":
            print(f"final:          commit {e['commit'][:7]} test_mean_rank {fmt(e.get('test_mean_rank'))} ({e['status']})")
    if not exps:  # an earlier plot stays as it is rather than becoming an empty one
        print("plot:           not written (no experiments recorded)")
    else:
        try:
            print(f"plot:           {plot_progress(ws)}")
        except (OSError, ValueError) as e:  # a read-only workspace, text the plot cannot take: the table stays
            print(f"plot:           not written ({getattr(e, 'strerror', None) or first_line(e, 200)})")
    if args.final:
        from agent.final import final_evaluation, summary_lines

        try:
            # the loop's own workspace only (git -C would climb to an enclosing repository, and
            # train another project's commit); not beside a running loop (its runs and this one
            # would share the device); a SIGTERM ends the run as Ctrl-C does
            Workspace.check(ws.root)
            with sigterm_as_ctrl_c(), locked(ws.root):
                event, ran = final_evaluation(ws, data=args.data, budget_s=args.budget_s, device=args.device,
                                              force=args.force)
        except (ValueError, WorkspaceError) as e:
            print(f"report: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run is killed and journaled
            print("report: interrupted: the final run is journaled as interrupted and scored nothing; "
                  "--final runs it again", file=sys.stderr)
            return 130
        if not ran and final_only:
            print(f"report: note: {', '.join(final_only)} not applied: this commit's test score is recorded "
                  "(the test split is scored once)", file=sys.stderr)
        print("\n".join(summary_lines(event, ran)))
        return 0 if event["status"] == "ok" else 1
    return 0


if __name__ == "__main__":
    exit_main(main)
