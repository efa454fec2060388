"""The training recipe template: the choices a researcher (or the research loop) tunes.

The training loop in ``eclip.loop`` (the referee) imports a recipe file by path and uses
exactly this contract:

- ``HPARAMS``: one literal dict. The loop reads ``batch_size`` (it samples batches of that
  size on the device), ``crop_scale`` and ``flip`` (its augmentation); everything else is
  the recipe's own. ``--key=value`` options of ``eclip.train`` override entries before
  anything is built.
- ``build_model(spec) -> nn.Module`` with ``encode_image(images)`` and
  ``encode_text(tokens, mask)`` returning embeddings the loop ranks; ``spec`` carries what
  the data dictates (``vocab_size``, ``context_length``, ``image_size``, ``phrase_length``)
  and the ``device``. Through the harness the embeddings come from the saved checkpoint:
  another process calls ``build_model`` with the same HPARAMS and loads the model's
  ``state_dict``, nothing else (``load_recipe_state`` is for resuming training only), so
  what the encoders depend on must live there.
- ``build_optimizer(model) -> torch.optim.Optimizer``.
- ``train_step(model, optimizer, batch, progress) -> dict``: one full step (forward, loss,
  backward, optimizer step, schedule as a function of ``progress`` ∈ [0, 1]: step / steps,
  or with a time budget 0 during the first step and then the share of the budget left after
  it that has passed, so compilation does not use up the warm-up); returns 0-d
  tensors to log (at least ``loss``), which the loop reads only every few steps so the
  device is never made to wait; ``expert_samples`` (samples the expert path encoded), returned
  on the steps that ran it, is summed over the run for the MFU.

Each research workspace copies this file once and edits only its copy. It is a strong
baseline, not a toy: bf16 autocast, ``torch.compile`` and fused AdamW on CUDA, the fused
contrastive loss; fp32 and fused AdamW without compilation on CPU.
"""

import math

import torch

import kernels
from eclip import expert as expert_mod
from eclip.model import build_model as _build_model
from eclip.model import model_config
from eclip.towers import Block

HPARAMS = {
    "preset": "tiny",  # model size (eclip.model.PRESETS): tiny, vit-s16, vit-b16
    "model": {},  # overrides of model config fields, e.g. {"vision.depth": 6}
    "image_tower": "",  # "" (the preset's ViT) or "timm:NAME[@FILE|@random]" (eclip.pretrained)
    "text_tower": "",  # "" (the preset's transformer) or "hf:NAME_OR_DIR"; the loop re-tokenizes for it
    "batch_size": 64,  # samples per step (read by the loop); more steps beat bigger batches on CPU
    "lr": 1e-3,  # peak AdamW learning rate (60 s CPU runs: 1e-3 → mean rank 21, 2e-3 → 71, 5e-3 → 269)
    "min_lr_ratio": 0.05,  # final LR as a fraction of the peak (cosine decay)
    "warmup": 0.05,  # fraction of training spent on the linear LR warm-up
    "weight_decay": 0.1,  # AdamW decay on matrices only (not norms, biases, logit scale)
    "beta1": 0.9,  # AdamW first-moment decay
    "beta2": 0.98,  # AdamW second-moment decay (CLIP's; 0.999 is slower to adapt)
    "eps": 1e-6,  # AdamW epsilon
    "grad_clip": 1.0,  # max global gradient norm (0 = off)
    "crop_scale": 1.0,  # random resized crop: min area kept (1.0 = off, since captions name positions; read by the loop)
    "flip": False,  # horizontal flips; off since captions name left and right (read by the loop)
    # eCLIP expert term (region heatmaps). Off: in 60 s CPU runs on the built-in data it never
    # paid for its steps (mean rank 26.6 ± 5 over 5 runs without it; 28.4 over 3 runs with
    # weight 0.25 and probability 0.25; 44 with the defaults below).
    "expert": False,
    "expert_weight": 0.5,  # weight of the expert term at full schedule
    "expert_probability": 0.5,  # chance per step that the expert term is computed
    "expert_cold_start": 0.1,  # fraction of training before the expert term starts
    "expert_ramp": 0.1,  # fraction over which its weight rises to expert_weight
    "precision": "auto",  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    "compile": "auto",  # "auto" (on for CUDA, off for CPU), True, False
    # torch.compile mode: "reduce-overhead" replays the step's forward and backward as CUDA
    # graphs (one launch each instead of hundreds: small batches are launch-bound; H100,
    # ViT-S/16, batch 64: 3,916 samples/s against 1,852 with "default"); "max-autotune" adds
    # GEMM autotuning to that; "max-autotune-no-cudagraphs"; "auto": "reduce-overhead" when
    # the whole step is compiled on CUDA, else "default" (graphs per block would replay
    # between eager code, and a CPU has no graphs)
    "compile_mode": "auto",
    # what torch.compile covers: "step" (both towers and the loss, forward and backward: one
    # graph) or "blocks" (each transformer block of the preset towers on its own; identical
    # blocks share one compiled graph, so the first step compiles ~3× faster — ViT-S/16 on
    # a CPU: 13 s instead of 41 s — and a change of depth hits the cache; the rest runs eager)
    "compile_scope": "step",
    "loss_mode": "auto",  # fused loss mode: "auto", "lean" (O(B·D) memory) or "fast"
    "expert_seed": 0,  # seed of the expert-term draws and mixup (the loop seeds the rest: --seed)
}

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("step", "blocks")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs


def resolve_compile_mode(mode: str, scope: str, device_type: str) -> str:
    """``compile_mode`` as torch.compile gets it: "auto" is "reduce-overhead" for a compiled
    step on CUDA and "default" otherwise; any other mode is itself."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if scope == "step" and device_type == "cuda" else "default"


_STATE = {}  # per-process state that is not a tensor of the model (compiled fns, generators)
MIX_SEED_OFFSET = 7919  # mixup's stream: expert_seed + this, apart from the draws' expert_seed


def _on_cuda(model) -> bool:
    return next(model.parameters()).is_cuda


def _use_bf16(model) -> bool:
    p = HPARAMS["precision"]
    return p == "bf16" or (p == "auto" and _on_cuda(model))


def _check_hparams():
    """One-line errors naming the entry, before anything is built (the loop reports a
    ValueError from build_model as a bad recipe, exit 2)."""
    def number(key, lo, hi, lo_open=False, hi_open=False):
        v = HPARAMS[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise ValueError(f"{key}: expected a finite number in {span}, got {v!r}")

    number("lr", 0, math.inf, lo_open=True, hi_open=True)
    number("min_lr_ratio", 0, 1)
    number("warmup", 0, 1, hi_open=True)
    number("weight_decay", 0, math.inf, hi_open=True)
    number("beta1", 0, 1, hi_open=True)
    number("beta2", 0, 1, hi_open=True)
    number("eps", 0, math.inf, lo_open=True, hi_open=True)
    number("grad_clip", 0, math.inf, hi_open=True)
    seed, lo, hi = HPARAMS["expert_seed"], -(2**63), 2**64 - 1 - MIX_SEED_OFFSET  # torch's seed range, both streams
    if not isinstance(seed, int) or isinstance(seed, bool) or not lo <= seed <= hi:
        raise ValueError(f"expert_seed: expected an int in [{lo}, {hi}], got {seed!r}")
    for key, allowed in (("precision", ("auto", "bf16", "fp32")), ("compile", ("auto", True, False)),
                         ("loss_mode", kernels.contrastive.MODES)):
        if HPARAMS[key] not in allowed:
            raise ValueError(f"{key}: expected one of {', '.join(map(str, allowed))}, got {HPARAMS[key]!r}")


# Model config fields set from HPARAMS entries of their own, as (entry, type; None: as
# given, "" when absent); naming one under "model" too would be overwritten without a word,
# so that is refused.
OWNED_FIELDS = {"vision.pretrained": ("image_tower", None), "text.pretrained": ("text_tower", None),
                "expert.enabled": ("expert", bool), "expert.weight": ("expert_weight", float),
                "expert.probability": ("expert_probability", float),
                "expert.cold_start": ("expert_cold_start", float), "expert.ramp": ("expert_ramp", float)}


def build_model(spec):
    _check_hparams()
    overrides = dict(HPARAMS["model"])
    for key, field in (("preset", None), ("image_size", "vision.image_size"), ("vocab_size", "text.vocab_size"),
                       ("context_length", "text.context_length")):
        if key in overrides:  # model_config's own arguments: passed on as overrides, a TypeError
            hint = f"did you mean model.{field}?" if field else "the preset is the recipe entry 'preset'"
            raise ValueError(f"model.{key}: unknown model config field ({hint})")
    for field, (entry, cast) in OWNED_FIELDS.items():
        if field in overrides:
            raise ValueError(f"model.{field}: set by the recipe entry {entry!r} (use --{entry}=...)")
        overrides[field] = HPARAMS.get(entry, "") if cast is None else cast(HPARAMS[entry])
    # the text tower reads captions and, on the expert path, region phrases: room for the longer
    length = max(spec.context_length, spec.phrase_length) if HPARAMS["expert"] else spec.context_length
    cfg = model_config(HPARAMS["preset"], image_size=spec.image_size, vocab_size=spec.vocab_size,
                       context_length=length, **overrides)
    model = _build_model(cfg).to(spec.device)
    _STATE.clear()
    # Two streams: one draw per step decides whether the expert term runs, mixup draws only
    # when it does. On one stream each firing would shift every later draw, and another
    # probability or schedule would fire on other steps instead of a subset of them.
    _STATE["generator"] = torch.Generator().manual_seed(int(HPARAMS["expert_seed"]))
    _STATE["mix_generator"] = torch.Generator().manual_seed(int(HPARAMS["expert_seed"]) + MIX_SEED_OFFSET)
    compile_on = HPARAMS["compile"]
    if compile_on == "auto":
        compile_on = spec.device.type == "cuda"
    mode = HPARAMS["compile_mode"]
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    scope = HPARAMS["compile_scope"]
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile_scope: expected one of {', '.join(COMPILE_SCOPES)}, got {scope!r}")
    mode = resolve_compile_mode(mode, scope, spec.device.type)
    graphs = mode in GRAPH_MODES
    if scope == "blocks" and graphs:
        raise ValueError(f"compile_scope: 'blocks' runs eager code between the blocks; compile_mode {mode!r} "
                         "would make a CUDA graph per block (use 'default' or 'max-autotune-no-cudagraphs')")
    compile_mode = None if mode == "default" else mode
    if compile_on and scope == "blocks":
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        if not blocks:
            raise ValueError("compile_scope: 'blocks' found no transformer block of the preset towers "
                             "(pretrained towers have their own): use 'step'")
        for blk in blocks:
            # In place: parameter names (and checkpoints) stay. All blocks share one code
            # object, hence one cache of graphs (vision, text, phrases, evaluation, expert
            # subsets of varying size): dynamic=None turns a dimension symbolic once it has
            # changed, instead of recompiling into dynamo's limit of 8 graphs.
            blk.compile(dynamic=None, mode=compile_mode)
    # dynamic=False: the batch size is fixed (one graph, no shape guards)
    _STATE["clip_loss"] = (torch.compile(_clip_loss, dynamic=False, mode=compile_mode)
                           if compile_on and scope == "step" else _clip_loss)
    # CUDA graphs own their outputs: a later replay overwrites them (see train_step)
    _STATE["graphs"] = bool(compile_on) and spec.device.type == "cuda" and graphs
    return model


def build_optimizer(model):
    opt = torch.optim.AdamW(
        model.param_groups(HPARAMS["weight_decay"]),
        lr=HPARAMS["lr"], betas=(HPARAMS["beta1"], HPARAMS["beta2"]), eps=HPARAMS["eps"],
        # one kernel for all parameters, on CUDA and on the CPU (tiny preset, 86 tensors: the
        # per-parameter loop cost a CPU step several times what the fused step does)
        fused=True,
    )
    for group in opt.param_groups:
        group["initial_lr"] = HPARAMS["lr"]
    return opt


def lr_at(progress: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio × lr, as a function of progress."""
    lr, warm, floor = HPARAMS["lr"], HPARAMS["warmup"], HPARAMS["min_lr_ratio"]
    if warm > 0 and progress < warm:  # from lr·1e-3/(warm + 1e-3) up to lr, never past it
        return lr * (progress + 1e-3) / (warm + 1e-3)
    t = min(1.0, (progress - warm) / max(1e-9, 1 - warm))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def _clip_loss(model, images, tokens, mask, dtype):
    """Both towers and the symmetric InfoNCE: (loss, image emb [B, E], text emb [B, E]).
    The embeddings enter the loss in ``dtype`` (bf16 under autocast: custom ops are not
    autocast, and the fused kernel is fastest on half-precision inputs)."""
    img, txt, scale = model(images, tokens, mask)
    img, txt = img.to(dtype), txt.to(dtype)
    return kernels.contrastive_loss(img, txt, scale, mode=HPARAMS["loss_mode"]), img, txt


def train_step(model, optimizer, batch, progress):
    lr = lr_at(progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    bf16 = _use_bf16(model)
    graphs = _STATE["graphs"]
    if graphs:  # a new iteration: the graphs may reuse the memory of the last one's outputs
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(device_type=batch.images.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, img, txt = _STATE["clip_loss"](model, batch.images, batch.tokens, batch.mask,
                                             torch.bfloat16 if bf16 else torch.float32)
        if graphs:  # the loop reads the logged loss steps later, after replays overwrote the graph's copy
            loss = loss.clone()
        total = loss
        extra = {}
        weight = expert_mod.expert_weight(progress, model.cfg.expert, _STATE["generator"])
        if weight > 0:
            dt = img.dtype  # the phrase/expert embeddings leave autocast in fp32: match them

            def loss_fn(a, b, s):
                return kernels.contrastive_loss(a.to(dt), b.to(dt), s, mode=HPARAMS["loss_mode"])

            term = expert_mod.expert_loss(model, batch, img, txt, loss_fn, model.cfg.expert,
                                          _STATE["mix_generator"])
            total = loss + weight * term
            n = batch.has_region.sum()
            extra["expert_samples"] = n * (n > 1)  # those the expert path encoded (for MFU): none below 2
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), HPARAMS["grad_clip"])
                 if HPARAMS["grad_clip"] > 0 else torch.zeros(()))
    optimizer.step()
    model.clamp_logit_scale_()  # in place, after the step: never a clamp in the forward pass
    return {"loss": loss.detach(), "total_loss": total.detach(), "grad_norm": grad_norm.detach(),
            "logit_scale": model.logit_scale.detach().exp(), "lr": torch.tensor(lr), **extra}


def recipe_state():
    """Tensors the recipe needs to resume exactly (saved in the loop's checkpoint)."""
    return {"generator": _STATE["generator"].get_state(), "mix_generator": _STATE["mix_generator"].get_state()}


def load_recipe_state(state):
    for name in ("generator", "mix_generator"):
        if name in state:
            _STATE[name].set_state(state[name])
