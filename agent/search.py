"""The offline "search" proposer: hill-climbing over a recipe's literal ``HPARAMS`` dict.

It needs no network and no model: each proposal starts from the best kept experiment (or
the recipe as it stands), mutates one or two entries and splices the new values into the
recipe text at the exact positions ``ast`` reports, so every comment and every other line
survives byte for byte (a diff of the proposal shows only the changed values).

Mutations, by kind of entry:

- rates and scales (lr, weight_decay, eps, grad_clip, …): multiplied by ``exp(N(0, σ))``,
  since their useful range spans orders of magnitude; clipped to per-key bounds, and
  fractions (warmup, min_lr_ratio, …) never leave [0, 1];
- Adam betas: ``1 - β`` on the log scale (0.98 → 0.99 is as big a step as 0.9 → 0.95);
- ints (batch_size): doubled or halved, within [8, 4096];
- bools: flipped;
- strings, dicts, ``preset``, ``model`` and the seeds are never touched: a string is a
  mode switch whose choices a search cannot know, and the others change what is compared;
  nor are the augmentations ``flip`` and ``crop_scale``, which make captions that name sides
  and positions wrong.

The step σ adapts to success (the one-fifth rule of evolution strategies): it grows after a
keep and shrinks after a discard or a failed run, so a search that keeps finding gains
takes bolder steps and one that keeps missing refines around the best.

A proposal is a pure function of ``seed``, the source and the history, so a restarted loop
proposes what the killed one would have.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field

# flip and crop_scale too: a flipped image keeps a caption naming its left and right, and a
# crop one naming its corners (the built-in dataset's do; the template keeps both off for it):
# a search over them spends its runs on captions made wrong. A researcher sets them by hand.
FROZEN = frozenset({"preset", "model", "seed", "expert_seed", "precision", "compile", "loss_mode", "flip",
                    "crop_scale"})

# (low, high) for log-scale floats; values outside come from the recipe's author and are
# kept only until the key is next mutated
BOUNDS = {
    "lr": (1e-5, 1e-1),
    "weight_decay": (1e-5, 1.0),
    "min_lr_ratio": (1e-3, 1.0),
    "warmup": (1e-3, 0.5),
    "eps": (1e-10, 1e-3),
    "grad_clip": (0.05, 100.0),
    "crop_scale": (0.08, 1.0),
    "expert_weight": (0.01, 10.0),
    "expert_probability": (0.01, 1.0),
    "expert_cold_start": (1e-3, 0.9),
    "expert_ramp": (1e-3, 1.0),
}
# keys mutated as 1 - value, with bounds on 1 - value
ONE_MINUS = {"beta1": (1e-3, 0.5), "beta2": (1e-4, 0.5)}
# a mutation of these does nothing while the switch is off: skip them then, to save runs
REQUIRES = {k: "expert" for k in ("expert_weight", "expert_probability",
                                  "expert_cold_start", "expert_ramp")}
INT_BOUNDS = {"batch_size": (8, 4096)}
SIGMA = 0.5  # initial log-scale step: ×0.6 … ×1.65 at one σ
# Step-size control by the one-fifth success rule: a keep widens the step by GROW, any other
# finished experiment narrows it by GROW**-0.25, so the step holds still at one keep in five
# (more keeps: the neighbourhood is easy, look further; fewer: look closer).
GROW = 1.5
SIGMA_RANGE = (0.05, 2.0)
RETRIES_PER_WIDTH = 20  # attempts before the step (σ and number of keys) is widened
MAX_ATTEMPTS = 200


class SearchExhausted(RuntimeError):
    """No configuration near the best is left untried."""


@dataclass
class Proposal:
    source: str  # the whole new recipe text
    description: str  # short, e.g. "lr 1e-3 -> 6.2e-4"
    hypothesis: str  # one sentence
    changes: dict = field(default_factory=dict)  # key -> (old, new), relative to the source
    step: float | None = None  # the log-scale σ it was drawn with (journaled as search_step)
    extra: dict = field(default_factory=dict)  # proposer-specific facts for the journal (usage, cost, …)
    transcript: list | None = None  # the conversation that produced it (LLM proposers)


def _find_hparams(source: str) -> ast.Dict:
    """The ``HPARAMS = {...}`` dict node at module level (ValueError if there is none)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"recipe does not parse (line {e.lineno}): {e.msg}") from None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == "HPARAMS" for t in targets):
            if isinstance(node.value, ast.Dict) and all(
                    isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.value.keys):
                if (line := _later_write(tree, node)) is not None:
                    raise ValueError(f"recipe line {line}: HPARAMS is written again after its literal, so the "
                                     "literal's values are not the ones trained with; write them into the literal")
                return node.value
            break
    raise ValueError("recipe has no literal HPARAMS = {...} dict with string keys at module level")


MUTATORS = frozenset({"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__", "__ior__"})


def _later_write(tree: ast.Module, literal: ast.stmt) -> int | None:
    """The line of the first statement other than ``literal`` that writes HPARAMS anywhere
    in the recipe (a second assignment, an item set or deleted, ``update``, ``|=``, ...), or
    None: edits of the literal would otherwise be overridden and journaled as if trained."""
    def is_hparams(t) -> bool:
        return isinstance(t, ast.Name) and t.id == "HPARAMS"

    lines = []
    for n in ast.walk(tree):
        if n is literal:
            continue
        targets = (n.targets if isinstance(n, (ast.Assign, ast.Delete)) else
                   [n.target] if isinstance(n, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)) else [])
        if any(is_hparams(t) or (isinstance(t, ast.Subscript) and is_hparams(t.value)) for t in targets):
            lines.append(n.lineno)
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and is_hparams(n.func.value)
              and n.func.attr in MUTATORS):
            lines.append(n.lineno)
    return min(lines, default=None)


def read_hparams(source: str) -> dict:
    """The recipe's ``HPARAMS`` as a dict (ValueError if it is missing or not literal)."""
    node = _find_hparams(source)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError("recipe's HPARAMS dict is not a literal (only constants allowed)") from None


def format_value(value) -> str:
    """Literal text for a value: repr for ints/bools/str; for floats the fewest significant
    digits (from 3) that read back as the same float, so writing never changes a value."""
    if isinstance(value, float) and math.isfinite(value):
        text = next(t for t in (f"{value:.{d}g}" for d in range(3, 18)) if float(t) == value)
        text = re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m[1] == "-" else "") + m[2], text)
        if not re.search(r"[.e]", text):
            text += ".0"  # "1" would be an int literal
        return text
    return repr(value)


def write_hparams(source: str, updates: dict) -> str:
    """``source`` with the values of ``updates`` spliced into HPARAMS, nothing else touched."""
    node = _find_hparams(source)
    data = source.encode("utf-8")  # ast offsets are UTF-8 byte columns
    starts = [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    spans = []
    for key, value in zip(node.keys, node.values, strict=True):
        if key.value in updates:
            lo = starts[value.lineno - 1] + value.col_offset
            hi = starts[value.end_lineno - 1] + value.end_col_offset
            spans.append((lo, hi, format_value(updates[key.value]).encode("utf-8")))
    missing = set(updates) - {k.value for k in node.keys}
    if missing:
        raise ValueError(f"HPARAMS has no entries {sorted(missing)}")
    for lo, hi, text in sorted(spans, reverse=True):  # from the end: earlier offsets stay valid
        data = data[:lo] + text + data[hi:]
    return data.decode("utf-8")


def _mutable(hp: dict) -> list[str]:
    keys = []
    for key, value in hp.items():
        if key in FROZEN or not isinstance(value, (bool, int, float)):
            continue
        if _inactive(hp, key):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            continue  # no factor of 2 moves 0, and a negative int is not a size
        if isinstance(value, float) and (value < 0 or not math.isfinite(value)):
            continue
        keys.append(key)
    return keys


def _mutate(key: str, value, rng: random.Random, sigma: float):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        lo, hi = INT_BOUNDS.get(key, (1, max(4 * value, 8)))
        steps = max(1, round(abs(rng.gauss(0, sigma * 2))))  # ≥ one doubling/halving
        factor = 2 ** (steps if rng.random() < 0.5 else -steps)
        return int(min(hi, max(lo, value * factor)))
    factor = math.exp(rng.gauss(0, sigma))
    if key in ONE_MINUS:
        lo, hi = ONE_MINUS[key]
        gap = min(hi, max(lo, (1.0 - value if value < 1 else lo) * factor))
        return round(1.0 - _round3(gap), 12)  # round(): 1 - 0.02 is 0.9800000000000001
    lo, hi = BOUNDS.get(key, (value / 1000, value * 1000) if value > 0 else (1e-6, 1.0))
    if value <= 1.0 and key not in BOUNDS:
        hi = min(hi, 1.0)  # an unknown fraction stays a fraction
    start = value if value > 0 else lo  # 0 (off) has no log: restart from the lower bound
    return _round3(min(hi, max(lo, start * factor)))


def _round3(x: float) -> float:
    """Three significant digits: what a person would write, and fewer near-duplicates."""
    return float(f"{x:.3g}")


def _canonical(hp: dict) -> str:
    return json.dumps(hp, sort_keys=True, default=repr)


def _effective(hp: dict) -> str:
    """A configuration as it trains, for telling seen ones apart: the keys that do nothing
    while their switch is off (``REQUIRES``) are left out then, so "expert off" with other
    inactive values is the same experiment."""
    return _canonical({k: v for k, v in hp.items() if not _inactive(hp, k)})


def _inactive(hp: dict, key: str) -> bool:
    """Whether ``key`` does nothing in ``hp``: its switch (``REQUIRES``) is off."""
    return key in REQUIRES and hp.get(REQUIRES[key]) is False


def _schedule_fits(hp: dict) -> bool:
    """The expert schedule's phases fit in training (cold start + ramp + the model's
    cool-down ≤ 1), as the model config demands: each key is drawn within its own bounds,
    so a draw can break their sum, and the run would fail at build time."""
    model = hp.get("model")
    cool = model.get("expert.cool_down", 0.0) if isinstance(model, dict) else 0.0
    parts = (hp.get("expert_cold_start", 0.0), hp.get("expert_ramp", 0.0), cool)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in parts):
        return True  # not numbers: the recipe's own checks will say so
    return sum(parts) <= 1 + 1e-9


def adapted_sigma(history: list[dict]) -> float:
    """The step σ after the experiments in ``history`` (baselines and unrun edits do not count)."""
    sigma = SIGMA
    for h in history:
        status = h.get("status")
        if status in (None, "baseline", "no-op", "rejected", "interrupted"):
            continue
        sigma *= GROW if h.get("kept") else GROW ** -0.25
        sigma = min(SIGMA_RANGE[1], max(SIGMA_RANGE[0], sigma))
    return sigma


def best_kept(history: list[dict]) -> dict | None:
    """The kept experiment with the lowest ``val_mean_rank`` (None when there is none)."""
    kept = [h for h in history if h.get("kept") and h.get("val_mean_rank") is not None
            and isinstance(h.get("hparams"), dict)]
    return min(kept, key=lambda h: h["val_mean_rank"]) if kept else None


class SearchProposer:
    """Hill-climbing proposer: one or two mutations of the best configuration so far."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _rng(self, source: str, history: list[dict]) -> random.Random:
        # seeded from the inputs, not from call order: same inputs, same proposal
        blob = _canonical({"seed": self.seed, "source": source, "history": history})
        return random.Random(int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big"))

    def propose(self, recipe_source: str, history: list[dict], context: dict | None = None) -> Proposal:
        """A new configuration near the best (``context``, the loop's extra facts, is unused)."""
        current = read_hparams(recipe_source)
        base = dict(current)
        best = best_kept(history)
        if best is not None:  # adopt the best's values, except the frozen, for known keys
            for key, value in best["hparams"].items():
                if key in current and key not in FROZEN and isinstance(value, (bool, int, float)):
                    base[key] = value
        seen = {_effective(current), _effective(base)}
        for h in history:  # an interrupted run says nothing of its configuration: try it again
            if isinstance(h.get("hparams"), dict) and h.get("status") != "interrupted":
                full = {**current, **{k: v for k, v in h["hparams"].items() if k in current}}
                seen.add(_effective(full))
        keys = _mutable(base)
        if not keys:
            raise ValueError("HPARAMS has no entry the search may mutate")
        rng = self._rng(recipe_source, history)
        step = adapted_sigma(history)
        for attempt in range(MAX_ATTEMPTS):
            widen = attempt // RETRIES_PER_WIDTH  # stuck among seen configs: bigger steps
            sigma = step * (1 + widen)
            count = min(len(keys), rng.choice((1, 2)) + widen)
            candidate = dict(base)
            for key in rng.sample(keys, count):
                candidate[key] = _mutate(key, base[key], rng, sigma)
            for key in candidate:  # switched off with it: keep the base's value
                if _inactive(candidate, key):
                    candidate[key] = base[key]
            if _effective(candidate) not in seen and _schedule_fits(candidate):
                prop = self._proposal(recipe_source, current, base, candidate, best)
                prop.step = sigma
                return prop
        raise SearchExhausted(f"search found no unseen configuration in {MAX_ATTEMPTS} attempts")

    @staticmethod
    def _proposal(source, current, base, candidate, best) -> Proposal:
        changes = {k: (current[k], v) for k, v in candidate.items() if v != current[k]
                   or type(v) is not type(current[k])}
        mutated = [k for k in candidate if candidate[k] != base[k]]
        description = ", ".join(f"{k} {format_value(base[k])} -> {format_value(candidate[k])}"
                                for k in mutated)
        origin = "the best kept configuration" if best is not None else "the current recipe"
        if best is not None and base != current:
            description += " (from best kept)"
        verbs = []
        for k in mutated:
            old, new = base[k], candidate[k]
            if isinstance(new, bool):
                verbs.append(f"turning {k} {'on' if new else 'off'}")
            else:
                verbs.append(f"{'raising' if new > old else 'lowering'} {k} to {format_value(new)}")
        hypothesis = (f"Starting from {origin}, {' and '.join(verbs)} lowers the validation "
                      "mean rank reached within the same training budget.")
        return Proposal(source=write_hparams(source, {k: new for k, (_, new) in changes.items()}),
                        description=description, hypothesis=hypothesis, changes=changes)
