"""``python -m bench.guard``: save a benchmark baseline per device, or check a run against it.

    python -m bench.guard save               # run the suites, store bench/baselines/<device>.json
    python -m bench.guard check              # run the suites, compare with that baseline
    python -m bench.guard check --run R.json # compare an existing run instead of running

What is guarded: for every benchmark with a plain-PyTorch counterpart in its group, the
ratio of its median time to the counterpart's (both measured in the same run), which
survives a busy or throttled machine far better than raw times; the counterparts themselves
are not guarded, nor are references (``extra_info["reference"]``: plain + torch.compile,
whose ratio measures PyTorch, not this project). A ratio that is not a finite number counts
as a regression. A figure regresses when it exceeds the baseline's by more than
``--tolerance`` (a fraction from 0 to 1): by default 0.35 on a CPU (paired ratios on the
2-core CI machines moved by up to ±26% between identical runs) and 0.15 on a GPU; a ratio of
0 or less on either side counts as a regression too. A figure of the baseline that the run
lacks (a benchmark skipped, renamed or gone), or timed on other inputs under the same name
(``extra_info["workload"]``), fails the check too, unless the run is partial on purpose
(pytest arguments after ``--`` that select benchmarks: ``-k``, ``-m``, ``--deselect``,
``--ignore`` or a path; or ``--allow-missing``). A baseline measured on another device is
refused. ``save`` from a run that selects keeps the baseline's other figures (``save -- -k
loss`` updates the loss figures only), and refuses to replace a baseline with a run that
lacks some of its figures unless ``--allow-missing`` says so. Exit codes: 0 no regression, 1
a regression or a missing figure, 2 no baseline (said before any benchmark runs), a baseline
of another device, an unreadable file or entry, a failed or empty benchmark run, a save
that would drop figures, or no figure in common.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from eclip.fileio import atomic_write
from eclip.process import exit_main

ROOT = Path(__file__).resolve().parents[1]
BASELINES = Path(__file__).parent / "baselines"
TIMING = ["--benchmark-enable", "--benchmark-min-rounds=15", "--benchmark-max-time=1.0",
          "--benchmark-warmup=on", "-q", "-p", "no:cacheprovider"]


def slug(name: str) -> str:
    """A file name for a device: 'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3',
    'cpu (x86_64, 2 threads)' → 'cpu-x86-64-2-threads'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def current_device() -> str:
    import torch

    from eclip.hardware import device_name

    return device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def run_suites(out: Path, extra: list[str]) -> int:
    # the whole of bench/ unless paths are given: pytest runs the union (bench and
    # bench/bench_ranks.py is every suite, its time spent and the run still called partial)
    where = [] if path_args(extra) else ["bench"]
    cmd = [sys.executable, "-m", "pytest", *where, *TIMING, f"--benchmark-json={out}", *extra]
    print("running:", " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd, cwd=ROOT)


def load_run(path: Path, prog: str = "guard") -> dict:
    """A pytest-benchmark JSON; exits 2 with one line (``prog: error: ...``) when it cannot be one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(_fail(f"{path}: no such benchmark file", prog)) from None
    except json.JSONDecodeError as e:
        raise SystemExit(_fail(f"{path}: not a benchmark JSON ({e.msg} at line {e.lineno})", prog)) from None
    except UnicodeDecodeError:
        raise SystemExit(_fail(f"{path}: not a benchmark JSON (not UTF-8 text)", prog)) from None
    except OSError as e:  # a folder, no permission
        raise SystemExit(_fail(f"{path}: unreadable ({e.strerror or e})", prog)) from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise SystemExit(_fail(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' list)", prog))
    for i, b in enumerate(data["benchmarks"]):
        if why := _entry_problem(b):
            name = b.get("fullname") if isinstance(b, dict) and isinstance(b.get("fullname"), str) else f"#{i}"
            raise SystemExit(_fail(f"{path}: benchmark {name}: {why}", prog))
    return data


def _entry_problem(b) -> str | None:
    """What keeps a benchmark entry from being read (a traceback in the guard, once), or None."""
    if not isinstance(b, dict):
        return f"a {type(b).__name__}, not an object"
    if not isinstance(b.get("fullname"), str):
        return "no 'fullname' string"
    info = b.get("extra_info", {})
    if not isinstance(info, dict):
        return f"'extra_info' is a {type(info).__name__}, not an object"
    ratio = info.get("ratio_to_plain")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
        return f"'ratio_to_plain' is {ratio!r}, not a number"
    return None


def _readable(path: Path) -> dict | None:
    """The baseline at ``path`` for ``save`` to weigh, or None when there is none or it is
    unreadable (then nothing in it is worth keeping: said on stderr, and replaced)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"guard: warning: {path}: unreadable ({type(e).__name__}); replacing it", file=sys.stderr)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        print(f"guard: warning: {path}: not a pytest-benchmark JSON; replacing it", file=sys.stderr)
        return None
    if any(why := _entry_problem(b) for b in data["benchmarks"]):  # a save would read its entries
        print(f"guard: warning: {path}: an entry is unreadable ({why}); replacing it", file=sys.stderr)
        return None
    return data


def _other_device(baseline: Path, data: dict, device: str) -> str | None:
    """Why the baseline ``data`` does not serve a run on ``device`` (ratios move with the
    device), or None; a baseline that names no device is taken as this one's."""
    if data.get("device") in (None, device):
        return None
    return f"{baseline}: a baseline of {data['device']}, not of this run's device ({device})"


def _fail(msg: str, prog: str = "guard") -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


# pytest options whose value may follow as the next argument: that value is no test path
# (--basetemp /tmp, -o python_files=x.py, --rootdir .)
VALUE_OPTIONS = frozenset({
    "-p", "-o", "-c", "-n", "-W", "--override-ini", "--basetemp", "--rootdir", "--confcutdir", "--tb",
    "--maxfail", "--durations", "--durations-min", "--timeout", "--junitxml", "--junit-xml", "--log-file",
    "--log-level", "--log-cli-level", "--log-format", "--log-date-format", "--import-mode", "--capture", "--dist",
    "--maxprocesses", "-r", "--color", "--benchmark-precision", "--benchmark-confidence",
    "--benchmark-max-time", "--benchmark-min-time", "--benchmark-min-rounds", "--benchmark-timer",
    "--benchmark-calibration-precision", "--benchmark-warmup-iterations", "--benchmark-sort",
    "--benchmark-group-by", "--benchmark-columns", "--benchmark-name", "--benchmark-save",
    "--benchmark-compare-fail", "--benchmark-storage", "--benchmark-json", "--benchmark-histogram",
    "--benchmark-time-unit", "--benchmark-cprofile", "--benchmark-cprofile-loops", "--benchmark-cprofile-top",
    "--benchmark-cprofile-dump", "--benchmark-netrc",
})
NARROWING = ("-k", "-m", "--deselect", "--ignore", "--ignore-glob")  # options that drop benchmarks


def path_args(pytest_args: list[str]) -> list[str]:
    """The test paths and node ids among pytest arguments: positional ones that look like one
    (``…::…``, ``….py``, an existing folder), not an option's value (``--basetemp /tmp``). An
    option taking a value that VALUE_OPTIONS lacks leaves its value positional: the look of a
    path keeps ``--color yes`` from selecting."""
    out, skip = [], False
    for arg in pytest_args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = "=" not in arg and (arg in VALUE_OPTIONS or arg in NARROWING)
        elif "::" in arg or arg.split("::", 1)[0].endswith(".py") or (ROOT / arg).is_dir():
            out.append(arg)
    return out


def selects(pytest_args: list[str]) -> bool:
    """Whether pytest arguments select a subset of the benchmarks (a partial run on purpose):
    ``-k``, ``-m``, ``--deselect``, ``--ignore`` or a test path / node id, as opposed to ones
    that only change how the run goes or reports (``-v``, ``-x``, ``-p no:…``,
    ``--basetemp /tmp``, ``--benchmark-max-time 2``: an option's value is no test path)."""
    for arg in pytest_args:
        if arg.split("=", 1)[0] in NARROWING or (arg[:2] in ("-k", "-m") and len(arg) > 2):  # -kloss, --ignore=x
            return True
    return bool(path_args(pytest_args))


def references(run: dict) -> set[str]:
    """Names of the run's references (timed for comparison, never guarded)."""
    return {b["fullname"] for b in run["benchmarks"] if b.get("extra_info", {}).get("reference")}


def guarded(run: dict) -> dict[str, float]:
    """name → ratio_to_plain for every benchmark of ours that has one (not the plain
    counterparts, not the references)."""
    out = {}
    for b in run["benchmarks"]:
        info = b.get("extra_info", {})
        if not info.get("plain") and not info.get("reference") and info.get("ratio_to_plain") is not None:
            out[b["fullname"]] = float(info["ratio_to_plain"])
    return out


def workloads(run: dict) -> dict[str, object]:
    """name → the version of the inputs its suite times (``extra_info["workload"]``, bumped
    in ``bench/conftest.py`` when a suite's inputs change; 1 for runs from before it)."""
    return {b["fullname"]: b.get("extra_info", {}).get("workload", 1) for b in run["benchmarks"]}


def compare(base: dict, new: dict, tolerance: float) -> tuple[list[str], list[str], list[str], list[str]]:
    """(table lines, regression lines, missing lines, unguarded lines): the figures both runs
    have, compared; those of the baseline that the new run lacks, or has measured on other
    inputs (under the same name: its ratio is no longer comparable); those of the run that the
    baseline lacks (listed, never failing: unguarded until a baseline is saved with them)."""
    # a baseline saved before a benchmark became a reference still lists it: not missing, not compared
    a = {k: v for k, v in guarded(base).items() if k not in references(new)}
    b = guarded(new)
    wa, wb = workloads(base), workloads(new)
    changed = sorted(k for k in set(a) & set(b) if wa[k] != wb[k])
    stale = [f"{'changed':<10} {name}: timed on other inputs than the baseline's (workload {wa[name]} → {wb[name]}); "
             "save a baseline again" for name in changed]
    a = {k: v for k, v in a.items() if k not in changed}
    b = {k: v for k, v in b.items() if k not in changed}
    lines, bad = [], []
    for name in sorted(set(a) & set(b)):
        if not all(math.isfinite(r) and r > 0 for r in (a[name], b[name])):
            # a ratio of 0 or less, NaN or infinite: no timing gives one (a baseline edited,
            # a broken measurement); passed, it switched the figure's guard off for good
            flag, said = "REGRESSION", "not a positive finite ratio"
        else:
            change = b[name] / a[name] - 1
            flag, said = ("ok" if change <= tolerance else "REGRESSION"), f"{change:+.0%}"
        line = f"{flag:<10} {name}: ratio to plain {a[name]:.3f} → {b[name]:.3f} ({said})"
        lines.append(line)
        if flag != "ok":
            bad.append(line)
    missing = stale + [f"{'missing':<10} {name}: in the baseline, not in this run" for name in sorted(set(a) - set(b))]
    unguarded = [f"{'new':<10} {name}: not in the baseline, so not guarded (save a baseline to guard it)"
                 for name in sorted(set(b) - set(a))]
    return lines, bad, missing, unguarded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.guard", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["save", "check"], help="save a baseline or check against it")
    ap.add_argument("--run", type=Path, help="an existing benchmark JSON instead of running the suites")
    ap.add_argument("--baseline", type=Path, help="baseline file (default: bench/baselines/<device>.json)")
    ap.add_argument("--tolerance", type=float, help="allowed relative growth of a ratio (default 0.35 CPU, 0.15 GPU)")
    ap.add_argument("--allow-missing", action="store_true",
                    help="a partial run: figures of the baseline that it lacks do not fail the check (implied "
                         "by pytest arguments that select, e.g. -k), and save drops them (a save that selects "
                         "keeps them)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments after --, e.g. -- -k loss")
    args = ap.parse_intermixed_args(argv)  # options after the action too: check --baseline F -- -k loss
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and 0 <= args.tolerance <= 1):
        # 15 for 15% would pass a run 16 times slower: the guard switched off without a word
        return _fail(f"--tolerance {args.tolerance:g}: must be a fraction from 0 to 1 (0.15: 15%)")
    device = None
    if args.run is None and args.action == "check":  # before minutes of benchmarks, not after
        here = current_device()
        baseline = args.baseline or BASELINES / f"{slug(here)}.json"
        if not baseline.exists():
            return _fail(f"no baseline for {here} at {baseline}; make one with: python -m bench.guard save")
    if args.run is not None:
        run_path = args.run
        device = load_run(run_path).get("device")
    else:
        run_path = Path(tempfile.mkdtemp()) / "run.json"
        rc = run_suites(run_path, args.pytest_args)
        if rc == 5:
            return _fail("the benchmark run collected no benchmarks (pytest exit 5)")
        if rc != 0 or not run_path.exists():
            return _fail(f"the benchmark run failed (pytest exit {rc})")
    run = load_run(run_path)
    device = device or run.get("device") or current_device()
    baseline = args.baseline or BASELINES / f"{slug(device)}.json"
    partial = args.allow_missing or selects(args.pytest_args)
    if args.action == "save":
        if not guarded(run):
            return _fail(f"{run_path}: no guarded figures (no benchmark with a plain counterpart); nothing saved")
        keep = f"nothing saved (this run stays in {run_path})"
        broken = sorted(name for name, ratio in guarded(run).items() if not math.isfinite(ratio) or ratio <= 0)
        if broken:  # as a baseline it would fail every later check (a ratio against NaN is NaN)
            return _fail(f"{run_path}: {len(broken)} figures are not positive finite ratios (first: {broken[0]}); "
                         f"{keep}")
        old = _readable(baseline)
        if old is not None and (why := _other_device(baseline, old, device)):
            return _fail(f"{why}; {keep}")
        dropped = sorted(set(guarded(old)) - set(guarded(run)) - references(run)) if old is not None else []
        kept = []
        if dropped and partial and not args.allow_missing:  # partial by its pytest arguments
            # a run narrowed on purpose (-- -k loss) updates its own figures and keeps the others'
            names = {b["fullname"] for b in run["benchmarks"]}
            kept = [b for b in old["benchmarks"] if b["fullname"] not in names]
            run = dict(run, benchmarks=run["benchmarks"] + kept)
        elif dropped and not args.allow_missing:  # it would silently stop guarding them
            return _fail(f"{baseline}: this run lacks {len(dropped)} of its figures (first: {dropped[0]}); "
                         f"{keep}: add --allow-missing to replace it anyway")
        baseline.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(run, indent=2) + "\n" if kept else Path(run_path).read_text()
        atomic_write(baseline, lambda tmp: tmp.write_text(text))
        print(f"guard: saved {len(guarded(run))} guarded figures as the baseline for {device}: {baseline}")
        if kept:
            print(f"guard: {len(kept)} entries of the runs this one left out ({' '.join(args.pytest_args)}) kept "
                  "from the previous baseline", file=sys.stderr)
        elif dropped:
            print(f"guard: warning: --allow-missing: {len(dropped)} figures of the previous baseline dropped; they "
                  "are not guarded until a baseline is saved from a full run", file=sys.stderr)
        return 0
    if not baseline.exists():
        return _fail(f"no baseline for {device} at {baseline}; make one with: python -m bench.guard save")
    base = load_run(baseline)
    if why := _other_device(baseline, base, device):
        return _fail(why)
    tolerance = args.tolerance if args.tolerance is not None else (0.35 if device.startswith("cpu") else 0.15)
    lines, bad, missing, unguarded = compare(base, run, tolerance)
    compared = len(lines)
    if not compared:
        return _fail(f"{run_path}: no figure in common with {baseline}; nothing compared")
    print("\n".join(lines + missing + unguarded))
    print(f"guard: {compared} figures compared with {baseline.name}, {len(bad)} regressed beyond {tolerance:.0%}"
          + (f"; {len(missing)} missing from this run{' (a partial run)' if partial else ''}" if missing else ""))
    return 1 if bad or (missing and not partial) else 0


if __name__ == "__main__":
    exit_main(main)
