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
``--tolerance``: by default 0.35 on a CPU (paired ratios on the 2-core CI machines moved by
up to ±26% between identical runs) and 0.15 on a GPU. A figure of the baseline that the run
lacks (a benchmark skipped, renamed or gone) fails the check too, unless the run is partial
on purpose (pytest arguments after ``--`` that select benchmarks: ``-k``, ``-m``,
``--deselect``, ``--ignore`` or a path; or ``--allow-missing``). A baseline measured on
another device is refused, and ``save`` refuses to replace a baseline with a run that lacks
some of its figures unless ``--allow-missing`` says so. Exit codes: 0 no regression, 1 a
regression or a missing figure, 2 no baseline, a baseline of another device, an unreadable
file, a failed or empty benchmark run, a save that would drop figures, or no figure in
common.
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
    cmd = [sys.executable, "-m", "pytest", "bench", *TIMING, f"--benchmark-json={out}", *extra]
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
    return data


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


def selects(pytest_args: list[str]) -> bool:
    """Whether pytest arguments select a subset of the benchmarks (a partial run on purpose):
    ``-k``, ``-m``, ``--deselect``, ``--ignore`` or a test path / node id (``…::…``, ``….py``,
    a folder), as opposed to ones that only change how the run goes or reports (``-v``,
    ``-x``, ``-p no:…``, ``--benchmark-max-time 2``: a value is no test path)."""
    narrowing = ("-k", "-m", "--deselect", "--ignore", "--ignore-glob")
    for arg in pytest_args:
        if arg.split("=", 1)[0] in narrowing or (arg[:2] in ("-k", "-m") and len(arg) > 2):  # -kloss, --ignore=x
            return True
        path = arg.split("::", 1)[0]
        if not arg.startswith("-") and ("::" in arg or path.endswith(".py") or (ROOT / path).is_dir()):
            return True
    return False


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


def compare(base: dict, new: dict, tolerance: float) -> tuple[list[str], list[str], list[str], list[str]]:
    """(table lines, regression lines, missing lines, unguarded lines): the figures both runs
    have, compared; those of the baseline that the new run lacks; those of the run that the
    baseline lacks (listed, never failing: unguarded until a baseline is saved with them)."""
    # a baseline saved before a benchmark became a reference still lists it: not missing, not compared
    a = {k: v for k, v in guarded(base).items() if k not in references(new)}
    b = guarded(new)
    lines, bad = [], []
    for name in sorted(set(a) & set(b)):
        change = b[name] / a[name] - 1
        flag = "ok" if math.isfinite(change) and change <= tolerance else "REGRESSION"  # NaN fails too
        line = f"{flag:<10} {name}: ratio to plain {a[name]:.3f} → {b[name]:.3f} ({change:+.0%})"
        lines.append(line)
        if flag != "ok":
            bad.append(line)
    missing = [f"{'missing':<10} {name}: in the baseline, not in this run" for name in sorted(set(a) - set(b))]
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
                    help="a partial run: figures of the baseline that it lacks do not fail the check, and "
                         "save may drop them (implied by pytest arguments that select, e.g. -k)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments after --, e.g. -- -k loss")
    args = ap.parse_intermixed_args(argv)  # options after the action too: check --baseline F -- -k loss
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        return _fail(f"--tolerance {args.tolerance}: must be a finite fraction of 0 or more (0.15: 15%)")
    device = None
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
        if old is not None and not partial:
            dropped = sorted(set(guarded(old)) - set(guarded(run)) - references(run))
            if dropped:  # a partial run would silently stop guarding them
                return _fail(f"{baseline}: this run lacks {len(dropped)} of its figures (first: {dropped[0]}); "
                             f"{keep}: add --allow-missing to replace it anyway")
        baseline.parent.mkdir(parents=True, exist_ok=True)
        text = Path(run_path).read_text()
        atomic_write(baseline, lambda tmp: tmp.write_text(text))
        print(f"guard: saved {len(guarded(run))} guarded figures as the baseline for {device}: {baseline}")
        if partial:
            print(f"guard: warning: a partial run ({' '.join(args.pytest_args) or '--allow-missing'}): the figures it lacks are not "
                  "guarded until a baseline is saved from a full run", file=sys.stderr)
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
