"""The append-only journal (``journal.jsonl``) and the results table (``results.tsv``).

One JSON object per line, flushed and fsynced per event, so a kill at any moment loses at
most the line being written; a torn last line is skipped on reading (and reported), never
rewritten. Events: ``session`` (a start of the loop and its settings), ``usage`` (one API reply
of a proposal under way: tokens and cost), ``start`` (an experiment is committed and about to
run, or an unrun proposal is recorded), ``end`` (its outcome) and ``final`` (the held-out
evaluation); an experiment with a start and no end was in flight when the loop died, and
usage with no start is a proposal the loop died in.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from pathlib import Path

from agent.runlog import redact_value
from agent.workspace import WorkspaceError
from eclip.fileio import atomic_write

COLUMNS = ("commit", "val_mean_rank", "memory_gb", "samples_per_s", "status", "description")


def _ends_torn(path: Path) -> bool:
    """True when the file's last line lacks its newline (a kill during a write)."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except (FileNotFoundError, OSError):  # missing or empty
        return False


def append(path: Path, event: dict) -> None:
    """Add ``event`` as one line, fsynced; refused (ValueError) when ``read`` could not take
    it back. The values of secret-looking environment variables are replaced first: a
    model's reply, a run's reason, may echo a key."""
    line = json.dumps(redact_value(event), default=str)
    # a line read() would skip: the loop's own error, said now (the line is ASCII: json's escapes)
    if problem := _problem(json.loads(line), line.encode()):
        raise ValueError(f"{path}: refusing to journal a line that could not be read back ({problem})")
    torn = _ends_torn(path)
    with open(path, "a", encoding="utf-8") as f:
        # A torn last line keeps its own line (and is skipped on reading) instead of
        # swallowing this event.
        f.write(("\n" if torn else "") + line + "\n")
        f.flush()
        os.fsync(f.fileno())


_WARNED: set[tuple[str, int]] = set()  # (path, line) already reported: read() runs many times a session


NUMBER = "a finite number"
ANY_NUMBER = "a number"  # a run's own figures: formatted, never compared (a NaN loss is a figure too)
# The fields the loop and the report read, and what each must be when present and not null
# (a line edited by hand with another type would otherwise decide wrongly, "kept": "false"
# being true, or end in a traceback); the result's own numeric fields are checked too.
FIELDS = {"n": "an experiment number", "time": NUMBER, "val_mean_rank": NUMBER, "test_mean_rank": NUMBER,
          "cost_usd": NUMBER, "budget_s": NUMBER, "min_delta": NUMBER, "seed": "an integer", "kept": "true or false",
          "isolate": "true or false", "kind": "a string", "commit": "a string", "description": "a string",
          "status": "a string", "data": "a string", "out": "a string", "proposer": "a string", "device": "a string",
          "data_fingerprint": "a string", "result": "an object", "usage": "an object", "hparams": "an object",
          "unrun": "an object"}
RESULT_NUMBERS = ("val_mean_rank", "peak_memory_gb", "samples_per_s", "checkpoint_bytes", "duration_s", "train_s")
SCORED_STATUSES = ("baseline", "keep", "discard")  # the outcomes of a run that scored
REQUIRED = {"end": ("n",), "start": ("n",), "final": ("commit", "status")}  # what an event is nothing without
FINAL_OK = ("test_mean_rank", "description", "budget_s")  # what an ok final's figures are printed from


def fits(value, kind: str) -> bool:
    """Whether ``value`` is of ``kind`` (a FIELDS description)."""
    if kind in (NUMBER, ANY_NUMBER):
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and (kind == ANY_NUMBER or math.isfinite(value)))
    if kind in ("an experiment number", "an integer"):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"true or false": bool, "a string": str, "an object": dict}[kind])


# how a lone surrogate is written in a JSON line (an escape: UTF-8 cannot hold one raw)
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _problem(event, line: bytes) -> str | None:
    """Why a decoded line is not a usable event (None when it is), naming the field. ``line``:
    the event's JSON text, scanned before a lone surrogate is looked for in the event."""
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return "not an event object"
    for key in REQUIRED.get(event["event"], ()):
        if event.get(key) is None:
            return f"a {event['event']} line without {key}"
    for key, kind in FIELDS.items():
        value = event.get(key)
        if value is not None and not fits(value, kind):
            return f"{key} is {value!r}, not {kind}"
    for key in RESULT_NUMBERS:
        value = (event.get("result") or {}).get(key)
        if value is not None and not fits(value, ANY_NUMBER):
            return f"result.{key} is {value!r}, not {ANY_NUMBER}"
    for key, value in (event.get("usage") or {}).items():  # token counts, summed by the report
        if not fits(value, NUMBER):
            return f"usage.{key} is {value!r}, not {NUMBER}"
    if event["event"] == "end" and event.get("status") in SCORED_STATUSES and event.get("val_mean_rank") is None:
        return f"a {event['status']} line without val_mean_rank"  # what the best and the noise floor are made of
    if event["event"] == "final" and event.get("status") == "ok":  # a recorded test score is read whole
        for key in FINAL_OK:
            if event.get(key) is None:
                return f"an ok final line without {key}"
    if SURROGATE_ESCAPE.search(line):  # an emoji's pair, or a lone one: valid JSON but no text, which
        try:                           # results.tsv and the report fail on (most lines skip this)
            json.dumps(event, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            return f"text that is not UTF-8 ({e.object[e.start:e.end]!r})"
    return None


def read(path: Path) -> list[dict]:
    """The journal's events in order. A line that cannot be used is skipped with one warning
    naming it: the last line torn by a kill mid-write, or damage anywhere else."""
    if not path.exists():
        return []
    events = []
    try:
        lines = path.read_bytes().splitlines()  # decoded line by line: one damaged line is not the journal
    except OSError as e:  # a folder in its place, no permission
        raise WorkspaceError(f"{path}: cannot read the journal ({e.strerror or e})") from None
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line.decode("utf-8"))
            problem = _problem(event, line)
        except UnicodeDecodeError:  # a line edited in another encoding
            event, problem = None, "not UTF-8 text"
        except json.JSONDecodeError:
            event, problem = None, ("torn line (the loop was killed mid-write)" if lineno == last
                                    else "not JSON")
        if problem is None:
            events.append(event)
        elif (str(path), lineno) not in _WARNED:
            _WARNED.add((str(path), lineno))
            print(f"journal: {path}:{lineno}: {problem}; line skipped", file=sys.stderr)
    return events


def experiments(events: list[dict]) -> list[dict]:
    """One dict per experiment number: its start merged with its end (if any)."""
    by_n: dict[int, dict] = {}
    for e in events:
        n = e.get("n")
        if n is None:
            continue
        rec = by_n.setdefault(n, {"n": n})
        if e["event"] == "start":
            rec.update(e, ended=rec.get("ended", False))
        elif e["event"] == "end":
            rec.update({k: v for k, v in e.items() if k not in ("event", "time")}, ended=True)
        elif e["event"] == "usage":  # one API reply of the proposal (the record of spending)
            rec["api_cost_usd"] = rec.get("api_cost_usd", 0.0) + float(e.get("cost_usd") or 0.0)
            total = rec.setdefault("api_usage", {})
            for k, v in (e.get("usage") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
    for rec in by_n.values():  # an end line written before end lines said their kind, its start line lost
        if rec.get("ended") and "kind" not in rec and rec.get("status") in SCORED_STATUSES:
            rec["kind"] = "baseline" if rec["status"] == "baseline" else "experiment"
    return [by_n[n] for n in sorted(by_n)]


def spent_usd(events: list[dict]) -> float:
    """API spending: the sum over ``usage`` events (one per reply, journaled as it arrives)."""
    return sum(float(e.get("cost_usd") or 0.0) for e in events if e.get("event") == "usage")


def running_best(exps: list[dict]) -> list[tuple[int, float]]:
    """(n, best score so far) from the first scored baseline on, by the loop's rule: the mean
    of the baseline runs is the first best, then each kept experiment replaces it."""
    base: list[float] = []
    best, out = None, []
    for e in exps:
        if e.get("status") == "baseline" and e.get("val_mean_rank") is not None:
            base.append(e["val_mean_rank"])
            best = sum(base) / len(base)
        elif e.get("kept"):
            best = e["val_mean_rank"]
        if best is not None:
            out.append((e["n"], best))
    return out


def noise_floor(exps: list[dict], min_delta: float = 0.0) -> tuple[float, float]:
    """(σ of the scored baseline runs, the keep threshold ``max(min_delta, 2σ)``): a change
    is kept only if it beats the best by more than the threshold."""
    base = [e["val_mean_rank"] for e in exps if e.get("status") == "baseline" and e.get("val_mean_rank") is not None]
    sigma = statistics.stdev(base) if len(base) >= 2 else 0.0
    return sigma, max(min_delta or 0.0, 2 * sigma)


# Baselines run the same recipe on the same data: their training throughput differs only
# when something else shares the machine, and a budget-limited run's score moves with it
CONTENDED_SPREAD = 1.2  # fastest over slowest baseline's steady samples/s past which the loop warns


def steady_rate(result: dict) -> float | None:
    """Samples a second after the first step: a run's throughput without its compilation,
    which a cold compile cache makes the first run's alone; None when a figure is missing.
    ``train_s`` counts the recipe's setup too (``setup_s``: its import, ``build_model``,
    ``build_optimizer``), ``warmup_s`` the first step alone: both come off."""
    try:
        samples, steps = float(result["samples"]), int(result["steps"])
        seconds = float(result["train_s"]) - float(result["warmup_s"]) - float(result.get("setup_s") or 0.0)
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(inf) steps
        return None
    if steps < 2 or not (seconds > 0 and math.isfinite(seconds)):
        return None
    return samples * (steps - 1) / steps / seconds


def throughput_spread(exps: list[dict]) -> float | None:
    """Fastest over slowest steady throughput (``steady_rate``) of the scored baselines on
    the last one's device (a study resumed on another machine has baselines of both), or
    None with fewer than two that report one."""
    base = [e.get("result") or {} for e in exps if e.get("status") == "baseline"]
    device = base[-1].get("device") if base else None
    rates = [rate for r in base if r.get("device") == device and (rate := steady_rate(r))]
    return max(rates) / min(rates) if len(rates) >= 2 else None


def result_row(exp: dict) -> dict:
    """The results.tsv row of one ended experiment (as merged by ``experiments``)."""
    r = exp.get("result") or {}
    return {"commit": (exp.get("commit") or "-")[:7], "val_mean_rank": exp.get("val_mean_rank"),
            "memory_gb": r.get("peak_memory_gb"), "samples_per_s": r.get("samples_per_s"),
            "status": exp.get("status"), "description": exp.get("description", "")}


def last_session(events: list[dict]) -> dict:
    """The newest ``session`` event (its settings), or {} before the first session."""
    return next((e for e in reversed(events) if e.get("event") == "session"), {})


def rebuild_results(path: Path, events: list[dict]) -> None:
    """Rewrite results.tsv from the journal (the record of truth), atomically: a kill
    between the journal line and the table row can neither lose nor duplicate a row."""
    rows = [result_row(exp) for exp in experiments(events) if exp.get("ended")]
    if rows or path.exists():  # no rows: a table left of other runs would take the next row after its own
        table = "\t".join(COLUMNS) + "\n" + "".join(_tsv_line(row) for row in rows)
        atomic_write(path, lambda tmp: tmp.write_text(table, encoding="utf-8"))


def _number(v: float) -> str:
    """Four significant digits, but whole numbers from 1,000 up: a GPU's 23,456 samples/s
    reads as 23456, not 2.346e+04."""
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _tsv_line(row: dict) -> str:
    """One row; tabs and line breaks in a value (a proposer's description, an error text)
    become spaces, so a row is always one line of len(COLUMNS) fields."""
    vals = []
    for c in COLUMNS:
        v = row.get(c)
        vals.append("" if v is None else _number(v) if isinstance(v, float) else " ".join(str(v).split()))
    return "\t".join(vals) + "\n"


def add_result_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write("\t".join(COLUMNS) + "\n")
        f.write(_tsv_line(row))
        f.flush()
        os.fsync(f.fileno())
