"""``python -m eclip.train``: train eCLIP on a prepared cache within a time budget or step count.

The training loop (``eclip.loop``) runs a recipe file (default: the template
``eclip/recipe.py``); ``--key=value`` overrides any of the recipe's HPARAMS, and
``--model.<field>=value`` any model config field (``--model.vision.depth=6``). Modes:

- default: train on the ``train`` split, evaluate on ``val``;
- ``--final``: train on train+val, evaluate on the held-out ``test`` split;
- ``--folds K``: K-fold cross-validation over train+val (the cache's fold ids; K must be the
  cache's fold count, ``prepare --folds``), reporting mean ± std of the validation mean rank
  (each fold gets the full budget, in ``--out/fold<k>``; ``--out/folds.json`` records the
  settings); with ``--resume`` (the same settings) the folds that left a checkpoint continue
  from it.

Writes to ``--out``: ``result.json``, ``metrics.jsonl`` (a row per log step, and the last
step), the checkpoint (``checkpoint.safetensors`` + ``checkpoint.json``) and prints a
``key: value`` summary block.
Exit codes: 0 ok, 1 diverged or out of memory, 2 bad input, 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

from eclip import checkpoint as ckpt
from eclip.data.cache import load_cache, out_in_cache_error
from eclip.errors import EclipError, OneLineParser, first_line, seed_value
from eclip.evaluate import fold_split, format_metrics, scored_split_problem
from eclip.fileio import atomic_write, exclusive
from eclip.hardware import device_name, peak_bf16_flops
from eclip.loop import (
    LoopConfig,
    apply_overrides,
    eval_bf16,
    evaluate_split,
    finite,
    is_oom,
    load_recipe,
    peak_memory_bytes,
    run_loop,
    write_json,
)
from eclip.process import HardStop, exit_main, sigterm_as_ctrl_c, stop_deferred

TEMPLATE = Path(__file__).with_name("recipe.py")
EXIT = {"ok": 0, "diverged": 1, "oom": 1, "interrupted": 130, "aborted": 130}
MODEL_KEYS = ("preset", "image_tower", "text_tower")  # HPARAMS that are options too, and fix the weights
CV_RECORD = "folds.json"  # in --out: what a cross-validation began with; its folds' checkpoints carry its id


READY = "train: ready"  # the line --signal-ready prints


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an override such as --compile=true must not be read as --compile-cache
    p = OneLineParser(prog="python -m eclip.train", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                      epilog="Any other --key=value overrides a recipe HPARAMS entry (--lr=3e-4), and "
                             "--model.<field>=value a model config field (--model.vision.depth=6).")
    p.add_argument("--data", type=Path, required=True, help="cache directory from eclip.prepare")
    p.add_argument("--out", type=Path, required=True, help="run directory (results, checkpoint, logs)")
    p.add_argument("--recipe", type=Path, default=TEMPLATE, help="recipe file (default: the template)")
    p.add_argument("--budget-s", type=float,
                   help="wall-clock training budget: the recipe's setup and its steps (give this or --steps)")
    p.add_argument("--steps", type=int, help="train for exactly this many steps instead (give this or --budget-s)")
    p.add_argument("--preset", help="model preset (tiny, vit-s16, vit-b16); same as --preset=... override")
    p.add_argument("--image-tower", help="pretrained image tower timm:NAME[@FILE|@random] (extra [pretrained])")
    p.add_argument("--text-tower", help="pretrained text tower hf:NAME_OR_DIR (extra [pretrained]); its "
                                        "tokenizer re-tokenizes the captions")
    p.add_argument("--seed", type=seed_value, default=42,
                   help="seed of the model's initialisation and the batch sampler (never the evaluation's orders; "
                        "default: 42)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--final", action="store_true", help="train on train+val, evaluate on test")
    p.add_argument("--folds", type=int, help="K-fold cross-validation over train+val")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (with --folds: each fold from the checkpoint it left, "
                        "under the settings the cross-validation began with)")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between metric read-backs (each read arrives one interval later, without a sync; "
                        "default: 10)")
    p.add_argument("--data-placement", choices=["auto", "device", "host"], default="auto",
                   help="training images resident on the device, or in host memory with a prefetch "
                        "thread (auto: on the device when they fit; with --resume, as the checkpoint)")
    p.add_argument("--compile-cache", type=Path,
                   help="persistent torch.compile cache (default: $TORCHINDUCTOR_CACHE_DIR when set, "
                        "else ~/.cache/eclip/inductor)")
    p.add_argument("--signal-ready", action="store_true",
                   help=f"print {READY!r} on stdout just before the recipe is imported: eclip.harness times the "
                        "process from there to its end itself, a figure the recipe's code cannot misreport")
    p.add_argument("--train-only", action="store_true",
                   help="keep only the training images in memory (the rest of the cache is dropped before the "
                        "recipe is imported), train, save the checkpoint and stop: eclip.harness evaluates it in "
                        "another process (result.json then has no metrics, and no summary is printed)")
    return p


def parse_overrides(extra: list[str]) -> dict[str, str]:
    out = {}
    for item in extra:
        if not item.startswith("--") or "=" not in item:
            raise EclipError(f"unrecognised argument {item!r} (overrides are written --key=value)")
        key, value = item[2:].split("=", 1)
        out[key.replace("-", "_") if not key.startswith("model.") else key] = value
    return out


def summary_lines(result: dict) -> list[str]:
    """The greppable `key: value` block a run ends with (eclip.harness prints it too)."""
    keys = ("status", "val_mean_rank", "eval_split", "steps", "samples", "samples_per_s", "train_s",
            "warmup_s", "eval_s", "mfu", "peak_memory_gb", "logit_scale", "loss", "params", "device", "data_placement")
    lines = ["---"]
    for k in keys:
        v = result.get(k)
        if k == "val_mean_rank" and result.get("eval_split") == "test":
            # --final: result.json's val_mean_rank is the evaluated split's rank (what every
            # caller reads); the block names it as what it is, and has no validation rank
            k, v = "test_mean_rank", result.get("test_mean_rank", v)
        lines.append(f"{k + ':':<16}{v:.4g}" if isinstance(v, float) else f"{k + ':':<16}{v}")
        if k == "status" and result.get("reason"):  # why a run diverged, ran out or failed
            lines.append(f"{'reason:':<16}{result['reason']}")
    if result.get("metrics"):
        lines += format_metrics(result["metrics"])[1:]
    if result.get("folds"):  # no rank when the first fold ended without one (diverged, interrupted)
        rank, std = result.get("val_mean_rank"), result.get("val_mean_rank_std")
        lines.append(f"folds_mean_rank: {rank:.2f} ± {std:.2f}" if rank is not None else "folds_mean_rank: None")
        # the fields above are the last fold's (steps, loss, ...), the rank the folds' mean
        done = sum(f["status"] == "ok" for f in result["folds"])
        lines.append(f"folds_done:     {done}/{result.get('folds_total', len(result['folds']))}")
    return lines


def _flops_at(count, length: int) -> int:
    """A model's FLOP count at a token length; a recipe's own model may take no length."""
    try:
        inspect.signature(count).bind(length)
    except TypeError:
        return count()
    return count(length)


def trim_log(path: Path, step: int) -> None:
    """Drop the rows past ``step`` from a run's metrics log (and a torn last line), atomically:
    an attempt that went beyond the checkpoint and failed before it saved again (diverged,
    killed) logged steps that the resumed run trains again."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as e:
        raise EclipError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None

    def kept(line: str) -> bool:
        try:
            row = json.loads(line)
        except ValueError:
            return False
        return not isinstance(row, dict) or not isinstance(row.get("step"), int) or row["step"] <= step

    keep = [line if line.endswith("\n") else line + "\n" for line in lines if kept(line)]
    if keep != lines:
        atomic_write(path, lambda p: p.write_text("".join(keep), encoding="utf-8"))


def _save_checkpoint(args, run: dict, recipe, cache, train_rows, eval_split: str, out: Path) -> tuple[float, float]:
    """Write the run's checkpoint (when it trained to a state worth keeping); returns (the
    time the budget's work ended, the seconds the files took to write)."""
    # From here the budget is spent: the recipe's code that still runs (its model's
    # state_dict and FLOP counts, recipe_state) is timed as after_s, the evaluation and the
    # checkpoint's file writes excluded; the harness refuses a run that trains on there.
    t_end = time.perf_counter()
    model, hp = run["model"], recipe.HPARAMS
    data = run["data"].state_dict()
    meta = {"step": run["steps"], "samples": run["samples"], "trained_s": run["train_s"],
            "schedule_origin_s": run["schedule_origin_s"],
            "expert_samples": run["expert_samples"], "data_placement": run["data"].placement,
            "data_cursor": data["cursor"], "data_epoch": data["epoch"],
            "hparams": hp, "model_config": model.cfg.to_dict(), "seed": args.seed,
            "steps_requested": args.steps, "budget_requested_s": args.budget_s,  # the schedule's length
            "cache_fingerprint": cache.manifest.get("fingerprint"), "status": run["status"],
            "eval_split": eval_split, "train_rows": int(train_rows.numel())}
    if getattr(args, "cv_id", None):  # a fold: which cross-validation it belongs to (run_folds)
        meta["cv_id"] = args.cv_id
    state = {f"data_{k}": v for k, v in data.items() if isinstance(v, torch.Tensor)}  # generator(s), perm
    # torch's global generators: dropout and the recipe's own draws (torch.rand) continue on
    # --resume as they would have, not from the seed again
    state["torch_rng"] = torch.get_rng_state()
    if run["device"].type == "cuda":
        state["torch_cuda_rng"] = torch.cuda.get_rng_state(run["device"])
    if hasattr(recipe, "recipe_state"):
        state |= {f"recipe.{k}": v for k, v in recipe.recipe_state().items()}
    write_s = 0.0  # the files' writing: not the recipe's time, whatever the tensors' size
    if run["status"] in ("ok", "interrupted"):
        write_s = ckpt.save_checkpoint(out, model, run["optimizer"], state, meta)
    return t_end, write_s


def _length(steps, budget_s) -> str:
    return f"--steps {steps}" if steps is not None else f"--budget-s {budget_s:g}"


def _schedule_change(meta: dict, args) -> str | None:
    """The length the checkpoint's run asked for (``--steps 4``) when this run asks for
    another, else None (a checkpoint from before the length was saved says nothing)."""
    steps, budget = meta.get("steps_requested"), meta.get("budget_requested_s")
    if steps is None and budget is None:
        return None
    if (steps, budget) == (args.steps, args.budget_s):
        return None
    return _length(steps, budget)


def train_once(args, overrides: dict, cache, train_rows, eval_rows, eval_split: str, out: Path) -> dict:
    if getattr(args, "signal_ready", False):  # before any of the recipe's code: what follows is its time
        print(READY, flush=True)
    t_import = time.perf_counter()
    torch.manual_seed(args.seed)  # what the recipe's module code draws: the same in eclip.encode's processes
    recipe = load_recipe(args.recipe)  # its module code runs here: on the clock (run_loop's setup_s)
    import_s = time.perf_counter() - t_import
    apply_overrides(recipe.HPARAMS, overrides)
    resume_dir, placement, schedule_note = None, args.data_placement, None
    if args.resume:
        meta, source = ckpt.read_meta_from(out)  # errors name the file the meta came from
        ckpt.check_meta(meta, source, resume=True)  # before the log is trimmed to its step
        if placement == "auto":  # the free device memory may have changed: sample as before
            placement = meta.get("data_placement", "auto")
        if meta.get("cache_fingerprint") != cache.manifest.get("fingerprint"):
            raise EclipError(f"{source}: checkpoint was trained on another cache "
                             "(fingerprint differs); resume with the same --data")
        if meta.get("eval_split") != eval_split or meta.get("train_rows") != int(train_rows.numel()):
            raise EclipError(f"{source}: checkpoint trained on {meta.get('train_rows')} images for "
                             f"{meta.get('eval_split')!r}; this run has {int(train_rows.numel())} for {eval_split!r} "
                             + ("(a fold of a --folds run is not resumed on its own: resume the whole "
                                "cross-validation, --folds with --resume)"
                                if str(meta.get("eval_split", "")).startswith("fold")
                                else "(resume with the same --final)"))
        if meta.get("seed", args.seed) != args.seed:
            # the data order goes on from the checkpoint's generators whatever the seed, but the
            # new checkpoint and result.json recorded this one: a run no seed reproduces
            raise EclipError(f"{source}: checkpoint was trained with --seed {meta['seed']}, this run has --seed "
                             f"{args.seed}; resume with --seed {meta['seed']}")
        for key in MODEL_KEYS:  # the weights and the token ids must match
            if (meta.get("hparams", {}).get(key) or "") != (recipe.HPARAMS.get(key) or ""):
                raise EclipError(f"{source}: checkpoint has {key} {meta['hparams'].get(key) or ''!r}, "
                                 f"this run {recipe.HPARAMS.get(key) or ''!r}")
        # Nothing left to train (an evaluation cut short, say): the checkpoint is evaluated as
        # it is, and the run says so rather than reporting a training that did not happen.
        done = (int(meta.get("step", 0)) >= args.steps if args.steps is not None
                else float(meta.get("trained_s", 0.0)) >= args.budget_s)
        if done:
            print(f"train: the checkpoint in {out} has trained {meta.get('step')} steps in "
                  f"{float(meta.get('trained_s', 0.0)):.1f} s, all that {_length(args.steps, args.budget_s)} asks: "
                  "no step runs "
                  f"({'saved as it is' if args.train_only else 'evaluating it'}); ask for more to train on",
                  file=sys.stderr)
        elif (asked := _schedule_change(meta, args)) is not None:
            # the schedule is laid over the length asked now: where the first run had decayed the
            # learning rate, it rises again (to about half its peak when the length doubles).
            # Said at the first step, once the checkpoint has loaded: not before a refusal
            schedule_note = (f"train: warning: the checkpoint's run asked for {asked}; this one asks for "
                             f"{_length(args.steps, args.budget_s)}, over which the learning-rate schedule is laid "
                             f"again: from step {int(meta.get('step', 0)) + 1} the rate follows the new length's "
                             "schedule, not the rest of the first one's")
        resume_dir = out
        trim_log(out / "metrics.jsonl", int(meta.get("step", 0)))
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a refused --resume creates nothing
    cfg = LoopConfig(budget_s=args.budget_s, steps=args.steps, seed=args.seed, device=args.device,
                     log_every=args.log_every, data_placement=placement)
    log_path = out / "metrics.jsonl"
    logs = []  # opened at the first row: a run that fails while setting up keeps the last run's log

    def on_log(row):
        if not logs:
            if schedule_note:
                print(schedule_note, file=sys.stderr)
            # from here the log is this run's: the last run's result no longer describes the
            # folder (a run that then fails, a full disk at its save, leaves none, not a stale "ok")
            (out / "result.json").unlink(missing_ok=True)
            logs.append(open(log_path, "a" if args.resume else "w", encoding="utf-8"))
        logs[0].write(json.dumps(finite(row), allow_nan=False) + "\n")  # a diverged loss as null
        logs[0].flush()

    held: dict = {}  # the loop's signal handlers, kept until the checkpoint is written
    try:
        try:
            run = run_loop(recipe, cache, train_rows, cfg, resume_dir=resume_dir, on_log=on_log, setup_s=import_s,
                           hold=held)
        finally:
            for f in logs:
                f.close()
        # a Ctrl-C or SIGTERM from the loop's end to the checkpoint's (the budget's end, when a
        # scheduler's timeout fires) is still the loop's: it waits, and the run ends interrupted
        t_end, write_s = _save_checkpoint(args, run, recipe, cache, train_rows, eval_split, out)
    except KeyboardInterrupt:
        if held.get("stop", {}).get("hard"):  # a second Ctrl-C: the save cut short (an atomic write)
            raise HardStop("the checkpoint is written") from None
        raise
    finally:
        if "stop" in held:
            held["stop"]["restore"]()
    model, device, hp = run["model"], run["device"], recipe.HPARAMS
    metrics, status = None, run["status"]
    if held["stop"].get("requested") and status == "ok":
        status = "interrupted"
        print("train: interrupted as the checkpoint was written (it is saved; no metrics: --resume with the same "
              "options evaluates it)", file=sys.stderr)
    eval_s = None
    if status == "ok" and not args.train_only:
        t_eval = time.perf_counter()
        try:
            metrics = evaluate_split(model, run["cache"], eval_rows, device, bf16=eval_bf16(hp, device))
            eval_s = time.perf_counter() - t_eval
        except KeyboardInterrupt:  # training is done and checkpointed: the result says what is missing
            status = "interrupted"
            print("\ntrain: interrupted during the evaluation (the checkpoint is saved; no metrics: "
                  "--resume with the same options evaluates it)", file=sys.stderr)
    sps = run["samples"] / max(run["train_s"], 1e-9)
    peak = peak_bf16_flops(device)
    # training FLOPs ≈ 3 × forward: both towers for every sample, plus the expert path (a
    # second image pass, the heatmap processor, the phrase) for the samples that took it
    flops = None
    # at the token lengths the towers ran: the split's captions and phrases trimmed to its
    # longest (eclip.data.device), not the cache's padded context
    if hasattr(model, "flops_per_sample") and run["samples"]:
        text_len, phrase_len = run["data"].tokens.shape[1], run["data"].phrase_tokens.shape[1]
        expert = (_flops_at(model.expert_flops_per_sample, phrase_len)
                  if hasattr(model, "expert_flops_per_sample") else 0)
        per_sample = _flops_at(model.flops_per_sample, text_len)
        flops = 3 * (per_sample * run["samples"] + expert * run["expert_samples"]) / run["samples"]
    mem = peak_memory_bytes(device)
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":  # work the recipe queued counts where it ran
        torch.cuda.synchronize(device)
    after_s = time.perf_counter() - t_end - (eval_s or 0.0) - write_s
    return {
        "status": status, "eval_split": eval_split, "expert_samples": run["expert_samples"],
        "val_mean_rank": metrics["mean_rank"] if metrics else None,
        "metrics": metrics, "steps": run["steps"], "samples": run["samples"],
        "samples_per_s": sps, "train_s": run["train_s"], "warmup_s": run["warmup_s"], "eval_s": eval_s,
        "setup_s": run["setup_s"],
        "last_step_cpu_s": run["last_step_cpu_s"],
        "after_s": after_s,
        "mfu": (flops * sps / peak) if (peak and flops) else None,
        "peak_memory_bytes": mem, "peak_memory_gb": mem / 2**30 if mem else None,
        "logit_scale": run["last"].get("logit_scale"), "loss": run["last"].get("loss"),
        "reason": run["last"].get("reason"), "params": params,
        "device": device_name(device), "data_placement": run["data"].placement,
        "budget_s": args.budget_s, "steps_requested": args.steps,
        "seed": args.seed, "hparams": hp, "torch": torch.__version__,
    }


CV_SETTINGS = {"recipe_sha256": "recipe (its text changed)", "cache_fingerprint": "--data (another cache)",
               "steps": "--steps", "budget_s": "--budget-s", "seed": "--seed",
               "hparams": "HPARAMS (the recipe's with the overrides: --key=value, --preset, --image-tower, --text-tower)"}


def cv_settings(args, overrides: dict, cache) -> dict:
    """What every fold of one cross-validation shares (CV_SETTINGS' keys): folds trained
    under other settings would make their mean a mixture. The HPARAMS are the recipe's
    with the overrides applied (so ``--lr=0.001`` is ``--lr=1e-3``, and ``--preset tiny``
    the template's own), read by importing the recipe once more, off any clock."""
    recipe = load_recipe(args.recipe)
    hparams = json.loads(json.dumps(apply_overrides(recipe.HPARAMS, overrides), sort_keys=True, default=str))
    return {"recipe_sha256": hashlib.sha256(Path(args.recipe).read_bytes()).hexdigest(),
            "cache_fingerprint": cache.manifest.get("fingerprint"), "steps": args.steps, "budget_s": args.budget_s,
            "seed": args.seed, "hparams": hparams}


def cv_to_resume(path: Path, settings: dict) -> str:
    """The id of the cross-validation recorded in ``path`` (CV_RECORD), checked against this
    run's ``settings``; one-line errors when there is none or it began otherwise."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EclipError(f"{path}: no cross-validation to resume here; run --folds without --resume") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise EclipError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise EclipError(f"{path}: unreadable (no cross-validation id)")
    differ = [CV_SETTINGS[k] for k in settings if record.get(k) != settings[k]]
    if differ:
        raise EclipError(f"{path}: this cross-validation began with another {', '.join(differ)}; resume with the "
                         "same, or run --folds without --resume to start it again")
    return record["id"]


def run_folds(args, overrides: dict, cache) -> dict:
    """The cross-validation: fold k trains on the other folds' images in ``--out/fold<k>``
    and is validated on its own; it stops at the first fold that fails. ``--out/folds.json``
    records its settings and an id that each fold's checkpoint carries. With ``--resume``
    (the same settings) each fold whose checkpoint carries the id continues from it (one
    that trained all it was asked is evaluated again) and the others train from the start
    (a checkpoint of an earlier cross-validation in the same folder is not taken for one of
    this), so a cross-validation cut short loses the fold it was in, never the folds before."""
    dirs = [args.out / f"fold{k}" for k in range(args.folds)]
    made = [d for d in dirs if not d.exists()]
    try:
        with contextlib.ExitStack() as locks:
            # each fold's folder is a run's --out: a run given one of them on its own (--out
            # X/fold1) while this trains would interleave its log and checkpoint with the fold's.
            # All taken now, so such a run refuses this before any fold trains, not hours in
            for d in dirs:
                locks.enter_context(exclusive(d, "another training run in this folder", lock=d / TRAIN_LOCK))
            return _run_folds(args, overrides, cache, dirs)
    finally:
        for d in made:  # the folders of folds never reached (one before failed): empty, not kept
            with contextlib.suppress(OSError):
                d.rmdir()


def _run_folds(args, overrides: dict, cache, dirs: list[Path]) -> dict:
    """``run_folds`` holding the folds' folders."""
    for k in range(len(dirs)):  # before any fold trains, not when the one too small is reached
        if why := scored_split_problem(fold_split(cache.fold, k)[1].numel(), f"fold{k}"):
            raise EclipError(f"{args.data}: {why} (prepare it with fewer --folds)")
    settings = cv_settings(args, overrides, cache)
    if args.resume:
        cv_id = cv_to_resume(args.out / CV_RECORD, settings)
        saved = [((d / ckpt.TENSORS).is_file() or (d / ckpt.META).is_file())
                 and ckpt.read_meta_from(d)[0].get("cv_id") == cv_id for d in dirs]
    else:
        cv_id, saved = uuid.uuid4().hex, [False] * len(dirs)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / CV_RECORD, {"id": cv_id, "started": time.time(), **settings})
    folds = []
    for k, out in enumerate(dirs):
        tr, ev = fold_split(cache.fold, k)
        fold_args = argparse.Namespace(**dict(vars(args), resume=saved[k], cv_id=cv_id))
        r = train_once(fold_args, overrides, cache, tr, ev, f"fold{k}", out)
        write_json(out / "result.json", r)
        folds.append(r)
        if r["status"] != "ok":
            break
    ranks = [r["val_mean_rank"] for r in folds if r["val_mean_rank"] is not None]
    return dict(folds[-1], folds=[{k: r[k] for k in ("status", "val_mean_rank", "steps")} for r in folds],
                status="ok" if all(r["status"] == "ok" for r in folds) else folds[-1]["status"],
                eval_split="folds", metrics=None, folds_total=args.folds,
                val_mean_rank=statistics.mean(ranks) if ranks else None,
                val_mean_rank_std=statistics.pstdev(ranks) if ranks else None)


def run(args, overrides: dict) -> dict:
    if (args.budget_s is None) == (args.steps is None):
        raise EclipError("give exactly one of --budget-s or --steps")
    if args.budget_s is not None and not (0 < args.budget_s < math.inf) or args.steps is not None and args.steps <= 0:
        raise EclipError("--budget-s and --steps must be positive (and the budget finite)")
    if args.log_every < 1:
        raise EclipError(f"--log-every {args.log_every}: must be at least 1")
    if why := out_in_cache_error(args.out, args.data):
        raise EclipError(why)
    for key in MODEL_KEYS:  # options that are HPARAMS entries
        if getattr(args, key):
            overrides = dict(overrides, **{key: getattr(args, key)})
    if args.compile_cache is not None:  # the option beats an inherited TORCHINDUCTOR_CACHE_DIR
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.compile_cache.resolve())
    else:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache/eclip/inductor"))
    # one run a folder: two resuming one --out at once interleaved their logs and checkpoints
    # (inside --out: a sandboxed run may write there only)
    with exclusive(args.out, "another training run in this folder", lock=args.out / TRAIN_LOCK):
        return _train(args, overrides)


TRAIN_LOCK = ".train.lock"  # in --out while a run trains in it


def _train(args, overrides: dict) -> dict:
    """``run`` past its checks of the options, holding the folder's lock."""
    cache = load_cache(args.data)
    t0 = time.time()
    if args.folds is not None:
        if args.train_only:
            raise EclipError("--folds cannot be combined with --train-only")
        if args.final:
            raise EclipError("--folds cannot be combined with --final (cross-validation never looks at the test split)")
        # K-fold means each fold is validated once and trained on all the others: only the
        # cache's own fold count does that (K smaller would train on a fold never validated)
        k_cache = int(cache.fold.max()) + 1
        if k_cache < 2:
            raise EclipError(f"--folds {args.folds}: this cache has no folds to cross-validate over "
                             "(prepare it with --folds 2 or more)")
        if args.folds != k_cache:
            hint = f" (prepare --folds {args.folds} makes a cache with {args.folds})" if args.folds >= 2 else ""
            raise EclipError(f"--folds {args.folds}: this cache has {k_cache} folds, so expected --folds {k_cache}{hint}")
        result = run_folds(args, overrides, cache)
    else:
        if args.final:
            tr = torch.nonzero(cache.split <= 1).flatten()
            ev, split = cache.split_images("test"), "test"
        else:
            tr, ev, split = cache.split_images("train"), cache.split_images("val"), "val"
        # a subset (eclip.data.cache.write_subset) holds the training images only, by design:
        # the harness that wrote it checked the scored split of the whole cache
        if (why := scored_split_problem(ev.numel(), split)) and not (args.train_only and "subset_of" in cache.manifest):
            raise EclipError(f"{args.data}: {why}")
        if args.train_only:  # before the recipe is imported: the other images are gone from this process
            cache, ev = cache.subset(tr), None
            tr = torch.arange(cache.images.shape[0])
        result = train_once(args, overrides, cache, tr, ev, split, args.out)
        if split == "test":
            result["test_mean_rank"] = result["val_mean_rank"]
    result["wall_s"] = time.time() - t0
    if args.train_only:
        result["ranked_by"] = "caller"  # the metrics come from whoever evaluates the checkpoint
    with stop_deferred("the result is written"):  # written whole: the run is over either way
        write_json(args.out / "result.json", result)
    if not args.train_only:
        print("\n".join(summary_lines(result)))
    return result


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    made = [p for p in (args.out, *args.out.parents) if not p.exists()]  # what a run here would create

    def drop_new_out(rc: int) -> int:
        """``rc``, once a run refused or stopped while it set up has removed the empty --out it
        made, and the folders above it it made."""
        for folder in made:  # the deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        return rc

    try:
        with sigterm_as_ctrl_c():  # a scheduler's SIGTERM saves and reports as Ctrl-C does
            result = run(args, parse_overrides(extra))
    except EclipError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return drop_new_out(2)
    except HardStop as e:  # a second Ctrl-C while the checkpoint or the result was written
        print(f"train: stopped at once by a second Ctrl-C, before {e} (an atomic write: the previous file, if "
              "any, is as it was)", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the training loop took them over (its setup)
        print("train: interrupted while setting up (before its first step): no checkpoint or result of it written",
              file=sys.stderr)
        return drop_new_out(130)
    except OSError as e:  # --out a file, a read-only or full disk: the path and the reason
        print(f"train: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return drop_new_out(2)
    except Exception as e:  # out of memory before the loop (data on the device, the model)
        if not is_oom(e):
            raise
        reason = first_line(e, 200)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "result.json", {"status": "oom", "val_mean_rank": None, "reason": reason})
        print(f"---\nstatus:         oom\nreason:         {reason}")
        return EXIT["oom"]
    return EXIT.get(result["status"], 1)


if __name__ == "__main__":
    exit_main(main)
