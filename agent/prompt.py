"""What the model reads: a fixed, cached system prompt and a bounded per-proposal context.

The system prompt is the same for every proposal of a workspace (instructions, the recipe
contract, the policy, the model configuration reference and the template recipe), so it is
cached with ``cache_control`` together with the tool definitions. It is deliberately long
enough to be cached at all: a prefix under a model's minimum (1,024 to 4,096 tokens,
depending on the model) is silently not cached; ours is about 35,000 characters with the
tool definitions (the template recipe makes up most of it), an estimated 8,500 to 10,000
tokens: ``sum(len(b["text"]) for b in system_blocks()) + len(json.dumps(TOOLS))``.

The per-proposal message is rebuilt from the journal each time (a fresh conversation, no
growing history): the brief (``program.md``), the current recipe, and a compact summary —
best so far, noise floor, the last K experiments with their outcomes, and the log tails of
recent failures.
"""

from __future__ import annotations

from agent.tools import REFERENCE_FILES

LAST_K = 12  # experiments listed in the per-proposal summary
FAILURES_SHOWN = 2  # recent failed runs whose log tail is included
TAIL_LINES = 25  # lines of each log tail

INSTRUCTIONS = """\
You are the research agent of an automated training-recipe study. A loop, not you, runs the
experiments: each time you are called you propose exactly one change to one file, recipe.py,
and submit it. The loop then trains the edited recipe for a fixed wall-clock budget through a
harness you cannot see or touch, evaluates it, and keeps the change (a git commit) only if it
beats the best result so far by more than the measured noise floor; otherwise the recipe is
reset to the best version. You will be called again with the updated history.

# The task being optimised
The recipe trains an eCLIP model: a CLIP-style image tower (a ViT) and text tower (a small
transformer) trained with the symmetric contrastive (InfoNCE) loss, plus an optional expert
term that encodes images together with region heatmaps of annotated phrases. The score is
val_mean_rank: for every validation image the rank of its true caption among all captions
(and the reverse for texts), averaged over both directions, 0-indexed, ties counted against
the model. Lower is better. A random model scores about (N-1)/2; a collapsed model, N-1.
The wall-clock budget covers the recipe's import, build_model and build_optimizer, then the
steps, compilation included, so a change that makes each step (or the setup) slower has to
earn its cost in fewer steps.

# The recipe contract (what the harness calls; keep these names and signatures)
- HPARAMS: one literal dict at module level (constants only). The harness reads batch_size
  (it samples batches of that size, already on the device), crop_scale and flip (its data
  augmentation). Everything else is the recipe's own.
- build_model(spec) -> torch.nn.Module. spec has vocab_size, context_length, image_size,
  phrase_length and device. The module must provide encode_image(images) and
  encode_text(tokens, mask), each returning [B, E] embeddings that the harness ranks by
  cosine similarity, and the attributes the training step needs.
- build_optimizer(model) -> torch.optim.Optimizer.
- train_step(model, optimizer, batch, progress) -> dict of 0-d tensors (at least "loss").
  One complete step: forward, loss, backward, optimizer step, and the learning-rate
  schedule as a function of progress in [0, 1] (0 during the first step, which compiles;
  then the fraction of the rest of the budget used). batch has
  images (uint8 [B, 3, H, W]), tokens ([B, L] int), mask ([B, L] bool) and regions.
- Optional recipe_state() / load_recipe_state(state) for tensors needed to resume exactly.
The harness evaluates the saved checkpoint, after training, on a split the training process
never holds: fresh processes each call build_model(spec) with the same HPARAMS and load
the model's state_dict; one encodes the images, another the texts, each in an order only
the harness knows. So whatever encode_image and encode_text depend on must be in the
model's parameters or persistent buffers (an EMA must be copied into the model by the end
of training). Tricks aimed at the evaluation (remembering inputs across calls, constant
embeddings, state kept between the image and the text pass) score at chance or fail, and
an embedding must depend on its own input only, never on the other items it is encoded
with (batch statistics at evaluation, centring on their mean) nor on chance: the harness
checks this, and such a model is an error.
All training happens in train_step, inside the budget, one optimizer step per call: the
loop checks the clock between calls, and a run whose last call ends more than 5 s past the
budget, or whose code after the last step (state_dict, recipe_state, FLOP counts) or
encoding takes more than a few seconds, is an error.

# Rules (enforced in code; a violating edit is rejected before it runs)
- Edit only recipe.py, through the edit tool. No other file can be read except the listed
  reference files, and none can be written.
- Imports only from: torch, math, functools, dataclasses, typing, kernels, eclip.model,
  eclip.expert, eclip.towers, eclip.batch.
- No open, exec, eval, the builtin compile (torch.compile is fine), __import__, getattr,
  setattr, delattr, globals, locals, vars, input, breakpoint; no dunder names, attributes
  or method definitions (__init__ is fine), no private attributes (self._x and
  torch._foreach_* are fine, but not a tensor subclass's inherited torch._C members); a
  class's bases are your classes, builtin ones or an import's chain (torch.nn.Module), not
  names holding them; no string annotations; no torch.load, torch.save, torch.hub,
  torch.library, torch.overrides, torch.jit, frames or other file, process or network
  access; of torch only torch.nn, optim, autograd, amp, cuda, backends, compiler, func,
  linalg, fft, special, distributions, utils.checkpoint and a few more; attributes are
  assigned only on self inside your own classes' methods (and a tensor's requires_grad,
  grad, data): to change a model's behaviour, subclass it; self is only ever a method's
  first parameter, methods are called on instances, type(x) is only compared; no module
  used as a value (write `import torch.nn.functional as F`, `from eclip import expert`); knobs under
  torch.backends and the compiler configs may be set to numbers or bools (string literals under
  torch.backends only: matmul.fp32_precision = "tf32"); torch.compile
  takes backend only as one of "inductor", "eager", "aot_eager", "cudagraphs", and options
  only as a dict literal of numbers and bools.
- The metrics are computed by the harness, which never runs your code, from the embeddings
  your model's encode_image and encode_text return (plain tensors).
- A change that crashes, diverges (NaN or an exploding loss), runs out of memory or times
  out is a failed experiment. You will see the log tail of recent failures; if the last
  experiment crashed because of a bug in your change, fixing it is a good next proposal.

# How to choose a change
- Read the history first: what was tried, what was kept, what failed, and by how much.
  Do not repeat a configuration that was already tried; do not revert a kept change
  without a reason.
- One idea per experiment, so the result says something. Prefer changes whose effect
  should exceed the noise floor; a gain smaller than the noise floor is discarded anyway.
- Simplicity criterion: at equal score, the simpler recipe wins. A small gain that adds a
  lot of code is not worth it; removing code at equal score is a good result.
- Levers worth knowing: learning rate and its schedule (warm-up, cosine floor), batch size
  (more steps versus a better gradient), weight decay and Adam betas, gradient clipping, the
  model size and shape (model config overrides via HPARAMS["model"], e.g.
  {"vision.depth": 6, "text.width": 256}), pooling and patch size, the logit-scale
  initialisation, the expert term's weight, probability and schedule, augmentation, and the
  loss (kernels.contrastive_loss is the fused symmetric loss). Throughput matters: the
  budget is fixed, so samples per second turn into steps. HPARAMS["text_tower"] and
  ["image_tower"] select pretrained towers (eclip/pretrained.py), but runs are offline:
  only models the brief names as available locally can load.
- The device and budget are given below. On a CPU, small models and modest batches win;
  on a GPU, bf16 autocast, torch.compile and larger batches pay. On CUDA the template
  already replays its compiled step as CUDA graphs (compile_mode "auto"): small batches
  are bound by kernel launches, and graphs doubled ViT-S/16's samples per second at
  batch 64. A step whose shapes change from step to step defeats them.

# How to work
Use view to read what you need (recipe.py with line numbers, the reference files for the
model's configuration options and the loss), make your change with edit (str_replace must
match exactly once: include enough surrounding text), check the edit result for syntax or
policy problems, then call submit with a one-sentence hypothesis, a description of at
most 80 characters for the results table (for example "lr 1e-3 -> 2e-3" or "mean pooling
in the image tower"), and the effect you expect. Keep it short: you have a limited number
of tool turns, and a proposal without a submitted edit is recorded as a no-op.
"""


def _reference(name: str) -> str:
    text = REFERENCE_FILES[name].read_text(encoding="utf-8")
    return f"<file name=\"{name}\">\n" + "\n".join(text.splitlines()) + "\n</file>"


def _config_section() -> str:
    """The model configuration dataclasses and presets of eclip/model.py (every field
    has a comment): what HPARAMS["model"] overrides can set."""
    lines = REFERENCE_FILES["eclip/model.py"].read_text(encoding="utf-8").splitlines()
    start = next(i for i, s in enumerate(lines) if s.startswith("@dataclass"))
    end = next(i for i, s in enumerate(lines) if s.startswith("_SECTIONS"))
    return "<file name=\"eclip/model.py\" excerpt=\"configuration and presets\">\n" + "\n".join(
        lines[start:end]) + "\n</file>"


def system_blocks() -> list[dict]:
    """The system prompt as content blocks; the last carries the cache breakpoint, which
    caches the tool definitions and the whole system prompt as one prefix."""
    reference = ("# Reference material (read-only)\n"
                 "The model configuration options (HPARAMS['model'] overrides use 'section.field' keys; "
                 "the template refuses there the fields it sets from entries of its own, OWNED_FIELDS):\n\n"
                 + _config_section()
                 + "\n\nThe template recipe every workspace started from (your recipe.py may differ since):\n\n"
                 + _reference("eclip/recipe.py"))
    return [{"type": "text", "text": INSTRUCTIONS},
            {"type": "text", "text": reference, "cache_control": {"type": "ephemeral"}}]


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def journal_summary(exps: list[dict], state: dict, session: dict, log_tails: dict[int, str]) -> str:
    """The compact history: best, noise floor, counts, the last ``LAST_K`` experiments and the
    log tails of recent failures (``log_tails``: n -> text)."""
    done = [e for e in exps if e.get("ended")]
    keeps = [e for e in done if e.get("kept")]
    best_exp = keeps[-1] if keeps else None
    out = ["# History",
           f"Budget per experiment: {session.get('budget_s', '?')} s of training on device "
           f"{session.get('device', 'auto')}.",
           f"Best val_mean_rank so far: {_fmt(state.get('best'))} "
           + (f"(experiment {best_exp['n']}: {best_exp.get('description', '')})" if best_exp else
              "(the baseline recipe: the mean of its runs)"),
           f"Noise floor: a change is kept only if it beats the best by more than {state['threshold']:.2f}.",
           f"Experiments so far: {state['experiments']} after {state['baselines']} baseline runs; "
           f"{len(keeps)} kept."]
    listed = done[-LAST_K:]
    if listed:
        out.append(f"\nThe last {len(listed)} runs (n, status, val_mean_rank, samples/s, description):")
        for e in listed:
            r = e.get("result") or {}
            line = (f"- #{e['n']} {e.get('status')}: {_fmt(e.get('val_mean_rank'))}, "
                    f"{_fmt(r.get('samples_per_s'))} samples/s, {e.get('description', '')}")
            if e.get("hypothesis"):
                line += f" | hypothesis: {e['hypothesis'][:200]}"
            if r.get("reason") and e.get("status") not in ("keep", "discard", "baseline"):
                reason = r["reason"] if isinstance(r["reason"], str) else "; ".join(map(str, r["reason"]))
                line += f" | reason: {reason[:300]}"
            out.append(line)
    for n, tail in sorted(log_tails.items())[-FAILURES_SHOWN:]:
        lines = tail.splitlines()[-TAIL_LINES:]
        out.append(f"\nLog tail of failed run #{n}:\n```\n" + "\n".join(lines) + "\n```")
    return "\n".join(out)


def proposal_message(program: str, recipe: str, summary: str, fix: dict | None = None) -> str:
    """The user message that opens a proposal's conversation."""
    parts = ["# The brief (program.md)\n" + program.strip(), summary]
    if fix is not None:
        parts.append(f"# Fix attempt\nExperiment #{fix['n']} ({fix.get('description', '')}) failed with status "
                     f"{fix.get('status')}. recipe.py below is that failed version, not the best one: fix the "
                     "cause (see its log tail above) and submit, or submit a different change to it.")
    parts.append("# Current recipe.py\n```python\n" + recipe.rstrip("\n") + "\n```")
    parts.append("Propose one change now: view what you need, edit recipe.py, then submit.")
    return "\n\n".join(parts)
