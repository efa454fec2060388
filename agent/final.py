"""The final evaluation of a research workspace: ``python -m agent.report runs/T --final``.

The loop chooses by the validation split, so its best score is optimistic: selected among
many noisy runs. The held-out test split answers the question once. The best commit's
recipe is retrained through the harness on train+val (``--final``) for the session's
budget and scored on the test split; the result is journaled as a ``final`` event. A
second call for the same best commit prints the recorded figures and trains nothing;
a call after the loop found a new best refuses without ``--force`` (each look at the test
split makes it less held-out). A final run that failed (crash, timeout) scored nothing
and may be retried; one killed after it finished is recovered from its ``result.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from agent import journal
from agent.runner import data_fingerprint, finished_result, other_fingerprint, run_experiment
from agent.workspace import Workspace, WorkspaceError


def recorded_final(events: list[dict], commit: str | None = None) -> dict | None:
    """The last successful final evaluation (of ``commit``, when given)."""
    return next((e for e in reversed(events) if e.get("event") == "final" and e.get("status") == "ok"
                 and (commit is None or e.get("commit") == commit)), None)


def best_of(ws: Workspace, events: list[dict]) -> tuple[str, dict | None, float | None]:
    """The best commit by the loop's rule, its experiment (None for the baseline) and its
    validation score (for the baseline: the mean of its runs)."""
    from agent.records import state  # the loop's own keeping rule, not a copy

    exps = journal.experiments(events)
    root = ws.root_commit()
    st = state(exps, root, 0.0)
    exp = next((e for e in reversed(exps) if e.get("kept") and e.get("commit") == st["best_commit"]), None)
    return st["best_commit"], exp, st["best"]


def final_evaluation(ws: Workspace, *, data: Path | None = None, budget_s: float | None = None,
                     device: str | None = None, timeout_s: float | None = None,
                     force: bool = False) -> tuple[dict, bool]:
    """(the final event, whether it was run now). Raises ValueError on a workspace that has
    nothing to evaluate, no data to train on, or (without ``force``) a test score already
    recorded for another commit."""
    events = journal.read(ws.journal_path)
    if not any(e.get("status") == "baseline" for e in journal.experiments(events)):
        raise ValueError(f"{ws.journal_path}: no scored baseline yet; nothing to evaluate")
    commit, exp, best = best_of(ws, events)
    done = recorded_final(events, commit)
    if done is not None:
        return done, False
    earlier = recorded_final(events)
    if earlier is not None and not force:
        raise ValueError(f"the test split was already scored for commit {earlier['commit'][:7]} (test_mean_rank "
                         f"{earlier['test_mean_rank']:.2f}); scoring it again for {commit[:7]} needs --force "
                         "(every look at the test split makes it less held-out)")
    out = ws.experiments / f"final-{commit[:7]}"
    started = next((e for e in reversed(events) if e.get("event") == "final-start" and e.get("commit") == commit),
                   None)
    r = _recovered(out, started)
    if r is None:
        session = journal.last_session(events)
        data = data or (Path(session["data"]) if session.get("data") else None)
        budget_s = budget_s or session.get("budget_s")
        if data is None or not (data / "manifest.json").exists():
            raise ValueError(f"{data}: no prepared cache (give --data)" if data else
                             f"{ws.journal_path}: no session records the data; give --data")
        if not budget_s:
            raise ValueError(f"{ws.journal_path}: no session records the budget; give --budget-s")
        if fp := other_fingerprint(data, session.get("data_fingerprint")):
            raise ValueError(f"{data}: not the cache this study was scored on (its fingerprint is {fp[:12]}, the "
                             f"study's {session['data_fingerprint'][:12]}); give the study's --data")
        if session.get("data_fingerprint") and data_fingerprint(data) is None:  # unknown is no match: one look only
            raise ValueError(f"{data}: its manifest records no fingerprint, so it cannot be told to be the cache "
                             f"this study was scored on ({session['data_fingerprint'][:12]}); give the study's --data")
        try:  # before the run's folder is made: a commit the history lost names itself
            ws.git("cat-file", "-e", f"{commit}^{{commit}}")
        except WorkspaceError:
            raise ValueError(f"commit {commit[:12]}, the best by the journal, is not in the history of {ws.root} "
                             "(a workspace whose git history was rewritten?)") from None
        text = ws.show(commit)
        out.mkdir(parents=True, exist_ok=True)
        recipe = out / "recipe.py"
        recipe.write_text(text, encoding="utf-8")
        started = {"event": "final-start", "time": time.time(), "commit": commit, "data": str(data),
                   "budget_s": float(budget_s), "out": str(out)}
        journal.append(ws.journal_path, started)  # a kill from here on is recovered from result.json
        from agent.loop import isolation  # (the loop imports this module's caller)

        run_device = device or session.get("device", "auto")
        # the held-out split is scored here once: as isolated as the session's runs were, and
        # isolated wherever the loop's default would have isolated them
        isolate = bool(session.get("isolate")) or isolation("auto", run_device, data)[0]
        try:
            r = run_experiment(recipe, data, float(budget_s), out, device=run_device,
                               compile_cache=ws.root / ".compile_cache", timeout_s=timeout_s, final=True,
                               isolate=isolate)
        except KeyboardInterrupt:  # journaled as such (it scored nothing: --final runs it again), then passed on
            _journal_final(ws, commit, exp, best, started, out, {"status": "interrupted", "val_mean_rank": None})
            raise
    return _journal_final(ws, commit, exp, best, started, out, r), True


def _journal_final(ws: Workspace, commit: str, exp: dict | None, best, started: dict, out: Path, r: dict) -> dict:
    event = {"event": "final", "time": time.time(), "commit": commit, "status": r.get("status", "crash"),
             "description": exp["description"] if exp else "baseline", "n": None,
             "val_mean_rank": best, "test_mean_rank": r.get("val_mean_rank"),
             "data": started["data"], "budget_s": started["budget_s"], "out": str(out),
             "result": {k: v for k, v in r.items() if k != "hparams"}}
    journal.append(ws.journal_path, event)
    return event


def _recovered(out: Path, started: dict | None) -> dict | None:
    """The test result of a final run that finished before its event was journaled; only
    a scored run counts (a failed one scored nothing and is simply run again)."""
    r = finished_result(out, started["time"]) if started is not None else None
    return dict(r, recovered=True) if r and r.get("eval_split") == "test" and r.get("status") == "ok" else None


def summary_lines(event: dict, ran: bool) -> list[str]:
    fmt = lambda v: "none" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["---", f"final_commit:   {event['commit'][:7]}", f"description:    {event['description']}",
             f"status:         {event['status']}", f"val_mean_rank:  {fmt(event['val_mean_rank'])}",
             f"test_mean_rank: {fmt(event['test_mean_rank'])}", "trained_on:     train+val",
             f"budget_s:       {event['budget_s']:g}",
             f"evaluated:      {'now' if ran else 'earlier (recorded; the test split is scored once)'}",
             f"isolated:       {'yes' if (event.get('result') or {}).get('isolated') else 'no'}"]
    metrics = (event.get("result") or {}).get("metrics") or {}
    for d in ("i2t", "t2i"):  # the harness's metric keys: {d}_mean_rank, {d}_r{k} as fractions
        for k in (1, 5, 10):
            if f"{d}_r{k}" in metrics:
                lines.append(f"{f'test_{d}_R@{k}:':<16}{100 * metrics[f'{d}_r{k}']:.1f}%")
    return lines
