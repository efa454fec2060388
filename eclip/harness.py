"""``python -m eclip.harness run``: the referee. Runs one recipe file through the one
training loop and scores it; the research loop calls it as a subprocess.

    python -m eclip.harness run --recipe runs/T/recipe.py --data CACHE --budget-s 180 --out DIR

Before anything runs, the recipe passes the static policy check (``eclip.policy``); a
rejected recipe gets ``result.json`` with status ``rejected`` and the offending lines, exit 2.
The harness then removes secrets from its environment (a recipe has no reason to see an API
key), points ``TORCHINDUCTOR_CACHE_DIR`` at the given compile cache (shared by a
workspace's runs, so a second run of the same model compiles in seconds), caps the address
space on CPU so an allocation fails with ``oom`` instead of the kernel's OOM killer ending
the run, and hands over to ``eclip.train`` (same loop, same clock, same evaluation, same
``result.json``). The recipe never sees the validation split: the loop only gives it
training batches, and evaluates from embeddings it computes itself after training.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from eclip.errors import OneLineParser
from eclip.loop import write_json
from eclip.policy import check_file, scrub_environment


def limit_address_space(gigabytes: float) -> None:
    import resource

    limit = int(gigabytes * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def default_memory_limit_gb() -> float:
    """80% of the machine's physical memory."""
    return 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m eclip.harness", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="check, train and score one recipe file")
    r.add_argument("--recipe", type=Path, required=True, help="the recipe file to run")
    r.add_argument("--data", type=Path, required=True, help="cache directory from eclip.prepare")
    r.add_argument("--budget-s", type=float, required=True, help="wall-clock training budget from the first step")
    r.add_argument("--out", type=Path, required=True, help="where result.json, logs and the checkpoint go")
    r.add_argument("--seed", type=int, default=42, help="seed of the sampler and the evaluation")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    r.add_argument("--compile-cache", type=Path, help="persistent torch.compile cache for the workspace")
    r.add_argument("--memory-limit-gb", type=float,
                   help="address-space cap on CPU runs (default: 80%% of physical memory; 0 = none)")
    r.add_argument("--final", action="store_true", help="train on train+val, score on the held-out test split")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.recipe.is_file():
        print(f"harness: error: {args.recipe}: recipe file not found", file=sys.stderr)
        return 2
    violations = check_file(args.recipe)
    if violations:
        lines = [v.format(str(args.recipe)) for v in violations]
        write_json(args.out / "result.json", {"status": "rejected", "val_mean_rank": None, "violations": lines})
        print(f"harness: error: {lines[0]}" + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""),
              file=sys.stderr)
        return 2
    scrub_environment()
    if args.compile_cache is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.compile_cache.resolve())
    import torch

    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    limit = default_memory_limit_gb() if args.memory_limit_gb is None else args.memory_limit_gb
    if on_cpu and limit > 0:
        limit_address_space(limit)
    from eclip import train

    argv = ["--data", str(args.data), "--out", str(args.out), "--recipe", str(args.recipe),
            "--budget-s", str(args.budget_s), "--seed", str(args.seed), "--device", args.device]
    if args.compile_cache is not None:
        argv += ["--compile-cache", str(args.compile_cache)]
    if args.final:
        argv.append("--final")
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
