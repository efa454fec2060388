"""``python -m eclip.harness run``: the referee. Runs one recipe file through the one
training loop and scores it; the research loop calls it as a subprocess.

    python -m eclip.harness run --recipe runs/T/recipe.py --data CACHE --budget-s 180 --out DIR

Before anything runs, the recipe passes the static policy check (``eclip.policy``); a
rejected recipe gets ``result.json`` with status ``rejected`` and the offending lines, exit 2.
The harness then removes secrets from its environment (a recipe has no reason to see an API
key), points ``TORCHINDUCTOR_CACHE_DIR`` at the given compile cache (shared by a
workspace's runs, so a second run of the same model compiles in seconds), caps the address
space on CPU so an allocation fails with ``oom`` instead of the kernel's OOM killer ending
the run, and runs ``eclip.train`` in a child process (same loop, same clock, same
``result.json``). The recipe never sees the validation split: the loop only gives it
training batches, and after training encodes the split itself, images and texts in
separately shuffled passes. The child writes those embeddings to a file; the harness,
which never imports the recipe, ranks them and writes the metrics into ``result.json``
(``ranked_by: harness``). Whatever a recipe changes in its own process (an operator, a
module, a class), the ranking does not run there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from eclip.errors import EclipError, OneLineParser
from eclip.loop import write_json
from eclip.policy import check_file, scrub_environment

EMBEDDINGS = "embeddings.safetensors"  # what the training child leaves for the harness to rank


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
    emb = args.out / EMBEDDINGS
    emb.unlink(missing_ok=True)  # only this run's embeddings are ranked
    cmd = [sys.executable, "-m", "eclip.train", "--data", str(args.data), "--out", str(args.out),
           "--recipe", str(args.recipe), "--budget-s", str(args.budget_s), "--seed", str(args.seed),
           "--device", args.device, "--embeddings", str(emb)]
    if args.compile_cache is not None:
        cmd += ["--compile-cache", str(args.compile_cache)]
    if args.final:
        cmd.append("--final")
    # Ctrl-C reaches the child too (same process group): it finishes its step, saves and
    # writes an interrupted result; the harness waits for that instead of dying first.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = subprocess.call(cmd, preexec_fn=(lambda: limit_address_space(limit)) if on_cpu and limit > 0 else None)
    finally:
        signal.signal(signal.SIGINT, previous)
    result_path = args.out / "result.json"
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        return rc if rc else 1  # the child died without a result: the caller reports the crash
    if result.get("ranked_by") != "caller":
        return rc  # written by the child before the run began (bad input, out of memory)
    if result.get("status") == "ok":
        try:
            result = score(result, emb, args.data, args.device)
        except EclipError as e:
            result = dict(result, status="error", val_mean_rank=None, metrics=None, reason=str(e))
            rc = 1
    from eclip.train import summary_lines

    write_json(result_path, result)
    print("\n".join(summary_lines(result)))
    return rc


def score(result: dict, emb_path: Path, data: Path, device: str) -> dict:
    """``result`` with the metrics of the embeddings in ``emb_path``, ranked here against
    the pairs the cache's annotations give (never anything the run reported)."""
    from eclip.data.cache import split_rows
    from eclip.evaluate import retrieval_metrics
    from eclip.fileio import read_tensors
    from eclip.loop import eval_pairs, pick_device

    split = result.get("eval_split")
    if split not in ("val", "test"):
        raise EclipError(f"{emb_path.parent}/result.json: eval_split {split!r}, expected 'val' or 'test'")
    ann = read_tensors(Path(data) / "annotations.safetensors", "rebuild the cache")
    rows = split_rows(ann["split"], split)
    _, txt_image = eval_pairs(ann["caption_image"], rows, ann["split"].shape[0])
    tensors = read_tensors(emb_path, "the run left no readable embeddings")
    img, txt = tensors.get("img"), tensors.get("txt")
    want = {"img": rows.numel(), "txt": txt_image.numel()}
    for name, t in (("img", img), ("txt", txt)):
        if t is None or t.dim() != 2 or t.shape[0] != want[name] or not t.is_floating_point():
            got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
            raise EclipError(f"{emb_path}: {name}: expected float [{want[name]}, E], got {got}")
    if img.shape[1] != txt.shape[1]:
        raise EclipError(f"{emb_path}: img and txt widths differ ({img.shape[1]} vs {txt.shape[1]})")
    dev = pick_device(device)
    metrics = retrieval_metrics(img.to(dev), txt.to(dev), txt_image.to(dev))
    out = dict(result, metrics=metrics, val_mean_rank=metrics["mean_rank"], ranked_by="harness")
    if split == "test":
        out["test_mean_rank"] = metrics["mean_rank"]
    return out

if __name__ == "__main__":
    sys.exit(main())
