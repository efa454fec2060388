"""What the research loop records of its runs and reads back from the journal: the keeping
rule (``state``: best, noise floor and counts; ``outcome``: a finished run's status), a
run's end (``record_end``: the journal's line and the results table's row), proposals that
never ran (``record_unrun``), the runs a stopped loop left open (``reconcile``), and the
failed experiment a fix is due for (``fix_target``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from agent import disk, journal
from agent.runner import finished_result
from agent.workspace import Workspace, WorkspaceError


def state(exps: list[dict], root_commit: str, min_delta: float) -> dict:
    """Best commit and score, noise floor and counts, from the journal alone: ``experiments``
    counts every experiment, ``counted`` those that count towards ``--max-experiments`` (an
    interrupted one is run again, in effect: it scored nothing, and not by the recipe's fault).
    WorkspaceError when a kept experiment's commit is recorded nowhere (a damaged journal)."""
    base = [e for e in exps if e.get("kind") == "baseline" and e.get("status") == "baseline"]
    sigma, threshold = journal.noise_floor(base, min_delta)
    kept = [e for e in exps if e.get("kept")]
    if kept and not kept[-1].get("commit"):
        raise WorkspaceError(f"experiment {kept[-1]['n']} was kept, but no journal line of it records its commit (its "
                             "start line is missing or damaged): the best recipe is unknown. Restore the line; the "
                             "workspace's git log names each experiment's commit")
    trail = journal.running_best(exps)
    best_commit, best = (kept[-1]["commit"] if kept else root_commit), (trail[-1][1] if trail else None)
    ran = [e for e in exps if e.get("kind") == "experiment"]
    return {"baselines": len(base), "experiments": len(ran),
            "counted": sum(e.get("status") != "interrupted" for e in ran), "sigma": sigma,
            "threshold": threshold, "best_commit": best_commit, "best": best,
            "next_n": max((e["n"] for e in exps), default=0) + 1}


def record_end(ws: Workspace, n: int, status: str, result: dict, kept: bool, commit: str | None,
               description: str, kind: str = "experiment") -> None:
    """The end line (it repeats the start line's kind, commit and description, so that an
    experiment whose start line was damaged keeps what the keeping rule reads) and the row."""
    journal.append(ws.journal_path, {"event": "end", "n": n, "time": time.time(), "status": status,
                                     "val_mean_rank": result.get("val_mean_rank"), "kept": kept,
                                     "kind": kind, "commit": commit, "description": description,
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
    if exp.get("commit") is None:
        return None
    return with_checkpoint_size(finished_result(ws.experiments / str(exp["n"]), exp.get("time", 0)),
                                ws.experiments / str(exp["n"]))


def with_checkpoint_size(result: dict | None, out: Path) -> dict | None:
    """``result`` plus the size of the checkpoint its run left (journaled: the free-space
    check sizes the next run by it, after pruning has removed the file)."""
    size = disk.checkpoint_bytes(out)
    return result if result is None or size is None else dict(result, checkpoint_bytes=size)


def reconcile(ws: Workspace, root_commit: str, min_delta: float) -> None:
    """An experiment that started and never ended: if its run had finished (the loop died
    before journaling it), record its real outcome; otherwise record it ``interrupted``."""
    open_runs = [e["n"] for e in journal.experiments(journal.read(ws.journal_path)) if not e.get("ended")]
    for n in open_runs:
        # read again: a run recovered just before (kept, say) is part of what the next is judged by
        exps = journal.experiments(journal.read(ws.journal_path))
        i, e = next((i, e) for i, e in enumerate(exps) if e["n"] == n)
        if "kind" not in e:  # API replies journaled, then the loop died before the proposal was recorded
            why = "the loop stopped during the proposal"
            record_unrun(ws, e["n"], f"no-op: {why}", {}, "interrupted", [why])
            print(f"loop: proposal {e['n']} was under way when the loop stopped: recorded as interrupted",
                  file=sys.stderr)
            continue
        if e.get("unrun"):  # died between the two lines of record_unrun: nothing ran, the outcome is known
            record_end(ws, e["n"], e["unrun"]["status"], {"val_mean_rank": None, "reason": e["unrun"]["reason"]},
                       False, None, e.get("description", ""))
            continue
        r = recovered_result(ws, e)
        if r is not None:
            status, kept = outcome(e.get("kind", "experiment"), r, state(exps[:i], root_commit, min_delta))
            record_end(ws, e["n"], status, dict(r, recovered=True), kept, e.get("commit"), e.get("description", ""),
                       e.get("kind", "experiment"))
            print(f"loop: experiment {e['n']} had finished when the loop stopped: recorded as {status}",
                  file=sys.stderr)
            continue
        record_end(ws, e["n"], "interrupted", {"val_mean_rank": None, "reason": "the loop stopped during the run"},
                   False, e.get("commit"), e.get("description", ""), e.get("kind", "experiment"))
        print(f"loop: experiment {e['n']} was in flight when the loop stopped: recorded as interrupted",
              file=sys.stderr)
    journal.rebuild_results(ws.results_path, journal.read(ws.journal_path))


def record_unrun(ws: Workspace, n: int, description: str, info: dict, status: str, reason: list) -> None:
    """A proposal that is recorded but never committed or run (no-op, rejected). Its start
    line carries the outcome too, for ``reconcile`` should the loop die before the end line."""
    journal.append(ws.journal_path, {"event": "start", "n": n, "time": time.time(), "kind": "experiment",
                                     "commit": None, "description": description, **info,
                                     "unrun": {"status": status, "reason": reason}})
    record_end(ws, n, status, {"val_mean_rank": None, "reason": reason}, False, None, description)


FIXABLE = ("crash", "diverged")


def fix_target(exps: list[dict], attempts: int) -> dict | None:
    """The last experiment, if it failed in a way a code change can repair and the chain of
    fix attempts leading to it is shorter than ``attempts``."""
    # an interrupted one tried nothing (a proposal cut off, a run stopped): the fix it may have been stays due
    done = [e for e in exps if e.get("kind") == "experiment" and e.get("ended") and e.get("status") != "interrupted"]
    if not done or done[-1].get("status") not in FIXABLE or done[-1].get("commit") is None:
        return None
    chain, by_n = 0, {e["n"]: e for e in exps}
    e = done[-1]
    while e is not None and e.get("fix_of") is not None and chain <= attempts:  # bounded: a journal edited
        chain += 1                                                               # into a cycle ends too
        e = by_n.get(e["fix_of"])
    return done[-1] if chain < attempts else None
