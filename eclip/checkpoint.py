"""Checkpoints: tensors in safetensors, everything else in a JSON beside them.

``checkpoint.safetensors`` holds ``model.<name>`` (the state dict), ``optim.<i>.<key>`` (the
optimizer's per-parameter state, i = parameter position in its param groups) and
``state.<name>`` (generator states and other loop tensors). ``checkpoint.json`` holds the
step, elapsed training time, hyperparameters, the model config, the optimizer's group
settings and the fingerprint of the cache it was trained on.

The same JSON text is also stored in the tensors file's header (metadata ``eclip.meta``),
and that copy is the one read back: the tensors file is written to a temporary file and
renamed, so its tensors and its metadata always come from one save. Two files cannot be
renamed at once; a process killed between the two renames would otherwise pair new tensors
with the previous save's step, clock and optimizer settings. ``checkpoint.json`` is written
second, for people and tools; checkpoints written before the header copy are read from it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from eclip.errors import EclipError, first_line
from eclip.fileio import atomic_write, read_tensors

TENSORS, META = "checkpoint.safetensors", "checkpoint.json"
HEADER_KEY = "eclip.meta"  # the meta JSON in the tensors file's metadata


def save_checkpoint(out: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, torch.Tensor], meta: dict) -> float:
    """Write the checkpoint; returns the seconds spent writing the files (not gathering the
    tensors, which runs the model's and optimizer's own code: the loop times that apart)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    for k, v in model.state_dict().items():
        # the strides too: a transposed view of a square weight has its storage, offset and shape
        key = ((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
               if v.numel() else None)
        if key is not None and key in seen:  # tied weights: stored once, the alias noted
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    scalars = {}
    for pid, st in opt["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = v
    for k, v in state.items():
        tensors[f"state.{k}"] = v.detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in opt["param_groups"]]
    meta = dict(meta, optimizer={"param_groups": groups, "scalars": scalars}, aliases=aliases)
    text = json.dumps(meta, indent=2, default=list) + "\n"
    from safetensors import SafetensorError

    t0 = time.perf_counter()
    try:
        atomic_write(out / TENSORS, lambda p: save_file(tensors, str(p), metadata={HEADER_KEY: text}))
        atomic_write(out / META, lambda p: p.write_text(text))
    except (SafetensorError, OSError) as e:  # a full disk: safetensors' I/O errors are no OSError
        said = (e.strerror or str(e)) if isinstance(e, OSError) else first_line(e, 300)
        raise EclipError(f"{out / TENSORS}: cannot write the checkpoint ({said}); the previous one, if any, "
                         "is as it was") from None
    return time.perf_counter() - t0


def read_meta(ckpt_dir: str | Path) -> dict:
    """The checkpoint's meta: from the tensors file's header (saved with the tensors it
    describes), else from ``checkpoint.json`` (a checkpoint older than the header copy)."""
    return read_meta_from(ckpt_dir)[0]


def read_meta_from(ckpt_dir: str | Path) -> tuple[dict, Path]:
    """(the checkpoint's meta, the file it was read from): errors about the meta name that file."""
    from safetensors import SafetensorError, safe_open

    if Path(ckpt_dir).is_file():  # checkpoint.safetensors given for its folder
        raise EclipError(f"{ckpt_dir}: a file; a checkpoint is named by its run directory "
                         f"(the folder holding {TENSORS} and {META})")
    tensors = Path(ckpt_dir) / TENSORS
    text, path = None, Path(ckpt_dir) / META
    if tensors.is_file():
        try:
            with safe_open(str(tensors), "pt") as f:  # the header only
                text = (f.metadata() or {}).get(HEADER_KEY)
        except (SafetensorError, OSError) as e:
            raise EclipError(f"{tensors}: unreadable ({first_line(e)})") from None
        path = tensors if text is not None else path
    try:
        meta = json.loads(text if text is not None else path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EclipError(f"{path}: no checkpoint here") from None
    except json.JSONDecodeError as e:
        raise EclipError(f"{path}: unreadable checkpoint metadata ({e.msg})") from None
    except UnicodeDecodeError:  # a damaged file: its bytes are not text
        raise EclipError(f"{path}: unreadable checkpoint metadata (not UTF-8 text)") from None
    if not isinstance(meta, dict):
        raise EclipError(f"{path}: unreadable checkpoint metadata (not a JSON object)")
    check_meta(meta, path)
    return meta, path


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


# a field of the meta, what it must be when present (None allowed where the loop reads it so),
# and whether a resume needs it: an edited or damaged header once failed with a traceback in
# the loop, or trained silently wrong (a negative step wiped the metrics log; a NaN clock
# never reached the budget)
META_FIELDS = {
    "step": (_count, "a count (an integer, 0 or more)", False, True),
    "samples": (_count, "a count (an integer, 0 or more)", False, True),
    "trained_s": (_seconds, "seconds (a finite number, 0 or more)", False, True),
    "data_cursor": (_count, "a count (an integer, 0 or more)", False, True),
    "data_epoch": (_count, "a count (an integer, 0 or more)", False, True),
    "schedule_origin_s": (_seconds, "seconds (a finite number, 0 or more) or null", True, False),
    "expert_samples": (_count, "a count (an integer, 0 or more)", False, False),
    "hparams": (lambda v: isinstance(v, dict), "an object", False, False),
    "model_config": (lambda v: isinstance(v, dict), "an object", False, False),
    "aliases": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in (*v, *v.values())),
                "an object of names", False, False),
    "data_placement": (lambda v: v in ("auto", "device", "host"), "auto, device or host", False, False),
    "steps_requested": (_count, "a count (an integer, 0 or more) or null", True, False),
    "budget_requested_s": (_seconds, "seconds (a finite number, 0 or more) or null", True, False),
}


def check_meta(meta: dict, source: Path, resume: bool = False) -> None:
    """One-line errors for a meta field of the wrong type or range (``META_FIELDS``), and
    with ``resume`` for a field a resume needs that is missing."""
    for name, (ok, what, nullable, needed) in META_FIELDS.items():
        if name not in meta:
            if resume and needed:
                raise EclipError(f"{source}: checkpoint metadata lacks {name!r}, which a resume needs")
            continue
        v = meta[name]
        if not (ok(v) or (nullable and v is None)):
            raise EclipError(f"{source}: checkpoint metadata has {name} = {json.dumps(v, default=str)[:80]}, "
                             f"expected {what}")


# Model config fields that shape no weight and no forward pass: the expert term's schedule
# and heatmap settings, and the logit scale's initial value. A resume may change them, as it
# may change the learning rate.
SCHEDULE_FIELDS = frozenset({"expert.weight", "expert.probability", "expert.cold_start", "expert.ramp",
                             "expert.cool_down", "expert.mixup_alpha", "expert.min_sigma", "expert.sigma_scale",
                             "logit_scale_init"})


def _first_difference(saved, current, prefix: str = "") -> tuple[str, object, object] | None:
    """The first dotted field of ``saved`` whose value ``current`` does not share, skipping
    SCHEDULE_FIELDS (fields a checkpoint predates are not compared): (field, saved, current)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(saved):
            if f"{prefix}{key}" in SCHEDULE_FIELDS:
                continue
            diff = _first_difference(saved[key], current.get(key), f"{prefix}{key}.")
            if diff is not None:
                return diff
        return None
    return None if saved == current else (prefix[:-1], saved, current)


def check_model_config(source: Path, meta: dict, model: torch.nn.Module,
                       hint: str = "resume with the same model settings") -> None:
    """Refuse a checkpoint whose model config differs from ``model``'s in a field that
    shapes the model: weights of matching shapes can still belong to another model (heads,
    norms, pooling, scale bounds). ``source``: the file ``meta`` was read from; ``hint``
    what to do, in the caller's terms."""
    saved, cfg = meta.get("model_config"), getattr(model, "cfg", None)
    if saved is None or not hasattr(cfg, "to_dict"):
        return
    current = json.loads(json.dumps(cfg.to_dict(), default=list))  # tuples as JSON lists, like saved
    diff = _first_difference(saved, current)
    if diff is not None:
        field, old, new = diff
        raise EclipError(f"{source}: checkpoint has model {field} = {old!r}, this run {new!r} ({hint})")


# per-parameter state that has its parameter's shape (Adam's moments, SGD's momentum): one
# of another shape belongs to another parameter (a recipe that lists its parameters in
# another order), and the fused update would read past its end
PARAM_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})


def _optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict, optimizer: torch.optim.Optimizer,
                     source: Path) -> dict:
    """The optimizer's state dict from the checkpoint's ``optim.<pid>.<key>`` tensors and its
    ``scalars``, each checked against the parameter it is for (``PARAM_SHAPED``)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict = {}
    items = [(k[6:], v) for k, v in tensors.items() if k.startswith("optim.")] + list(scalars.items())
    for name, v in items:
        pid, _, key = name.partition(".")
        if not pid.isdigit() or not key or int(pid) >= len(params):
            raise EclipError(f"{source}: the checkpoint's optimizer state names {name!r}, no parameter of this "
                             f"optimizer's {len(params)}")
        shape = tuple(params[int(pid)].shape)
        # torch's own optimizers only: another's may keep these names in other shapes (low rank)
        if (key in PARAM_SHAPED and type(optimizer).__module__.startswith("torch.optim")
                and isinstance(v, torch.Tensor) and tuple(v.shape) != shape):
            raise EclipError(f"{source}: the checkpoint's optimizer state {key} of parameter {pid} has shape "
                             f"{list(v.shape)}, the parameter {list(shape)} (a recipe listing its parameters in "
                             "another order, or another model)")
        state.setdefault(int(pid), {})[key] = v  # load_state_dict moves it where it belongs
    return state


def load_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model (and optimizer state; the optimizer keeps its own group settings) in
    place; returns (meta, loop state tensors). A checkpoint of another model config is
    refused (``EclipError`` naming the field)."""
    ckpt_dir = Path(ckpt_dir)
    meta, source = read_meta_from(ckpt_dir)
    check_model_config(source, meta, model, "resume with the same model settings" if optimizer is not None
                       else "build the model with the settings it was trained with")
    # the weights alone when there is no optimizer to restore (an evaluation)
    tensors = read_tensors(ckpt_dir / TENSORS, prefix=None if optimizer is not None else "model.")
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    for alias, name in meta.get("aliases", {}).items():
        if name not in weights:  # edited or foreign metadata: a KeyError would say nothing of where
            raise EclipError(f"{source}: checkpoint alias {alias!r} names no stored weight {name!r}")
        weights[alias] = weights[name]
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise EclipError(f"{ckpt_dir / TENSORS}: checkpoint does not fit this model ({first})") from None
    if optimizer is not None:
        saved = meta.get("optimizer")
        if not (isinstance(saved, dict) and isinstance(saved.get("param_groups"), list)
                and isinstance(saved.get("scalars"), dict)):
            raise EclipError(f"{source}: checkpoint has no optimizer state (optimizer.param_groups and "
                             "optimizer.scalars): it holds weights only and cannot be resumed")
        sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None
                 for g in saved["param_groups"]]
        own_sizes = [len(g["params"]) for g in optimizer.param_groups]
        if sizes != own_sizes:  # before any state is matched to a parameter by its place
            said = ("a parameter group without its list of parameters" if None in sizes else
                    f"{len(sizes)} parameter groups of {sizes} parameters, this optimizer's {len(own_sizes)} "
                    f"of {own_sizes}")
            raise EclipError(f"{source}: the checkpoint's optimizer state does not fit this optimizer ({said})")
        state = _optimizer_state(tensors, saved["scalars"], optimizer, source)
        # load_state_dict also puts the saved group settings back (weight decay, betas, ...);
        # the optimizer's own, built for this run, win: a resume takes the state only
        own = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        except (ValueError, KeyError) as e:  # another optimizer's groups or parameters
            raise EclipError(f"{source}: the checkpoint's optimizer state does not fit this optimizer "
                             f"({first_line(e)})") from None
        for group, settings in zip(optimizer.param_groups, own, strict=True):
            group.update(settings)
    loop_state = {k[6:]: v for k, v in tensors.items() if k.startswith("state.")}
    return meta, loop_state
