"""``python -m agent.loop``: propose an edit to the recipe, train it through the harness,
keep it (a commit) or revert it, and repeat — resumable, with everything journaled.

    python -m agent.loop                                   # built-in data, search proposer
    python -m agent.loop --tag mar5 --data data/ukiyoe --budget-s 180 --max-experiments 40

State lives in the workspace (``agent.workspace``) and is re-derived from the append-only
journal on every iteration, so a restart after a crash or ``kill -9`` continues where the
journal stops: an experiment that had started and not ended is recorded ``interrupted``,
the recipe goes back to the best commit and numbering continues.

Keeping rule: the baseline (the template, unchanged) runs ``--noise-runs`` times; its mean
is the first best and its spread σ the noise floor; a change is kept only if it beats the
best by more than ``max(--min-delta, 2σ)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from agent import journal
from agent.runner import run_experiment
from agent.search import SearchProposer, read_hparams
from agent.workspace import Workspace
from eclip.policy import check_source

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "eclip" / "recipe.py"
DEFAULT_DATA = Path("data/synthetic")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent.loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", default="default", help="workspace name: runs/<tag>/")
    p.add_argument("--proposer", choices=["search"], default="search", help="who proposes edits")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prepared cache (built-in data is prepared if missing)")
    p.add_argument("--budget-s", type=float, default=45.0, help="training budget per experiment")
    p.add_argument("--max-experiments", type=int, default=5, help="experiments after the baselines")
    p.add_argument("--max-hours", type=float, help="stop starting experiments after this long")
    p.add_argument("--workspace-root", type=Path, default=Path("runs"), help="where workspaces live")
    p.add_argument("--noise-runs", type=int, default=3, help="baseline repeats for the noise floor")
    p.add_argument("--min-delta", type=float, default=0.0, help="smallest improvement worth keeping")
    p.add_argument("--device", default="auto", help="device for the runs")
    p.add_argument("--seed", type=int, default=0, help="proposer seed")
    p.add_argument("--timeout-s", type=float, help="hard limit per run (default: budget × 1.5 + 120 s)")
    return p


def state(exps: list[dict], root_commit: str, min_delta: float) -> dict:
    """Best commit and score, noise floor and counts, from the journal alone."""
    base = [e["val_mean_rank"] for e in exps if e.get("kind") == "baseline" and e.get("status") == "baseline"]
    sigma = statistics.stdev(base) if len(base) >= 2 else 0.0
    kept = [e["commit"] for e in exps if e.get("kept")]
    trail = journal.running_best(exps)
    best_commit, best = (kept[-1] if kept else root_commit), (trail[-1][1] if trail else None)
    return {"baselines": len(base), "baseline_attempts": sum(e.get("kind") == "baseline" for e in exps),
            "experiments": sum(e.get("kind") == "experiment" for e in exps), "sigma": sigma,
            "threshold": max(min_delta, 2 * sigma), "best_commit": best_commit, "best": best,
            "next_n": max((e["n"] for e in exps), default=0) + 1}


def record_end(ws: Workspace, n: int, status: str, result: dict, kept: bool, commit: str | None,
               description: str) -> None:
    journal.append(ws.journal_path, {"event": "end", "n": n, "time": time.time(), "status": status,
                                     "val_mean_rank": result.get("val_mean_rank"), "kept": kept,
                                     "result": {k: v for k, v in result.items() if k != "hparams"}})
    journal.add_result_row(ws.results_path, journal.result_row(
        {"commit": commit, "val_mean_rank": result.get("val_mean_rank"), "result": result,
         "status": status, "description": description}))


def outcome(kind: str, result: dict, st: dict) -> tuple[str, bool]:
    """(status, kept) of a finished run: a scored baseline is ``baseline``; a scored
    experiment is ``keep`` only if it beats the best by more than the noise floor."""
    status = result.get("status", "crash")
    if status != "ok":
        return status, False
    if kind == "baseline":
        return "baseline", False
    kept = result["val_mean_rank"] < st["best"] - st["threshold"]
    return ("keep" if kept else "discard"), kept


def recovered_result(ws: Workspace, exp: dict) -> dict | None:
    """The result.json of a run that finished after its start was journaled (the runner
    deletes any older one before starting), or None."""
    path = ws.experiments / str(exp["n"]) / "result.json"
    try:
        if exp.get("commit") is None or path.stat().st_mtime < exp.get("time", 0):
            return None
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def reconcile(ws: Workspace, root_commit: str, min_delta: float) -> None:
    """An experiment that started and never ended: if its run had finished (the loop died
    before journaling it), record its real outcome; otherwise record it ``interrupted``."""
    exps = journal.experiments(journal.read(ws.journal_path))
    for i, e in enumerate(exps):
        if e.get("ended"):
            continue
        r = recovered_result(ws, e)
        if r is not None:
            status, kept = outcome(e.get("kind", "experiment"), r, state(exps[:i], root_commit, min_delta))
            record_end(ws, e["n"], status, dict(r, recovered=True), kept, e.get("commit"), e.get("description", ""))
            print(f"loop: experiment {e['n']} had finished when the loop stopped: recorded as {status}",
                  file=sys.stderr)
            continue
        record_end(ws, e["n"], "interrupted", {"val_mean_rank": None, "reason": "the loop stopped during the run"},
                   False, e.get("commit"), e.get("description", ""))
        print(f"loop: experiment {e['n']} was in flight when the loop stopped: recorded as interrupted",
              file=sys.stderr)
    journal.rebuild_results(ws.results_path, journal.read(ws.journal_path))


def run_one(ws: Workspace, args, n: int, kind: str, commit: str, description: str, extra: dict) -> dict:
    journal.append(ws.journal_path, {"event": "start", "n": n, "time": time.time(), "kind": kind,
                                     "commit": commit, "description": description,
                                     "hparams": read_hparams(ws.recipe.read_text()), **extra})
    out = ws.experiments / str(n)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diff.patch").write_text(extra.get("diff", ""))
    return run_experiment(ws.recipe, args.data.resolve(), args.budget_s, out, device=args.device,
                          compile_cache=ws.root / ".compile_cache", timeout_s=args.timeout_s)


def step(ws: Workspace, args, proposer: SearchProposer, root_commit: str) -> bool:
    """One baseline run or one experiment. Returns False when there is nothing left to do."""
    exps = journal.experiments(journal.read(ws.journal_path))
    st = state(exps, root_commit, args.min_delta)
    n = st["next_n"]
    if st["baselines"] < args.noise_runs:
        if st["baseline_attempts"] >= 2 * args.noise_runs:
            raise SystemExit("loop: error: the baseline recipe keeps failing; see experiments/*/run.log")
        ws.reset(root_commit)
        r = run_one(ws, args, n, "baseline", root_commit, "baseline", {})
        record_end(ws, n, outcome("baseline", r, st)[0], r, False, root_commit, "baseline")
        return True
    if st["experiments"] >= args.max_experiments:
        return False
    ws.reset(st["best_commit"])
    source = ws.recipe.read_text()
    history = [{"hparams": e.get("hparams") or {}, "val_mean_rank": e.get("val_mean_rank"),
                "status": e.get("status"), "kept": bool(e.get("kept"))} for e in exps if e.get("hparams")]
    try:
        prop = proposer.propose(source, history)
    except RuntimeError as e:  # the search space is exhausted: nothing new to try
        print(f"loop: stopping: {e}", file=sys.stderr)
        return False
    info = {"hypothesis": prop.hypothesis, "changes": {k: list(v) for k, v in prop.changes.items()},
            "search_step": prop.step}
    violations = check_source(prop.source)
    if prop.source == source or violations:  # recorded, never committed or run
        journal.append(ws.journal_path, {"event": "start", "n": n, "time": time.time(), "kind": "experiment",
                                         "commit": None, "description": prop.description, **info})
        reason = [f"recipe.py:{v.line}: {v.message}" for v in violations]
        record_end(ws, n, "rejected" if violations else "no-op", {"val_mean_rank": None, "reason": reason},
                   False, None, prop.description)
        return True
    ws.recipe.write_text(prop.source)
    commit = ws.commit(f"experiment {n}: {prop.description}")
    info["diff"] = ws.diff(st["best_commit"])
    r = run_one(ws, args, n, "experiment", commit, prop.description, info)
    status, kept = outcome("experiment", r, st)
    record_end(ws, n, status, r, kept, commit, prop.description)
    if not kept:
        ws.reset(st["best_commit"])
    print(f"loop: #{n} {status:<9} val_mean_rank {r.get('val_mean_rank')} (best {st['best']:.2f}, "
          f"noise floor {st['threshold']:.2f})  {prop.description}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.noise_runs < 1:
        print("loop: error: --noise-runs must be at least 1 (the baseline defines the first best)", file=sys.stderr)
        return 2
    if not (args.data / "manifest.json").exists():
        if args.data != DEFAULT_DATA:
            print(f"loop: error: {args.data}: no prepared cache (run python -m eclip.prepare)", file=sys.stderr)
            return 2
        subprocess.run([sys.executable, "-m", "eclip.prepare", "--dataset", "synthetic", "--out", str(args.data)],
                       check=True)
    ws = Workspace.open_or_create(args.workspace_root / args.tag, TEMPLATE)
    root_commit = ws.git("rev-list", "--max-parents=0", "HEAD").splitlines()[0]
    reconcile(ws, root_commit, args.min_delta)
    # what this session runs with: `agent.report --final` retrains the best on the same data
    journal.append(ws.journal_path, {"event": "session", "time": time.time(), "proposer": args.proposer,
                                     "data": str(args.data.resolve()), "budget_s": args.budget_s,
                                     "device": args.device, "seed": args.seed, "min_delta": args.min_delta})
    exps = journal.experiments(journal.read(ws.journal_path))
    proposer = SearchProposer(seed=args.seed + len(exps))
    t0 = time.time()
    code = 0
    try:
        while args.max_hours is None or time.time() - t0 < args.max_hours * 3600:
            if not step(ws, args, proposer, root_commit):
                break
    except KeyboardInterrupt:
        print("loop: interrupted; recording and returning to the best commit", file=sys.stderr)
        reconcile(ws, root_commit, args.min_delta)
        code = 130
    finally:
        st = state(journal.experiments(journal.read(ws.journal_path)), root_commit, args.min_delta)
        ws.reset(st["best_commit"])
        try:
            from agent.report import plot_progress

            plot_progress(ws)
        except Exception as e:  # a plot must never cost the journal
            print(f"loop: progress plot not drawn ({e})", file=sys.stderr)
    print(f"---\nworkspace:      {ws.root}\nbest_commit:    {st['best_commit'][:7]}\n"
          f"best_mean_rank: {'none' if st['best'] is None else round(st['best'], 2)}\nnoise_floor:    {st['threshold']:.3f}\n"
          f"experiments:    {st['experiments']}\nresults:        {ws.results_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
