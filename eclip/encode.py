"""``python -m eclip.encode``: the embeddings of a trained checkpoint, computed in a process
that holds the checkpoint and the inputs it is given, and nothing else.

    python -m eclip.encode --recipe R --checkpoint RUN --inputs IN.safetensors --out EMB.safetensors

The harness's second step, after ``eclip.train --train-only``. It imports the recipe, sets
the hyperparameters the checkpoint was trained with, seeds torch with the run's seed,
builds the model with the recipe's ``build_model`` for the shapes the inputs name and loads
the checkpoint's weights (a checkpoint of another model is refused); nothing else of the
checkpoint (no ``load_recipe_state``: embeddings need the weights only). It then encodes the
inputs in the order given. The harness runs three of these at once: one for the scored
split's images and one for its captions, each in an order drawn from the operating
system's entropy, with neither the pairs nor the cache's path, so that no process that
is ranked holds both sides and whatever one does changes its own embeddings only; and
one for the batch check, which encodes a few of each in pairs (``--batch 2``) and whose
embeddings are only compared with theirs, never ranked. The harness puts them back in
place and ranks them itself; the score is, by construction, the score of the saved
checkpoint.

Inputs (safetensors): ``images`` uint8 [N, 3, R, R] and/or ``tokens`` integer [C, L] (0 =
padding); metadata ``vocab_size``, ``context_length``, ``phrase_length``, ``image_size``
(what the training run's data dictated). Output (safetensors, written atomically): ``img``
float32 [N, E] and/or ``txt`` float32 [C, E], rows in the inputs' order.
Exit codes: 0 ok, 1 out of memory, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

from eclip import checkpoint as ckpt
from eclip.errors import EclipError, OneLineParser, first_line
from eclip.fileio import atomic_write, read_tensors
from eclip.loop import (
    ModelSpec,
    caption_length,
    encode_in_order,
    eval_bf16,
    is_oom,
    load_recipe,
    pick_device,
    use_device,
)

READY = "encode: ready"  # the line --signal-ready prints
SPEC_KEYS = ("vocab_size", "context_length", "phrase_length", "image_size")  # the inputs' metadata


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m eclip.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", type=Path, required=True, help="the recipe file the checkpoint was trained with")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="run directory holding checkpoint.safetensors and checkpoint.json")
    p.add_argument("--inputs", type=Path, required=True,
                   help="safetensors with images uint8 [N,3,R,R] and/or tokens [C,L], and the metadata "
                        "vocab_size, context_length, phrase_length, image_size (the training data's)")
    p.add_argument("--out", type=Path, required=True, help="where the embeddings go (safetensors: img, txt)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch", type=int, default=512, help="images or captions per forward pass")
    p.add_argument("--text-length", type=int, default=None,
                   help="cut the captions to this many tokens (default: the longest caption given); the harness "
                        "encodes a few captions again with the split's length, so their padding is the same")
    p.add_argument("--signal-ready", action="store_true",
                   help=f"print {READY!r} once started (imports, inputs, device) and before the recipe is "
                        "imported: the harness times what follows")
    return p


def write_inputs(path: Path, images: torch.Tensor | None, tokens: torch.Tensor | None, spec: dict[str, int]) -> None:
    """The inputs file ``main`` reads (the harness writes it), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in (("images", images), ("tokens", tokens)) if v is not None}
    meta = {k: str(int(spec[k])) for k in SPEC_KEYS}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def read_inputs(path: Path) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, int]]:
    """(images uint8 [N,3,R,R] or None, tokens [C,L] or None, spec numbers), checked; one-line errors."""
    from safetensors import safe_open

    tensors = read_tensors(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    spec = {}
    for key in SPEC_KEYS:
        if key not in meta:
            raise EclipError(f"{path}: metadata {key}: missing (an inputs file carries the training "
                             f"data's {', '.join(SPEC_KEYS)})")
        try:
            spec[key] = int(meta[key])
        except ValueError:
            raise EclipError(f"{path}: metadata {key}: expected an integer, got {meta[key]!r}") from None
    images, tokens = tensors.get("images"), tensors.get("tokens")
    if images is None and tokens is None:
        raise EclipError(f"{path}: holds neither images nor tokens")
    for name, t in (("images", images), ("tokens", tokens)):
        if t is not None and t.dim() > 0 and t.shape[0] == 0:
            raise EclipError(f"{path}: {name}: no rows to encode")
    r = spec["image_size"]
    if images is not None and (images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, r, r)):
        raise EclipError(f"{path}: images: expected uint8 [N, 3, {r}, {r}], got {images.dtype} {list(images.shape)}")
    if tokens is not None and (tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64)):
        raise EclipError(f"{path}: tokens: expected int32 or int64 [C, L], got {tokens.dtype} {list(tokens.shape)}")
    if tokens is not None and tokens.numel():  # what the model would index out of range or refuse, in a traceback
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= spec["vocab_size"]:
            raise EclipError(f"{path}: tokens: ids must lie in 0..{spec['vocab_size'] - 1} (metadata vocab_size "
                             f"{spec['vocab_size']}), got {low}..{high}")
        if (longest := caption_length(tokens)) > spec["context_length"]:
            raise EclipError(f"{path}: tokens: a caption of {longest} tokens, longer than metadata context_length "
                             f"{spec['context_length']}")
    return images, tokens, spec


def hparams_of(recipe, meta: dict, source: Path) -> None:
    """Set the recipe's HPARAMS to those the checkpoint was trained with (its ``--key=value``
    overrides included), comparing through JSON since that is how they were saved.
    ``source``: the file ``meta`` was read from."""
    saved = meta.get("hparams")
    if not isinstance(saved, dict):
        raise EclipError(f"{source}: no hparams recorded")
    for key, value in saved.items():
        if json.dumps(recipe.HPARAMS.get(key), default=list) != json.dumps(value):
            recipe.HPARAMS[key] = value


def encode_checkpoint(recipe_path: Path, run_dir: Path, inputs: Path, device_name: str = "auto",
                      batch: int = 512, signal_ready: bool = False,
                      text_length: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(img fp32 [N, E], txt fp32 [C, E]) of the inputs under the checkpoint in ``run_dir``,
    on the CPU; None for a part the inputs do not hold."""
    if batch < 1:
        raise EclipError(f"--batch {batch}: must be at least 1")
    images, tokens, numbers = read_inputs(inputs)
    if text_length is not None and tokens is not None:
        longest = caption_length(tokens)
        if not longest <= text_length <= tokens.shape[1]:
            raise EclipError(f"--text-length {text_length}: must be between the longest caption given ({longest}) "
                             f"and the inputs' {tokens.shape[1]} tokens")
    meta, source = ckpt.read_meta_from(run_dir)
    device = pick_device(device_name)
    use_device(device)
    torch.empty(1, device=device).sum().item()  # the device's context exists: its start-up is done
    hp = meta.get("hparams") if isinstance(meta.get("hparams"), dict) else {}  # hparams_of says what is wrong
    for key, library in (("text_tower", "transformers"), ("image_tower", "timm")):
        if hp.get(key):  # a pretrained tower's library is start-up too (seconds to import)
            try:
                importlib.import_module(library)
            except ImportError:
                pass  # build_model says what is missing
    seed = meta.get("seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool):  # a damaged record
        raise EclipError(f"{source}: seed: expected an integer, got {seed!r}")
    if signal_ready:  # from here on, the time is the recipe's (its import, build, weights, encoding)
        print(READY, flush=True)
    # seeded as training seeded it before importing the recipe: what its module code draws
    # (a fixed random projection) is the same in the training process and in each encoding
    # one, whose images and texts would otherwise meet different draws
    torch.manual_seed(seed)
    recipe = load_recipe(recipe_path)
    hparams_of(recipe, meta, source)
    torch.manual_seed(seed)  # as training seeded it before build_model
    spec = ModelSpec(vocab_size=numbers["vocab_size"], context_length=numbers["context_length"],
                     phrase_length=numbers["phrase_length"], image_size=numbers["image_size"], device=device)
    try:
        model = recipe.build_model(spec)
    except ValueError as e:
        raise EclipError(f"recipe: {e}") from None
    ckpt.load_checkpoint(run_dir, model, None)
    img, txt = encode_in_order(model, images, tokens, device, batch, eval_bf16(recipe.HPARAMS, device),
                               text_length)
    return (img.cpu() if img is not None else None), (txt.cpu() if txt is not None else None)


def save_embeddings(path: Path, img: torch.Tensor | None, txt: torch.Tensor | None) -> None:
    """img fp32 [N, E] and/or txt fp32 [C, E] (``encode_in_order`` made them fp32), atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in (("img", img), ("txt", txt)) if v is not None}
    try:
        atomic_write(path, lambda p: save_file(tensors, str(p)))
    except SafetensorError as e:  # its I/O errors (a full disk) are not OSErrors
        raise EclipError(f"{path}: cannot write ({first_line(e)})") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        img, txt = encode_checkpoint(args.recipe, args.checkpoint, args.inputs, args.device, args.batch,
                                     args.signal_ready, args.text_length)
        save_embeddings(args.out, img, txt)
    except EclipError as e:
        print(f"encode: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"encode: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("encode: interrupted (no embeddings written)", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_oom(e):
            raise
        print(f"encode: error: out of memory ({first_line(e, 200)})", file=sys.stderr)
        return 1
    done = [f"{t.shape[0]} {what}" for t, what in ((img, "images"), (txt, "captions")) if t is not None]
    print(f"encode: {', '.join(done)} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
