"""``python -m eclip.harness run``: the referee. Runs one recipe file through the one
training loop and scores it; the research loop calls it as a subprocess.

    python -m eclip.harness run --recipe runs/T/recipe.py --data CACHE --budget-s 180 --out DIR

Before anything runs, the recipe passes the static policy check (``eclip.policy``); a
rejected recipe gets ``result.json`` with status ``rejected`` and the offending lines, exit 2.
The harness then removes secrets from its environment (a recipe has no reason to see an API
key), points ``TORCHINDUCTOR_CACHE_DIR`` at the given compile cache (shared by a
workspace's runs, so a second run of the same model compiles in seconds), caps the address
space on CPU so an allocation fails with ``oom`` instead of the kernel's OOM killer ending
the run, and runs the recipe in two child processes, neither of which sees the pairs it is
scored on:

1. ``eclip.train --train-only`` (the one training loop, its clock, its ``result.json``)
   drops every image but the training split's from memory before it imports the recipe,
   trains, and saves the checkpoint.
2. ``eclip.encode`` rebuilds the model from the checkpoint and encodes the scored split's
   images and captions, which the harness hands it in orders only the harness knows, with
   no pairs and no cache path.

The harness itself never imports the recipe: it puts the embeddings back in place, ranks
them against the cache's own pairs and writes the metrics into ``result.json``
(``ranked_by: harness``). Whatever a recipe changes in its own processes (an operator, a
module, a class, a frame it walks), it finds no evaluation data in them to exploit, and the
ranking does not run there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from eclip.errors import EclipError, OneLineParser
from eclip.loop import write_json
from eclip.policy import check_file, scrub_environment

INPUTS = "eval_inputs.safetensors"  # the scored split, secretly ordered, for eclip.encode
EMBEDDINGS = "embeddings.safetensors"  # what eclip.encode leaves for the harness to rank


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
    capped = (lambda: limit_address_space(limit)) if on_cpu and limit > 0 else None
    for name in (INPUTS, EMBEDDINGS):
        (args.out / name).unlink(missing_ok=True)  # only this run's files are read
    cmd = [sys.executable, "-m", "eclip.train", "--data", str(args.data), "--out", str(args.out),
           "--recipe", str(args.recipe), "--budget-s", str(args.budget_s), "--seed", str(args.seed),
           "--device", args.device, "--train-only"]
    if args.compile_cache is not None:
        cmd += ["--compile-cache", str(args.compile_cache)]
    if args.final:
        cmd.append("--final")
    rc, _ = child(cmd, capped)
    result_path = args.out / "result.json"
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        return rc if rc else 1  # the child died without a result: the caller reports the crash
    if result.pop("ranked_by", None) != "caller":
        return rc  # written by the child before the run began (bad input, out of memory)
    # from here on the harness writes the result: "ranked_by: caller" never outlives it
    if result.get("status") == "ok":
        t_eval = time.perf_counter()
        try:
            # eval_s: the second process and the ranking, start-up included (not in the budget)
            result = dict(evaluate(result, args, capped), eval_s=time.perf_counter() - t_eval)
        except EclipError as e:
            status = "oom" if "failed: out of memory" in str(e) else "error"
            result = dict(result, status=status, val_mean_rank=None, metrics=None, reason=str(e))
            rc = 1
        except KeyboardInterrupt:  # trained and checkpointed: the result says what is missing
            result = dict(result, status="interrupted", val_mean_rank=None, metrics=None,
                          reason="interrupted during the evaluation (the checkpoint is saved)")
            rc = 130
    from eclip.train import summary_lines

    write_json(result_path, result)
    print("\n".join(summary_lines(result)))
    return rc


def child(cmd: list[str], preexec, keep_stderr: bool = False) -> tuple[int, str]:
    """Run one child to its end: (exit code, its stderr when ``keep_stderr``, passed on as
    well). Ctrl-C reaches it too (same process group): it finishes its step, saves and
    writes an interrupted result; the harness waits for that instead of dying first."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        p = subprocess.run(cmd, preexec_fn=preexec, stderr=subprocess.PIPE if keep_stderr else None, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    if keep_stderr:
        sys.stderr.write(p.stderr)
    return p.returncode, p.stderr or ""


def evaluate(result: dict, args, preexec=None) -> dict:
    """``result`` with the metrics of the checkpoint in ``args.out`` on the val split (test
    with ``--final``): the split's images and captions go to ``eclip.encode`` in secret
    orders, and the embeddings that come back are ranked here against the cache's pairs."""
    from eclip.checkpoint import read_meta
    from eclip.data.cache import load_cache
    from eclip.encode import write_inputs
    from eclip.loop import secret_order

    split = "test" if args.final else "val"  # the harness's own choice, not what the run reported
    cache = load_cache(args.data)
    cache = cache.subset(cache.split_images(split))  # the rest is freed
    tower = (read_meta(args.out).get("hparams") or {}).get("text_tower") or ""
    if tower:  # the ids the trained text tower reads (its tokenizer, as in training)
        from eclip.pretrained import retokenize

        cache = retokenize(cache, tower)
    order_i, order_t = secret_order(cache.images.shape[0]), secret_order(cache.tokens.shape[0])
    inputs, emb = args.out / INPUTS, args.out / EMBEDDINGS
    write_inputs(inputs, cache.images[order_i], cache.tokens[order_t],
                 {"vocab_size": cache.vocab_size, "context_length": cache.context_length,
                  "phrase_length": int(cache.region_tokens.shape[1])})
    cmd = [sys.executable, "-m", "eclip.encode", "--recipe", str(args.recipe), "--checkpoint", str(args.out),
           "--inputs", str(inputs), "--out", str(emb), "--device", args.device]
    try:
        rc, err = child(cmd, preexec, keep_stderr=True)
    finally:
        inputs.unlink(missing_ok=True)
    if rc in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if rc != 0:
        lines = [line.strip() for line in err.splitlines() if line.strip()]
        said = [line for line in lines if line.startswith("encode: error: ")]
        # its one-line error, else the last line of a traceback (the recipe's exception)
        why = said[-1][len("encode: error: "):] if said else lines[-1] if lines else f"exit code {rc}"
        raise EclipError(f"evaluation (eclip.encode) failed: {why}")
    return score(result, emb, order_i, order_t, cache.caption_image, args.device, split)


def score(result: dict, emb_path: Path, order_i, order_t, txt_image, device: str, split: str) -> dict:
    """``result`` with the metrics of the embeddings in ``emb_path``: rows encoded in the
    secret orders ``order_i`` (images) and ``order_t`` (captions), ranked against
    ``txt_image`` (int64 [C], each caption's image), never against anything a run reported."""
    from eclip.evaluate import retrieval_metrics
    from eclip.fileio import read_tensors
    from eclip.loop import pick_device, unshuffle

    tensors = read_tensors(emb_path, "the evaluation left no readable embeddings")
    img, txt = tensors.get("img"), tensors.get("txt")
    want = {"img": order_i.numel(), "txt": order_t.numel()}
    for name, t in (("img", img), ("txt", txt)):
        if t is None or t.dim() != 2 or t.shape[0] != want[name] or not t.is_floating_point():
            got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
            raise EclipError(f"{emb_path}: {name}: expected float [{want[name]}, E], got {got}")
    if img.shape[1] != txt.shape[1]:
        raise EclipError(f"{emb_path}: img and txt widths differ ({img.shape[1]} vs {txt.shape[1]})")
    dev = pick_device(device)
    img, txt = unshuffle(img.float(), order_i).to(dev), unshuffle(txt.float(), order_t).to(dev)
    metrics = retrieval_metrics(img, txt, txt_image.to(dev))
    out = dict(result, metrics=metrics, val_mean_rank=metrics["mean_rank"], ranked_by="harness", eval_split=split)
    if split == "test":
        out["test_mean_rank"] = metrics["mean_rank"]
    return out


if __name__ == "__main__":
    sys.exit(main())
