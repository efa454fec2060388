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
import dataclasses
import errno
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent import disk, journal
from agent.claude import DEFAULT_MODEL, MAX_TOKENS, ClaudeConfig, ClaudeProposer, ProposerStop
from agent.records import (
    fix_target,
    outcome,
    reconcile,
    record_end,
    record_unrun,
    state,
    with_checkpoint_size,
)
from agent.runlog import redact, redact_value
from agent.runner import (
    clean_env,
    data_fingerprint,
    device_error,
    other_fingerprint,
    protect_secrets,
    run_experiment,
    seconds_error,
)
from agent.search import SearchExhausted, SearchProposer, read_hparams
from agent.workspace import Workspace, WorkspaceError, locked
from eclip import sandbox
from eclip.errors import DefaultsFormatter, OneLineParser, first_line
from eclip.hardware import runs_on_cpu
from eclip.policy import check_source
from eclip.process import exit_main, sigterm_as_ctrl_c

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "eclip" / "recipe.py"
DEFAULT_DATA = Path("data/synthetic")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m agent.loop", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsFormatter)
    p.add_argument("--tag", default="default", help="workspace name: runs/<tag>/")
    p.add_argument("--proposer", choices=["search", "claude"], default="search",
                   help="who proposes edits: the offline search, or Claude (needs ANTHROPIC_API_KEY; never chosen "
                        "by the key alone)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prepared cache (built-in data is prepared if missing)")
    p.add_argument("--budget-s", type=float, default=45.0, help="training budget per experiment")
    p.add_argument("--max-experiments", type=int, default=5,
                   help="experiments after the baselines, in the whole study (interrupted ones do not count)")
    p.add_argument("--max-hours", type=float, help="stop starting experiments after this long")
    p.add_argument("--workspace-root", type=Path, default=Path("runs"), help="where workspaces live")
    p.add_argument("--noise-runs", type=int, default=3, help="baseline repeats for the noise floor")
    p.add_argument("--min-delta", type=float, default=0.0, help="smallest improvement worth keeping")
    p.add_argument("--device", default="auto", help="device for the runs")
    p.add_argument("--seed", type=int, default=0, help="proposer seed")
    p.add_argument("--isolate", nargs="?", const="on", default="auto", choices=ISOLATE_MODES,
                   help="run each recipe in a sandbox that cannot read the cache (Linux user namespaces; the "
                        "harness's --isolate), since the recipe check can be evaded: on (a bare --isolate) requires "
                        "it, off runs without, auto uses it for CPU runs where the machine can build one (on a GPU "
                        "it is not verified yet)")
    p.add_argument("--timeout-s", type=float, help="hard limit per run (default: budget × 1.5 + 120 s)")
    p.add_argument("--keep-checkpoints", choices=disk.POLICIES, default="kept",
                   help="whose checkpoints stay in experiments/<n>/ once a run ends: the baselines' and kept "
                        "experiments' (kept), the current best's only (best), every run's (all) or none; applied to "
                        "earlier runs too when a study resumes")
    c = p.add_argument_group("claude proposer")
    c.add_argument("--model", default=DEFAULT_MODEL, help="Messages API model id")
    c.add_argument("--max-turns", type=int, default=12, help="model replies per proposal")
    c.add_argument("--max-tokens", type=int, default=8192,
                   help="output tokens per reply (thinking included); a tool call cut off by it is not carried out")
    c.add_argument("--max-cost-usd", type=float, default=5.0,
                   help="stop cleanly once the workspace's API spending (all sessions) reaches this")
    c.add_argument("--fix-attempts", type=int, default=2,
                   help="consecutive proposals that may repair a crashed experiment instead of the best recipe")
    c.add_argument("--api-pause-s", type=float, default=30.0,
                   help="pause before retrying after the SDK's own retries gave up (doubles each time)")
    return p


def hparams_or_none(source: str) -> dict | None:
    """The recipe's HPARAMS, or None when an edit made it non-literal (the run still goes ahead)."""
    try:
        return read_hparams(source)
    except ValueError:
        return None


def run_one(ws: Workspace, args, n: int, kind: str, commit: str, description: str, extra: dict) -> dict:
    journal.append(ws.journal_path, {"event": "start", "n": n, "time": time.time(), "kind": kind,
                                     "commit": commit, "description": description,
                                     "hparams": hparams_or_none(ws.recipe.read_text()), **extra})
    out = ws.experiments / str(n)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diff.patch").write_text(extra.get("diff", ""))
    r = run_experiment(ws.recipe, args.data, args.budget_s, out, device=args.device,
                       compile_cache=ws.root / ".compile_cache", timeout_s=args.timeout_s, isolate=args.isolate)
    if r.get("status") != "ok":
        r = out_of_space(ws, r)
    return with_checkpoint_size(r, out)


def out_of_space(ws: Workspace, r: dict) -> dict:
    """A failed run's result, ``interrupted`` with ``out_of_space`` (the reason to stop) when
    it met a full disk: the harness said so (``disk_full``), or the run's log did and a disk
    is still short of room (``disk.still_full``), or the workspace's disk is so full that the
    log could say nothing (``disk.nearly_full``). A log that says so with room on the disks
    stays the recipe's failure, the words noted."""
    said_full = r.get("disk_full") is True or disk.ran_out_of_space(r)
    if said_full:
        why = disk.still_full(ws.root, journal.experiments(journal.read(ws.journal_path)))
        if why is None and r.get("disk_full") is True:  # a write of the harness's own: room again since
            why = f"the harness could not write ({r.get('reason')}); free some space"
    else:
        why = disk.nearly_full(ws.root)
    if why is None:
        if said_full:  # room everywhere now: the recipe's own doing, or only its words
            r = dict(r, reason=(f"{r['reason']}; " if r.get("reason") else "")
                     + f"its log says {disk.ENOSPC_TEXT!r}, yet the disks have room now")
        return r
    said = (r.get("reason") or f"the run's log: {disk.ENOSPC_TEXT}") if said_full else \
        f"{r.get('status')}: {r.get('reason') or 'no reason given'}; {why}"
    return dict(r, status="interrupted", out_of_space=why, reason=f"out of disk space ({said})")


def after_run(ws: Workspace, args, r: dict) -> None:
    """Apply the checkpoint rule to every ended run; stop the loop if this run met a full disk."""
    disk.prune(ws.experiments, journal.experiments(journal.read(ws.journal_path)), args.keep_checkpoints)
    if r.get("out_of_space"):
        raise disk.OutOfSpace(f"a run ran out of disk space: {r['out_of_space']}")


def print_run(n: int, status: str, r: dict, tail: str) -> None:
    """The line a finished run gets on stdout: number, outcome, score, then ``tail``."""
    rank = r.get("val_mean_rank")
    print(f"loop: #{n} {status:<9} val_mean_rank {'none' if rank is None else f'{rank:.2f}'} {tail}", flush=True)


def warn_contended(exps: list[dict]) -> None:
    """Say so when the baselines trained at different speeds: the machine was shared, and
    the noise floor (and any later comparison) measures that too."""
    spread = journal.throughput_spread(exps)
    if spread is not None and spread > journal.CONTENDED_SPREAD:
        print(f"loop: warning: the baselines trained at speeds {spread:.2f}x apart (samples/s): other work on the "
              "machine? Within a time budget that moves the scores; the noise floor includes it", file=sys.stderr)


def session_runs(events: list[dict]) -> set[int]:
    """The numbers of the runs started since the journal's last ``session`` line."""
    last = max((i for i, e in enumerate(events) if e.get("event") == "session"), default=-1)
    return {e["n"] for e in events[last + 1:] if e.get("event") == "start" and "n" in e}


def stop_on_os_error(e: OSError, root: Path) -> None:
    """Say in one line why the loop stops on ``e``, raised by one of its own reads or writes:
    a full disk, or another error of the file system (a folder where a file belongs, a
    read-only mount); the journal is left as it was, for a resume."""
    if isinstance(e, BrokenPipeError):  # the reader of the output went away (| head): exit_main's, quietly
        raise e
    where = e.filename or root
    if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a quota's limit is a full disk too, as the harness counts it
        print(f"loop: stopping: {where}: {e.strerror}; free some space, then resume", file=sys.stderr)
    else:
        print(f"loop: error: {where}: {e.strerror or e}; mend it, then resume", file=sys.stderr)


def next_number(ws: Workspace, st: dict) -> int:
    """The next experiment's number: past the journal's and past every run folder, so a
    journal whose last lines were lost or cut by hand never has a run written over another's."""
    try:
        folders = [int(d.name) for d in ws.experiments.iterdir() if d.name.isdigit()]
    except FileNotFoundError:
        folders = []
    return max(st["next_n"], max(folders, default=0) + 1)


def step(ws: Workspace, args, proposer: SearchProposer, root_commit: str) -> bool:
    """One baseline run or one experiment. Returns False when there is nothing left to do."""
    events = journal.read(ws.journal_path)
    exps = journal.experiments(events)
    st = state(exps, root_commit, args.min_delta)
    n = next_number(ws, st)
    # the noise floor is fixed once experiments begin: a later baseline would move the best
    # score away from the best commit's
    if st["baselines"] < args.noise_runs and not st["experiments"]:
        # Failures of this session only: an earlier one's may have had a bad option (a device
        # it lacked), and counting them would refuse the workspace for good. A baseline cut
        # short (Ctrl-C, a scheduler's stop, a full disk) says nothing of the recipe.
        mine = session_runs(events)
        failed = sum(e.get("kind") == "baseline" and e.get("status") not in ("baseline", "interrupted")
                     and e["n"] in mine for e in exps)
        if failed >= 2 * args.noise_runs:
            raise SystemExit(f"loop: error: the baseline recipe failed {failed} times this session; see "
                             "experiments/*/run.log")
        if why := disk.space_error(ws.root, exps):
            raise disk.OutOfSpace(why)
        ws.reset(root_commit)
        r = run_one(ws, args, n, "baseline", root_commit, "baseline", {})
        status = outcome("baseline", r, st)[0]
        record_end(ws, n, status, r, False, root_commit, "baseline", "baseline")
        # a line a run, baselines too: their minutes are not silent
        print_run(n, status, r, f"(baseline {st['baselines'] + (status == 'baseline')} of {args.noise_runs}, "
                                "for the noise floor)")
        if status == "baseline" and st["baselines"] + 1 == args.noise_runs:
            warn_contended(journal.experiments(journal.read(ws.journal_path)))
        after_run(ws, args, r)
        return True
    if st["counted"] >= args.max_experiments:
        print(f"loop: stopping: --max-experiments {args.max_experiments} reached (interrupted runs do not count)",
              file=sys.stderr)
        return False
    spent = journal.spent_usd(events)
    if args.proposer == "claude" and spent >= args.max_cost_usd:
        print(f"loop: stopping: API spending ${spent:.2f} reached --max-cost-usd {args.max_cost_usd:g}", file=sys.stderr)
        return False
    if why := disk.space_error(ws.root, exps):
        raise disk.OutOfSpace(why)  # before a proposal is paid for
    ws.reset(st["best_commit"])
    fix = fix_target(exps, args.fix_attempts) if args.proposer == "claude" else None
    if fix is not None:  # repair the failed version instead of proposing from the best
        ws.recipe.write_text(ws.show(fix["commit"]), encoding="utf-8")
    source = ws.recipe.read_text()
    history = [{"hparams": e.get("hparams") or {}, "val_mean_rank": e.get("val_mean_rank"),
                "status": e.get("status"), "kept": bool(e.get("kept"))} for e in exps if e.get("hparams")]
    context = {"workspace": ws.root, "program": (ws.root / "program.md").read_text(), "experiments": exps,
               "state": st, "session": {"budget_s": args.budget_s, "device": args.device},
               "budget_usd": args.max_cost_usd - spent, "fix": fix,
               "on_usage": lambda usage, cost: journal.append(ws.journal_path, {
                   "event": "usage", "n": n, "time": time.time(), "usage": usage, "cost_usd": cost})}
    try:
        prop = proposer.propose(source, history, context=context)
    except SearchExhausted as e:  # nothing new to try
        print(f"loop: stopping: {e}", file=sys.stderr)
        return False
    except (Exception, KeyboardInterrupt) as e:  # record the cut-off proposal (its spending is journaled), stop
        usage = getattr(proposer, "pending_usage", None)
        why = (str(e) if isinstance(e, ProposerStop) else "interrupted during the proposal"
               if isinstance(e, KeyboardInterrupt) else f"the proposer failed: {type(e).__name__}: {str(e)[:200]}")
        if usage is not None and usage.calls:
            extra = {"usage": usage.to_dict(), "cost_usd": usage.cost_usd(args.model), "model": args.model}
            # interrupted, as reconcile records one a kill cut off: nothing was tried, so it
            # counts as no experiment (--max-experiments) and leaves a pending fix pending
            record_unrun(ws, n, f"no-op: {why}", extra, "interrupted", [why])
        if isinstance(e, (ProposerStop, KeyboardInterrupt)):
            raise
        raise ProposerStop(why) from e
    # a model may echo a key it was shown (a pasted program.md): from here on, written nowhere
    prop = dataclasses.replace(prop, description=redact(prop.description), hypothesis=redact(prop.hypothesis),
                               extra=redact_value(prop.extra), transcript=redact_value(prop.transcript))
    info = {"hypothesis": prop.hypothesis, "changes": {k: list(v) for k, v in prop.changes.items()},
            "search_step": prop.step, **prop.extra}
    if fix is not None:
        info["fix_of"] = fix["n"]
    if prop.transcript is not None:
        out = ws.experiments / str(n)
        out.mkdir(parents=True, exist_ok=True)
        (out / "transcript.json").write_text(json.dumps(prop.transcript, indent=1, default=str))
    violations = check_source(prop.source)
    if prop.source == source or violations:  # recorded, never committed or run
        reason = [v.format("recipe.py") for v in violations] or [prop.extra.get("reason") or "no edit"]
        record_unrun(ws, n, prop.description, info, "rejected" if violations else "no-op", reason)
        ws.reset(st["best_commit"])
        return True
    ws.recipe.write_text(prop.source)
    commit = ws.commit(f"experiment {n}: {prop.description}")
    info["diff"] = ws.diff(st["best_commit"])
    r = run_one(ws, args, n, "experiment", commit, prop.description, info)
    status, kept = outcome("experiment", r, st)
    record_end(ws, n, status, r, kept, commit, prop.description)
    if not kept:
        ws.reset(st["best_commit"])
    print_run(n, status, r, f"(best {st['best']:.2f}, noise floor {st['threshold']:.2f})  {prop.description}")
    after_run(ws, args, r)
    return True


TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def tag_error(tag: str) -> str | None:
    """Why ``--tag`` cannot name a workspace, or None: one plain folder name, so that no tag
    (``..``, an absolute path) lands on another git repository, which the loop would reset."""
    if TAG.fullmatch(tag):
        return None
    return (f"--tag {tag!r}: must be one folder name of letters, digits, '.', '_' and '-', not starting with "
            "'.' or '-'")


ISOLATE_MODES = ("auto", "on", "off")


@functools.cache
def _probe_once() -> str | None:
    """``sandbox.probe()`` once a process: the machine does not change between sessions."""
    return sandbox.probe()


def isolation(mode: str, device: str, data: Path) -> tuple[bool, str | None]:
    """Whether the runs go into the sandbox for ``--isolate mode``, and why not (None when
    they do, or when ``off`` says not to). ``on`` was checked as the loop began (refused
    there); ``auto`` isolates where the sandbox is verified: CPU runs, on a machine that can
    build one that would not show the cache ``data`` (a GPU run inside it has not been
    checked yet)."""
    if mode != "auto":
        return mode == "on", None
    if not runs_on_cpu(device):
        return False, "the sandbox is not yet verified on a GPU; --isolate on uses it there"
    why = _probe_once() or sandbox.hidden_problem([str(data.resolve())])
    return why is None, why


def check_args(args) -> str | None:
    """The first bad option, as its error message (None when all are usable). Checked before a
    workspace is touched: a bad budget would otherwise fail every baseline and the workspace
    would count those failures for good."""
    finite = math.isfinite
    checks = [
        None if args.noise_runs >= 1 else "--noise-runs must be at least 1 (the baseline defines the first best)",
        seconds_error("--budget-s", args.budget_s),
        seconds_error("--timeout-s", args.timeout_s),
        None if args.timeout_s is None or args.timeout_s > args.budget_s
        else f"--timeout-s {args.timeout_s:g}: must exceed --budget-s {args.budget_s:g} (a run also starts up and "
        "is scored; by default it gets budget × 1.5 + 120 s)",
        tag_error(args.tag),
        None if args.max_experiments >= 0 else f"--max-experiments {args.max_experiments}: must be 0 or more",
        None if args.max_hours is None or (finite(args.max_hours) and args.max_hours > 0)
        else f"--max-hours {args.max_hours}: must be a positive number of hours",
        None if finite(args.min_delta) and args.min_delta >= 0 else f"--min-delta {args.min_delta}: must be 0 or more",
        device_error(args.device, auto=True),
        None if args.max_turns >= 1 else f"--max-turns {args.max_turns}: must be at least 1",
        None if 1 <= args.max_tokens <= MAX_TOKENS else f"--max-tokens {args.max_tokens}: must lie in 1..{MAX_TOKENS} "
        "(longer replies need streaming, which the proposer does not use)",
        None if finite(args.max_cost_usd) and args.max_cost_usd > 0
        else f"--max-cost-usd {args.max_cost_usd}: must be a positive number of dollars",
        None if args.fix_attempts >= 0 else f"--fix-attempts {args.fix_attempts}: must be 0 or more",
        None if finite(args.api_pause_s) and args.api_pause_s >= 0
        else f"--api-pause-s {args.api_pause_s}: must be 0 or more seconds",
    ]
    return next((message for message in checks if message), None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if message := check_args(args):
        print(f"loop: error: {message}", file=sys.stderr)
        return 2
    if args.proposer == "claude" and not os.environ.get("ANTHROPIC_API_KEY"):
        print("loop: error: --proposer claude needs ANTHROPIC_API_KEY in the environment", file=sys.stderr)
        return 2
    root = args.workspace_root / args.tag
    try:  # before anything is written, the lock and the built-in dataset included (minutes)
        Workspace.check(root)
        events = journal.read(Workspace(root).journal_path)
    except WorkspaceError as e:
        print(f"loop: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be listed
        print(f"loop: error: {e.filename or root}: cannot read the workspace ({e.strerror or e})", file=sys.stderr)
        return 2
    if why := settings_error(args, events):
        print(f"loop: error: {why}", file=sys.stderr)  # asked again, locked, once the journal is reconciled
        return 2
    if args.isolate == "on" and (why := sandbox.probe()):  # not one run in: every run would fail the same way
        print(f"loop: error: --isolate: cannot build the sandbox on this machine: {why}", file=sys.stderr)
        return 2
    if args.isolate == "on" and (why := sandbox.hidden_problem([str(args.data.resolve())])):
        print(f"loop: error: --isolate: {why}", file=sys.stderr)
        return 2
    if not (args.data / "manifest.json").exists():
        if args.data != DEFAULT_DATA:
            print(f"loop: error: {args.data}: no prepared cache (run python -m eclip.prepare)", file=sys.stderr)
            return 2
        rc = subprocess.run([sys.executable, "-m", "eclip.prepare", "--dataset", "synthetic", "--out",
                             str(args.data)], env=clean_env()).returncode
        if rc:  # prepare's own one-line error is above (none when a signal ended it)
            how = f"exit code {rc}" if rc > 0 else f"killed by {signal.Signals(-rc).name}"
            print(f"loop: error: preparing the built-in dataset in {args.data} failed ({how})", file=sys.stderr)
            return rc if rc > 0 else 128 - rc
    try:
        with locked(root):  # one process a workspace, for the whole session
            ws = Workspace.open_or_create(root, TEMPLATE)
            try:
                return session(args, ws)
            except WorkspaceError as e:  # git failing mid-study (a stale .git/index.lock, say)
                print(f"loop: error: {e}", file=sys.stderr)
                return 1
    except WorkspaceError as e:  # in use by another process, or records that disagree
        print(f"loop: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # as the session begins (the journal's reconciling, its session line): a full disk, say
        stop_on_os_error(e, root)
        return 1


# what a score depends on beyond the recipe: the session line's key, and its option
STUDY_SETTINGS = {"data": "--data", "budget_s": "--budget-s", "device": "--device"}


def study_settings(events: list[dict]) -> dict | None:
    """The ``session`` line in effect when the study's first baseline was scored (None before
    one is): the settings every later score is compared under. ``{}`` when a baseline was
    scored under no session line the journal still holds (one damaged): settings unknown."""
    scored = {e["n"] for e in journal.experiments(events) if e.get("status") == "baseline"}
    current, first = None, None
    for e in events:
        if e.get("event") == "session":
            current = e
        # the first scored baseline's start line, or its end line should that one be damaged: a
        # run's two lines are written in one session (a recovered end comes before the next one's line)
        elif e.get("event") in ("start", "end") and e.get("n") in scored:
            first = e["n"] if first is None else first
            if e["n"] == first and current is not None:
                return current
    return {} if scored else None


def settings_error(args, events: list[dict]) -> str | None:
    """Why this session may not go on with the study: a score under another cache, budget or
    device would be compared with the best and the noise floor measured under the study's.
    The cache counts by path and by fingerprint: one rebuilt in place (other options, other
    images) is other data."""
    study = study_settings(events)
    if study is None:
        return None
    if not study:  # checking nothing would let this session's scores join the study's unchecked
        return (f"{args.workspace_root / args.tag}: the journal holds no readable session line from before the "
                "study's first baseline (damaged, or a journal older than those lines), so the --data, --budget-s "
                "and --device its scores were measured with are unknown and this session's cannot be checked "
                "against them: restore the line, or start a new --tag")
    asked = {"data": str(args.data.resolve()), "budget_s": args.budget_s, "device": args.device}
    differ = [k for k in STUDY_SETTINGS if k in study and study[k] != asked[k]]
    if not differ:
        if fp := other_fingerprint(args.data, study.get("data_fingerprint")):
            return (f"{args.data}: the cache was rebuilt since this study's scores were measured on it (its "
                    f"fingerprint is {fp[:12]}, the study's {study['data_fingerprint'][:12]}). Scores on other data "
                    "do not compare: restore the cache, or start a new --tag")
        return None
    was = " ".join(f"{STUDY_SETTINGS[k]} {study[k]}" for k in differ)  # as given: auto is the word, not a device
    now = " ".join(f"{STUDY_SETTINGS[k]} {asked[k]}" for k in differ)
    return (f"{args.workspace_root / args.tag}: this study's scores were measured with {was}; this session asks {now}. "
            f"Scores under other settings do not compare: resume with the study's, or start a new --tag")


def session(args, ws: Workspace) -> int:
    """The study in ``ws`` (locked): recover what the last session left, then run baselines and
    experiments until a limit; returns the exit code."""
    root_commit = ws.root_commit()
    reconcile(ws, root_commit, args.min_delta)
    events = journal.read(ws.journal_path)
    exps = journal.experiments(events)
    begun = state(exps, root_commit, args.min_delta)  # before the session line: a journal it can read
    if why := settings_error(args, events):
        print(f"loop: error: {why}", file=sys.stderr)
        return 2
    count, freed = disk.prune(ws.experiments, exps, args.keep_checkpoints)
    if count:  # a study begun under another rule (or before there was one)
        print(f"loop: deleted the checkpoints of {count} earlier runs ({freed / disk.GIB:.2f} GiB), as "
              f"--keep-checkpoints {args.keep_checkpoints} says", file=sys.stderr)
    isolate, why = isolation(args.isolate, args.device, args.data)
    if why:  # said once a session is sure to run, not ahead of an error that ends it
        print(f"loop: note: the runs are not isolated ({why}): code that evades the recipe check can read the "
              "cache's held-out pairs", file=sys.stderr)
    args.isolate = isolate  # what every run and the session line get: a bool
    # what this session runs with: `agent.report --final` retrains the best on the same data
    journal.append(ws.journal_path, {"event": "session", "time": time.time(), "proposer": args.proposer,
                                     "data": str(args.data.resolve()), "data_fingerprint": data_fingerprint(args.data),
                                     "budget_s": args.budget_s,
                                     "device": args.device, "seed": args.seed, "min_delta": args.min_delta,
                                     "isolate": args.isolate})
    if begun["experiments"] and begun["baselines"] < args.noise_runs:
        print(f"loop: note: --noise-runs {args.noise_runs} not applied: the noise floor was fixed by "
              f"{begun['baselines']} baseline run{'s' * (begun['baselines'] != 1)} when the experiments began",
              file=sys.stderr)
    if begun["experiments"] or begun["baselines"] >= args.noise_runs:  # a resumed study: restated, and said at
        warn_contended(exps)  # all when its last baseline was recovered from its result file, unannounced
    if args.noise_runs == 1 and not begun["baselines"] and not begun["experiments"]:  # once, as the study begins
        print("loop: note: --noise-runs 1 measures no noise: the floor is --min-delta alone "
              f"({args.min_delta:g}), so a change is kept on any gain above it", file=sys.stderr)
    if args.proposer == "claude":
        protect_secrets()
        proposer = ClaudeProposer(ClaudeConfig(model=args.model, max_turns=args.max_turns, max_tokens=args.max_tokens,
                                               api_pause_s=args.api_pause_s))
        if not proposer.price_known:
            print(f"loop: warning: no price known for {args.model}; costs use the dearest rates in agent/pricing.py",
                  file=sys.stderr)
        print(f"loop: claude proposer {args.model}; spent so far ${journal.spent_usd(journal.read(ws.journal_path)):.4f} of "
              f"${args.max_cost_usd:g}", file=sys.stderr)
    else:
        proposer = SearchProposer(seed=args.seed)  # the history enters each proposal's RNG
    t0 = time.time()
    code = 0
    with sigterm_as_ctrl_c():  # a scheduler's stop: as Ctrl-C
        try:
            while args.max_hours is None or time.time() - t0 < args.max_hours * 3600:
                if not step(ws, args, proposer, root_commit):
                    break
        except KeyboardInterrupt:
            print("loop: interrupted; recording and returning to the best commit", file=sys.stderr)
            reconcile(ws, root_commit, args.min_delta)
            code = 130
        except (ProposerStop, disk.OutOfSpace) as e:
            print(f"loop: stopping: {e}", file=sys.stderr)
            code = 1
        except OSError as e:  # the loop's own reads and writes (journal, diffs, results): a full disk, say
            stop_on_os_error(e, ws.root)
            code = 1
        finally:
            st = state(journal.experiments(journal.read(ws.journal_path)), root_commit, args.min_delta)
            ws.reset(st["best_commit"])
            try:
                from agent.report import plot_progress

                plot_progress(ws)
            except (Exception, KeyboardInterrupt) as e:  # a plot must never cost the journal, nor the summary
                print(f"loop: progress plot not drawn ({first_line(e, 200)})", file=sys.stderr)
    print(f"---\nworkspace:      {ws.root}\nbest_commit:    {st['best_commit'][:7]}\n"
          f"best_mean_rank: {'none' if st['best'] is None else round(st['best'], 2)}\nnoise_floor:    {st['threshold']:.3f}\n"
          f"experiments:    {st['experiments']}\ncheckpoints:    {disk.summary(ws.experiments)}\n"
          f"isolated:       {'yes' if args.isolate else 'no'}\nresults:        {ws.results_path}")
    return code


if __name__ == "__main__":
    exit_main(main)
