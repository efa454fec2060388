"""The one training loop: it drives a recipe file and owns everything that decides the score.

``eclip.train`` (by hand) and the research harness (by the agent) both run this loop; only
the recipe differs. The loop owns: the data (the training split resident on the device,
batches sampled and augmented there; or streamed from host memory with prefetch when it
does not fit), seeding, the clock, fast-fail on NaN/Inf or divergence, checkpoints, and the
evaluation (from embeddings of a split it loads only after training, images and texts
encoded in separate passes in independently shuffled orders).

The clock: the budget is wall-clock over the recipe's own code, its import, ``build_model``
and ``build_optimizer`` (``setup_s``) and then the steps, compilation included (an exempt
warm-up would be a place to hide training, and so would a setup off the clock: a compile on
dummy inputs in ``build_model``); the first step's time is reported apart as ``warmup_s``
but counts against the budget.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import numbers
import os
import secrets
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from eclip.checkpoint import TENSORS, load_checkpoint
from eclip.data.cache import Cache
from eclip.data.device import DeviceData
from eclip.errors import EclipError, first_line
from eclip.evaluate import retrieval_metrics
from eclip.fileio import atomic_write, map_json
from eclip.policy import read_source
from eclip.process import install_stop
from eclip.readback import Diverged, Readback

LOOP_KEYS = ("batch_size", "crop_scale", "flip")  # HPARAMS entries the loop itself reads
# "1": show the progress bar although stderr is a pipe (the harness's, passing it on to a terminal)
PROGRESS_ENV = "ECLIP_PROGRESS_BAR"


@dataclass
class ModelSpec:
    """What the data dictates about the model; handed to ``recipe.build_model``."""

    vocab_size: int  # tokenizer vocabulary size
    context_length: int  # caption tokens, <bos>/<eos> included
    phrase_length: int  # region phrase tokens
    image_size: int  # square image side in pixels
    device: torch.device  # where the model must live


@dataclass
class LoopConfig:
    # wall-clock training budget over the recipe's setup and steps, compilation included (or use steps);
    # the recipe's schedule runs over the time after the first step (``schedule_progress``)
    budget_s: float | None = None
    steps: int | None = None  # fixed number of optimizer steps (progress = step / steps)
    seed: int = 42  # seeds torch and the batch sampler (never the evaluation's shuffles)
    device: str = "auto"  # "auto" (cuda when available), "cuda", "cpu", "cuda:1", …
    log_every: int = 10  # steps between reading metrics back from the device
    diverge_loss: float = 1e4  # a loss above this counts as divergence
    progress_bar: bool = True  # tqdm bar on stderr (hidden when stderr is not a terminal, unless PROGRESS_ENV is 1)
    data_placement: str = "auto"  # training images on the "device", in "host" memory with prefetch, or "auto"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EclipError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise EclipError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EclipError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise EclipError(f"--device {name}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                         f"(cuda:0 to cuda:{n - 1})")
    return dev


def use_device(device: torch.device) -> None:
    """Make ``cuda:N`` the current device, so that what launches without naming a device
    (Triton kernels, CUDA events) runs there too. A bare ``cuda`` already is."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)


def _where(recipe, name: str) -> str:
    """``FILE:LINE`` of the recipe's function ``name`` (its ``def``), or the recipe's file."""
    code = getattr(getattr(recipe, name, None), "__code__", None)
    where = getattr(recipe, "__file__", None) or "recipe"
    return f"{where}:{code.co_firstlineno}" if code is not None and code.co_filename == where else where


def _metrics_problem(metrics) -> str | None:
    """What is wrong with a train_step's return value, or None (no device sync: shapes only)."""
    if not isinstance(metrics, Mapping):
        return f"it returned {type(metrics).__name__}"
    if "loss" not in metrics:
        return f"it returned the keys {sorted(map(str, metrics))[:8]}"
    for key, v in metrics.items():  # what the read-back takes: a real number (NumPy's too), or one element
        if not (isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1)):
            shown = f"a tensor of shape {list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            return f"{key!r} is {shown}"
    return None


def load_recipe(path: str | Path):
    """Import a recipe file by path as a fresh module (so two recipes never share state)."""
    path = Path(path)
    if path.is_dir():
        raise EclipError(f"{path}: a directory, not a recipe file")
    if not path.is_file():
        raise EclipError(f"{path}: recipe file not found")
    name = f"eclip_recipe_{abs(hash(str(path.resolve())))}_{time.monotonic_ns()}"
    # the loader named: without it a file whose name does not end in .py (recipe_v2, a .bak
    # copy) gets no spec at all
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    try:
        # compiled from the text the policy checked (``read_source``), not from the bytes: a
        # coding comment cannot make Python read another program than the one checked
        code = compile(read_source(path.read_bytes()), str(path), "exec", dont_inherit=True)
        exec(code, module.__dict__)
    except UnicodeDecodeError as e:
        raise EclipError(f"{path}: recipe is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except SyntaxError as e:
        raise EclipError(f"{path}:{e.lineno}: syntax error in recipe ({e.msg})") from None
    except Exception as e:  # a NameError, an import that fails, …: the recipe's line that raised
        if is_oom(e):  # memory exhausted at import: reported as oom like any other run
            raise
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        raise EclipError(f"{where}: recipe failed to import ({type(e).__name__}: {first_line(e)})") from None
    for attr in ("HPARAMS", "build_model", "build_optimizer", "train_step"):
        if not hasattr(module, attr):
            raise EclipError(f"{path}: recipe must define {attr}")
    if type(module.HPARAMS) is not dict or "batch_size" not in module.HPARAMS:
        # a dict exactly: a subclass's get() ran the recipe's code in the loop's set-up, before
        # any of its clocks started (30 s of hidden work stayed within the harness's slack)
        raise EclipError(f"{path}: HPARAMS must be a dict (a plain one, no subclass) with at least 'batch_size'")
    if (found := _not_plain(module.HPARAMS, "HPARAMS")) is not None:
        raise EclipError(f"{path}: {found[0]} is a {found[1]}: HPARAMS holds plain dicts (string keys), lists, "
                         "tuples, strings, numbers, bools and None (the loop calls their methods, and the "
                         "checkpoint saves them as JSON)")
    return module


PLAIN = (dict, list, tuple, str, int, float, bool, type(None))  # HPARAMS' types, exactly


def _not_plain(value, where: str) -> tuple[str, str] | None:
    """(path, type name) of the first value within ``value`` (``HPARAMS['model']``) whose type
    is not one of PLAIN itself (a subclass: its methods are the recipe's code), or of a dict key
    that is no str, or None."""
    stack, seen = [(value, where)], set()  # a walk, not recursion: any depth, and a dict holding itself
    while stack:
        v, at = stack.pop()
        if type(v) not in PLAIN:
            return at, type(v).__name__
        if type(v) in (dict, list, tuple) and id(v) not in seen:
            seen.add(id(v))
            if type(v) is dict and (bad := next((k for k in v if type(k) is not str), None)) is not None:
                return f"{at} key {bad!r}", f"{type(bad).__name__}, not a str"
            items = v.items() if type(v) is dict else enumerate(v)
            stack.extend((x, f"{at}[{k!r}]") for k, x in reversed(list(items)))
    return None


def _coerce(key: str, default, value):
    """Parse a command-line string like the default value of its option."""
    if not isinstance(value, str):
        return value
    if isinstance(default, dict):
        raise EclipError(f"--{key}={value}: {key} is a group of settings; set one with --{key}.<field>=value")
    low = value.lower()
    if isinstance(default, bool) or (default == "auto" and low in ("true", "false")):
        if low not in ("true", "false", "1", "0"):
            raise EclipError(f"--{key}={value}: expected true or false")
        return low in ("true", "1")
    try:
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            if not math.isfinite(x := float(value)):  # no training setting means "nan" or "inf"
                raise EclipError(f"--{key}={value}: expected a finite number")
            return x
    except ValueError:
        raise EclipError(f"--{key}={value}: expected {type(default).__name__}") from None
    return value


def apply_overrides(hparams: dict, overrides: dict[str, str]) -> dict:
    """Apply ``--key=value`` options to a recipe's HPARAMS in place, typed like the defaults.
    ``model.<field>`` keys go to ``HPARAMS["model"]`` (checked when the model is built)."""
    for key, value in overrides.items():
        if key.startswith("model."):
            hparams.setdefault("model", {})[key[6:]] = value
        elif key in hparams:
            hparams[key] = _coerce(key, hparams[key], value)
        else:
            raise EclipError(f"--{key}: unknown training option (known: {', '.join(sorted(hparams))}, model.<field>)")
    return hparams


def is_oom(e: BaseException) -> bool:
    """Out of memory, on any device: CUDA raises OutOfMemoryError, the CPU allocator a
    RuntimeError (or MemoryError from Python objects) once the address space is capped."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    # "cannot allocate memory": ENOMEM's text, e.g. safetensors' mmap of the cache under the cap
    return isinstance(e, RuntimeError) and any(
        s in msg for s in ("can't allocate memory", "cannot allocate memory", "out of memory"))


def eval_bf16(hparams: dict, device: torch.device) -> bool:
    """Whether the evaluation encodes under bf16 autocast: as the template trains (CUDA,
    precision auto or bf16)."""
    return device.type == "cuda" and hparams.get("precision", "auto") in ("auto", "bf16")


def _plain(emb, name: str) -> torch.Tensor:
    # type(), not isinstance(): a subclass's __torch_function__ would run inside the ranking
    # and could rig its comparisons
    if type(emb) is not torch.Tensor:
        raise EclipError(f"model.{name} returned a {type(emb).__name__}, not a plain torch.Tensor "
                         "(the evaluation ranks plain tensors)")
    # a copy: a model that kept a handle on what it returned could otherwise rewrite earlier
    # batches once it has seen the whole split
    return emb.to(torch.float32, copy=True)


def caption_length(tokens: torch.Tensor) -> int:
    """Tokens of the longest caption in ``tokens`` (int [C, L], 0 = padding), at least 1:
    what the evaluation cuts captions to (no padding that no caption uses)."""
    return max(1, int((tokens != 0).sum(1).max())) if tokens.numel() else 1


@torch.no_grad()
def encode_in_order(model, images: torch.Tensor | None, tokens: torch.Tensor | None, device: torch.device,
                    batch: int = 512, bf16: bool = False,
                    length: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Embeddings of ``images`` (uint8 [N, 3, R, R]) and of caption ``tokens`` (int [C, L],
    0 = padding), in the order given: (img fp32 [N, E], txt fp32 [C, E]) on the device; None
    for a part not given. Images and texts go in separate passes; the caller decides the
    orders (``evaluate_split`` and the harness shuffle them, so a model cannot tell which
    pairs it sees). Captions are cut to ``length`` tokens, by default ``caption_length``."""
    was_training = model.training
    model.eval()
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    img = txt = None
    if images is not None:
        img = []
        for s in range(0, images.shape[0], batch):
            with amp:
                img.append(_plain(model.encode_image(images[s: s + batch].to(device)), "encode_image"))
        img = torch.cat(img)
    if tokens is not None:
        length = caption_length(tokens) if length is None else length
        txt = []
        for s in range(0, tokens.shape[0], batch):
            t = tokens[s: s + batch, :length].to(device, torch.int64)
            with amp:
                txt.append(_plain(model.encode_text(t, t != 0), "encode_text"))
        txt = torch.cat(txt)
    model.train(was_training)
    return img, txt


def secret_order(n: int) -> torch.Tensor:
    """A permutation of ``n`` (int64) drawn from the operating system's entropy."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(secrets.randbits(63)))


def unshuffle(emb: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows encoded in ``order`` (row k of ``emb`` is item ``order[k]``) put back in place."""
    out = torch.empty_like(emb)
    out[order.to(emb.device)] = emb
    return out


def evaluate_split(model, cache: Cache, rows: torch.Tensor, device: torch.device,
                   batch: int = 512, bf16: bool = False) -> dict:
    """Rank the images of ``rows`` (image rows of the cache, ascending) and their captions
    with the model (``eclip.evaluate.retrieval_metrics``).

    Images and texts are encoded in separate passes, each in its own random order, and put
    back in place afterwards: a model cannot tell which pairs it sees together. The orders
    come from the operating system's entropy, not from the run's seed (a recipe knows that
    seed and could draw the same permutations); the metrics do not depend on them for a
    model that encodes each sample on its own. The harness does the same across processes."""
    split = cache.subset(rows)  # its captions, and each caption's image re-indexed from 0
    order_i, order_t = secret_order(split.images.shape[0]), secret_order(split.tokens.shape[0])
    img, txt = encode_in_order(model, split.images[order_i], split.tokens[order_t], device, batch, bf16)
    img, txt = unshuffle(img, order_i), unshuffle(txt, order_t)
    return retrieval_metrics(img, txt, split.caption_image.to(img.device))


def peak_memory_bytes(device: torch.device) -> int | None:
    """CUDA: the peak allocated since ``run_loop`` began; CPU: the process's peak resident
    set, which cannot be reset (with --folds, the largest so far)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except Exception:  # pragma: no cover - not on Linux
        return None


def schedule_progress(elapsed: float, origin: float | None, budget: float) -> float:
    """``progress`` handed to a budget run's ``train_step``: 0 until the first step has
    ended (at ``origin`` seconds of training), then the share of the rest of the budget
    that has passed. The clock that stops the run counts the first step (compilation: tens
    of seconds on a cold cache, a fifth of a 3-minute budget); a schedule on that clock
    would have spent its warm-up, and part of its decay, before the second step."""
    if origin is None:
        return 0.0
    if origin >= budget:
        return 1.0
    return min(1.0, max(0.0, (elapsed - origin) / (budget - origin)))


def check_loop_hparams(hp: dict) -> None:
    """The HPARAMS entries the loop itself reads (batch size, augmentation), checked before
    anything is built; the recipe checks its own."""
    bs = hp.get("batch_size")
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise EclipError(f"recipe: batch_size: expected an int >= 1, got {bs!r}")
    crop = hp.get("crop_scale", 1.0)
    if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
        raise EclipError(f"recipe: crop_scale: expected a number in (0, 1], got {crop!r}")
    if not isinstance(hp.get("flip", False), bool):
        raise EclipError(f"recipe: flip: expected true or false, got {hp.get('flip')!r}")


def run_loop(recipe, cache: Cache, train_rows: torch.Tensor, cfg: LoopConfig,
             resume_dir: Path | None = None, on_log=None, setup_s: float = 0.0, hold: dict | None = None) -> dict:
    """Train ``recipe`` on ``train_rows`` of ``cache`` until the budget or step count is spent.
    ``setup_s``: seconds the recipe's code already ran before this call (its import); with
    its ``build_model``, ``build_optimizer`` and ``load_recipe_state`` they count against the
    budget, so work done there (a warm-up compile) is not training outside the clock.

    Returns a dict with status (ok, diverged, oom, interrupted, aborted), steps, samples, timing, the
    last logged metrics and the trained ``model`` (plus ``optimizer`` and ``data`` for
    checkpointing, and ``cache`` as trained on: re-tokenized for a pretrained text tower, so
    evaluate with it). ``resume_dir`` holds a checkpoint to continue from, its meta checked
    for a resume by the caller (``eclip.checkpoint.check_meta``). ``hold``: a dict
    the loop's signal state is put in (``hold["stop"]``) once its handlers are installed,
    which then stay when it returns: a stop keeps being deferred while the caller writes
    the checkpoint, and the caller calls ``hold["stop"]["restore"]()`` (whether or not the
    loop returned)."""
    if (cfg.budget_s is None) == (cfg.steps is None):
        raise EclipError("give exactly one of a time budget (--budget-s) or a step count (--steps)")
    device = pick_device(cfg.device)
    use_device(device)
    if device.type == "cuda":  # this run's peak, not an earlier fold's
        torch.cuda.reset_peak_memory_stats(device)
    hp = recipe.HPARAMS
    check_loop_hparams(hp)
    torch.manual_seed(cfg.seed)
    if hp.get("text_tower"):  # a pretrained text tower reads its own tokenizer's ids (harness-side)
        from eclip.pretrained import retokenize

        cache = retokenize(cache, hp["text_tower"])
    data = DeviceData(cache, train_rows, device, seed=cfg.seed, crop_scale=float(hp.get("crop_scale", 1.0)),
                      flip=bool(hp.get("flip", False)), placement=cfg.data_placement)
    spec = ModelSpec(vocab_size=cache.vocab_size, context_length=cache.context_length,
                     phrase_length=int(cache.region_tokens.shape[1]), image_size=cache.image_size, device=device)
    t_build = time.perf_counter()
    try:
        model = recipe.build_model(spec)
    except ValueError as e:  # a bad HPARAMS entry or model field, from an override or the recipe
        raise EclipError(f"recipe: {e}") from None
    if not isinstance(model, torch.nn.Module):  # else the optimizer's build fails on it, in the recipe's code
        raise EclipError(f"{_where(recipe, 'build_model')}: build_model must return a torch.nn.Module, "
                         f"got {type(model).__name__}")
    built = getattr(getattr(getattr(model, "cfg", None), "text", None), "pretrained", "")
    if (built or "") != (hp.get("text_tower") or ""):  # the ids fed must be the tower's own
        raise EclipError(f"recipe: HPARAMS['text_tower'] is {hp.get('text_tower') or ''!r} but the model's text "
                         f"tower is {built or ''!r}; the loop tokenizes by HPARAMS, so set the tower there")
    optimizer = recipe.build_optimizer(model)
    setup_s += time.perf_counter() - t_build
    step, trained_s, samples = 0, 0.0, 0
    origin_s = None  # training seconds at the end of the run's first step (schedule_progress)
    expert_samples = 0  # becomes a device tensor once the recipe reports it
    if resume_dir is not None:
        # the optimizer keeps the settings of this run's HPARAMS and overrides (a --weight_decay
        # given with --resume applies); the state (moments, step counts) is the checkpoint's
        meta, tensors = load_checkpoint(resume_dir, model, optimizer)  # its meta checked by the caller
        step, trained_s, samples = int(meta["step"]), float(meta["trained_s"]), int(meta["samples"])
        origin_s = meta.get("schedule_origin_s", 0.0)  # older checkpoints: the whole clock
        origin_s = None if origin_s is None or step == 0 else float(origin_s)
        expert_samples = int(meta.get("expert_samples", 0))
        try:
            data.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("data_")}
                                 | {"cursor": meta["data_cursor"], "epoch": meta["data_epoch"]})
        except (KeyError, ValueError) as e:  # KeyError: a state tensor missing
            what = f"lacks state.data_{e.args[0]}" if isinstance(e, KeyError) else str(e)
            raise EclipError(f"{Path(resume_dir) / TENSORS}: {what}; it cannot be resumed") from None
        if hasattr(recipe, "load_recipe_state"):
            t_state = time.perf_counter()
            recipe.load_recipe_state({k[7:]: v for k, v in tensors.items() if k.startswith("recipe.")})
            setup_s += time.perf_counter() - t_state
        _restore_rng(tensors, device, resume_dir)  # last: the build and the recipe's state drew from it
    bs = int(hp["batch_size"])
    total = cfg.steps if cfg.steps is not None else None
    bar = tqdm(total=total if total else round(cfg.budget_s), initial=step if total else 0,
               unit="step" if total else "s", file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
               disable=True if not cfg.progress_bar else False if os.environ.get(PROGRESS_ENV) == "1" else None,
               desc="train")
    status, last, warmup_s, history, last_step_cpu_s = "ok", {}, None, [], None
    stop = install_stop()
    if hold is not None:  # the caller restores the handlers, once its checkpoint is written
        hold["stop"] = stop
    t0 = time.perf_counter()
    spent = cfg.budget_s is not None and trained_s >= cfg.budget_s  # a checkpoint with nothing left to train
    trained_s += setup_s  # this process's setup of the recipe is on the clock too
    start_trained = trained_s
    pending = []  # (step, metrics as device tensors) since the last log point
    readback = Readback(cfg.diverge_loss)  # no sync at log points: rows arrive one interval late

    def log(row: dict | None) -> None:
        nonlocal last
        if row is None:
            return
        last = {k: v for k, v in row.items() if k not in ("step", "elapsed_s", "samples")}
        history.append(row)
        if on_log is not None:
            on_log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", scale=f"{row.get('logit_scale', float('nan')):.1f}",
                        sps=f"{row['samples'] / max(row['elapsed_s'], 1e-9):.0f}")
        bar.n = row["step"] if total else min(round(row["elapsed_s"]), bar.total)
        bar.refresh()

    def mark() -> dict:
        """What a row pushed now is logged with: the step, the clock, the samples so far."""
        elapsed = start_trained + (time.perf_counter() - t0)
        return {"step": step, "elapsed_s": round(elapsed, 3), "samples": samples}

    def drain() -> None:
        """At the end of the run: log the row in flight, then check and log the steps not
        yet pushed, as one row at the last step (raises Diverged)."""
        log(readback.flush())
        if not pending:
            return
        readback.push(pending, mark())  # nothing in flight any more: returns None
        log(readback.flush())

    try:
        while True:
            elapsed = start_trained + (time.perf_counter() - t0)
            if cfg.steps is not None:
                progress = step / cfg.steps
                if progress >= 1.0:
                    break
            else:
                if elapsed >= cfg.budget_s and (warmup_s is not None or spent):
                    break  # else a first step: a setup past the budget is the harness's to judge (an overrun)
                progress = schedule_progress(elapsed, origin_s, cfg.budget_s)
            if stop["requested"]:
                raise KeyboardInterrupt
            before = data.snapshot()  # a step cut short by an exception gives its batch back
            batch = data.sample(bs)
            cpu0 = time.process_time()
            try:
                metrics = recipe.train_step(model, optimizer, batch, min(progress, 1.0))
            except KeyboardInterrupt:
                data.restore(before)
                raise
            if problem := _metrics_problem(metrics):
                raise EclipError(f"{_where(recipe, 'train_step')}: train_step must return a dict of numbers or "
                                 f"one-element tensors with a 'loss'; {problem}")
            # CPU time of the step's call (all threads): the harness tells a last step that
            # overran the budget because the machine was busy from one that did more work
            last_step_cpu_s = time.process_time() - cpu0
            step += 1
            samples += bs
            if "expert_samples" in metrics:  # summed on the device: no sync per step
                expert_samples = expert_samples + metrics["expert_samples"]
            if warmup_s is None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                warmup_s = time.perf_counter() - t0
                if origin_s is None:
                    origin_s = start_trained + warmup_s
            pending.append((step, metrics))
            if step % cfg.log_every == 0 or step == 1:
                log(readback.push(pending, mark()))
                pending = []
        drain()
    except Diverged as e:
        status, last = "diverged", dict(last, reason=str(e))
    except KeyboardInterrupt:
        status = "aborted" if stop.get("hard") else "interrupted"
        try:  # the losses not yet read back still decide whether the run diverged
            drain()
        except Diverged as e:
            status, last = "diverged", dict(last, reason=str(e))
    except Exception as e:
        if not is_oom(e):
            raise
        try:  # the row in flight is logged, and a loss that diverged before the OOM says so
            drain()
            status, last = "oom", dict(last, reason=first_line(e, 200))
        except Diverged as d:
            status, last = "diverged", dict(last, reason=str(d))
    finally:
        bar.close()
        if hold is None:
            stop["restore"]()
        data.close()  # the batches prefetched beyond the last step are not part of the state
    stop["after"] = "the checkpoint is written"  # what a stop now waits for (hold)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    trained_s = start_trained + (time.perf_counter() - t0)
    return {"status": status, "steps": step, "samples": samples, "train_s": trained_s, "setup_s": setup_s,
            "expert_samples": int(expert_samples),
            "warmup_s": warmup_s, "schedule_origin_s": origin_s, "last_step_cpu_s": last_step_cpu_s, "last": last, "history": history,
            "model": model,
            "optimizer": optimizer, "data": data, "device": device, "spec": spec, "cache": cache}


def finite(obj):
    """``obj`` with every float that is NaN or infinite (a diverged loss, a recipe's metric)
    replaced by None, through dicts, lists and tuples: Python's json writes them as bare
    ``NaN``/``Infinity``, which is no JSON, and strict readers (jq, JavaScript) refuse the file."""
    return map_json(obj, lambda v: None if isinstance(v, float) and not math.isfinite(v) else v)


def _restore_rng(tensors: dict, device: torch.device, resume_dir: Path) -> None:
    """Put torch's global generators back as the checkpoint saved them (``torch_rng``, and
    ``torch_cuda_rng`` from a CUDA run resumed on one); a checkpoint from before they were
    saved, and a CPU run's resumed on CUDA for the CUDA generator, continue from the seed."""
    restores = {"torch_rng": torch.set_rng_state}
    if device.type == "cuda":  # a CUDA run's resumed on a CPU: no CUDA generator to put back
        restores["torch_cuda_rng"] = lambda t: torch.cuda.set_rng_state(t, device)
    for key, restore in restores.items():
        if key not in tensors:
            continue
        try:
            restore(tensors[key])
        except (RuntimeError, TypeError) as e:  # a damaged state: another size or dtype
            raise EclipError(f"{Path(resume_dir) / TENSORS}: state.{key} cannot be restored ({first_line(e, 120)}); "
                             "it cannot be resumed") from None


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (temp file, then rename), a non-finite number as null."""
    atomic_write(path, lambda p: p.write_text(json.dumps(finite(obj), indent=2, default=str, allow_nan=False) + "\n"))
