"""The eCLIP model: configs, named presets and the two-tower CLIP model with its expert path.

``model_config(preset, image_size=..., vocab_size=..., context_length=..., **overrides)``
returns a validated ``ModelConfig``; ``build_model(cfg)`` builds the ``EclipModel``:

- ``encode_image(images) -> [B, E]`` and ``encode_text(tokens, mask) -> [B, E]``, both L2
  normalised; images are uint8 [B, 3, H, W] (or float in [0, 1]) and are normalised inside
  the model, so data stays uint8 on the device until the first layer;
- ``encode_expert(images, heatmaps) -> [B, E]`` (when ``cfg.expert.enabled``): the heatmap
  processor of ``eclip.expert`` turns (image, region heatmap) into an expert image that the
  same image tower encodes;
- ``logit_scale``: a 0-d learnable log-scale, never clamped in the forward pass (a clamp there
  zeroes its gradient); ``clamp_logit_scale_()`` clamps it in place after each optimizer step;
- ``param_groups(weight_decay)`` for AdamW and ``flops_per_sample()`` for MFU.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from eclip.expert import HeatmapProcessor
from eclip.towers import TextTower, VisionTower

# Per-channel RGB statistics the image tower normalises with (OpenAI CLIP's; any fixed values
# work for training from scratch, these keep pretrained towers usable).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {msg}")


def _check_finite(cfg, prefix: str) -> None:
    """Every float field (and tuple of floats) of a config section is finite: an infinite
    width ratio, epsilon or σ passes a "positive" check and fails later, deep in the model."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        numbers = v if isinstance(v, tuple) else (v,)
        # floats, and tuples holding one (ints among them: a mean read back from JSON as [0, inf, 0])
        if any(isinstance(x, float) for x in numbers):
            _check(all(math.isfinite(x) for x in numbers), f"{prefix}{f.name}", f"must be finite, got {v}")


def _check_transformer(prefix: str, width: int, depth: int, heads: int, mlp_ratio: float,
                       ln_eps: float) -> None:
    _check(width > 0, f"{prefix}.width", f"must be positive, got {width}")
    _check(depth > 0, f"{prefix}.depth", f"must be positive, got {depth}")
    _check(heads > 0 and width % heads == 0, f"{prefix}.heads",
           f"must be positive and divide {prefix}.width={width}, got {heads}")
    _check(mlp_ratio > 0, f"{prefix}.mlp_ratio", f"must be positive, got {mlp_ratio}")
    _check(ln_eps > 0, f"{prefix}.ln_eps", f"must be positive, got {ln_eps}")


@dataclass
class VisionConfig:
    image_size: int = 224  # input side in pixels (square images); dictated by the data cache
    patch_size: int = 16  # side of the square patches; image_size must be a multiple of it
    width: int = 384  # transformer width (channels per token)
    depth: int = 12  # number of pre-norm blocks
    heads: int = 6  # attention heads; must divide width
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of width
    pos: str = "learned"  # "learned" positions or fixed 2-D "sincos" ones
    pool: str = "cls"  # "cls": a prepended class token is the output; "mean": mean of patches
    ln_eps: float = 1e-6  # LayerNorm epsilon
    mean: tuple[float, float, float] = CLIP_MEAN  # RGB mean subtracted after scaling to [0, 1]
    std: tuple[float, float, float] = CLIP_STD  # RGB std divided by after the mean
    # "timm:NAME[@FILE|@random]": a timm backbone replaces the ViT above (eclip.pretrained);
    # its feature width and mean/std then apply, and width/depth/heads/patch are unused
    pretrained: str = ""

    def __post_init__(self) -> None:
        _check_finite(self, "vision.")
        _check(self.patch_size > 0, "vision.patch_size", f"must be positive, got {self.patch_size}")
        _check(self.image_size > 0 and self.image_size % self.patch_size == 0, "vision.image_size",
               f"must be a positive multiple of vision.patch_size={self.patch_size}, "
               f"got {self.image_size}")
        _check_transformer("vision", self.width, self.depth, self.heads, self.mlp_ratio, self.ln_eps)
        _check(self.pos in ("learned", "sincos"), "vision.pos",
               f"must be 'learned' or 'sincos', got {self.pos!r}")
        _check(self.pos != "sincos" or self.width % 4 == 0, "vision.width",
               f"must be divisible by 4 with sincos positions, got {self.width}")
        _check(self.pool in ("cls", "mean"), "vision.pool", f"must be 'cls' or 'mean', got {self.pool!r}")
        _check(len(self.mean) == 3, "vision.mean", f"needs 3 values, got {self.mean}")
        _check(len(self.std) == 3 and all(s > 0 for s in self.std), "vision.std",
               f"needs 3 positive values, got {self.std}")


@dataclass
class TextConfig:
    vocab_size: int = 49408  # token ids are in [0, vocab_size); 0 is padding; from the tokenizer
    context_length: int = 77  # maximum tokens per caption; dictated by the data cache
    width: int = 768  # transformer width
    depth: int = 6  # number of pre-norm blocks
    heads: int = 12  # attention heads; must divide width
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of width
    pool: str = "cls"  # "cls": a prepended class token; "mean": mean over real (unpadded) tokens
    ln_eps: float = 1e-6  # LayerNorm epsilon
    # "hf:NAME_OR_DIR": a Hugging Face encoder replaces the transformer above (eclip.pretrained);
    # the training loop then re-tokenizes captions with its tokenizer; pool still applies
    pretrained: str = ""

    def __post_init__(self) -> None:
        _check_finite(self, "text.")
        _check(self.vocab_size > 1, "text.vocab_size", f"must be at least 2, got {self.vocab_size}")
        _check(self.context_length > 0, "text.context_length",
               f"must be positive, got {self.context_length}")
        _check_transformer("text", self.width, self.depth, self.heads, self.mlp_ratio, self.ln_eps)
        _check(self.pool in ("cls", "mean"), "text.pool", f"must be 'cls' or 'mean', got {self.pool!r}")


@dataclass
class ExpertConfig:
    enabled: bool = True  # build the heatmap processor and train the expert term; False: plain CLIP
    width: int = 128  # heatmap-processor token width (its own patch convs, not the ViT's)
    heads: int = 4  # cross-attention heads; must divide width
    min_sigma: float = 1.0  # smallest Gaussian σ in heatmap pixels, so tiny boxes stay visible
    sigma_scale: float = 0.5  # σ = sigma_scale × box half-size (per axis): box edge at e^-2
    mixup_alpha: float = 0.5  # Beta(α, α) mixup of image and expert embeddings
    weight: float = 0.5  # multiplier of the expert term added to the CLIP loss (at full schedule)
    probability: float = 0.5  # chance that a step computes the expert term (seeded draw)
    cold_start: float = 0.0  # fraction of training before the term is switched on
    ramp: float = 0.0  # fraction of training over which its weight rises linearly to `weight`
    cool_down: float = 0.0  # final fraction of training over which its weight falls linearly to 0
    ln_eps: float = 1e-6  # LayerNorm epsilon inside the processor

    def __post_init__(self) -> None:
        _check_finite(self, "expert.")
        _check(self.width > 0, "expert.width", f"must be positive, got {self.width}")
        _check(self.heads > 0 and self.width % self.heads == 0, "expert.heads",
               f"must be positive and divide expert.width={self.width}, got {self.heads}")
        _check(self.min_sigma > 0, "expert.min_sigma", f"must be positive, got {self.min_sigma}")
        _check(self.sigma_scale > 0, "expert.sigma_scale", f"must be positive, got {self.sigma_scale}")
        _check(self.mixup_alpha > 0, "expert.mixup_alpha", f"must be positive, got {self.mixup_alpha}")
        _check(self.weight >= 0, "expert.weight", f"must be non-negative, got {self.weight}")
        _check(0 <= self.probability <= 1, "expert.probability",
               f"must be in [0, 1], got {self.probability}")
        for name in ("cold_start", "ramp", "cool_down"):
            v = getattr(self, name)
            _check(0 <= v <= 1, f"expert.{name}", f"must be in [0, 1], got {v}")
        _check(self.cold_start + self.ramp + self.cool_down <= 1 + 1e-9,  # 0.33 + 0.56 + 0.11 > 1 in binary
               "expert.cool_down",
               "expert.cold_start + expert.ramp + expert.cool_down must not exceed 1")
        _check(self.ln_eps > 0, "expert.ln_eps", f"must be positive, got {self.ln_eps}")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)  # image tower
    text: TextConfig = field(default_factory=TextConfig)  # text tower
    expert: ExpertConfig = field(default_factory=ExpertConfig)  # eCLIP expert path
    embed_dim: int = 512  # shared embedding dimension both projections map to
    logit_scale_init: float = math.log(1 / 0.07)  # initial log of the softmax scale (CLIP's)
    logit_scale_min: float = 0.0  # lower clamp bound of the log-scale (scale ≥ 1)
    logit_scale_max: float = math.log(100.0)  # upper clamp bound (scale ≤ 100, OpenCLIP's)

    def __post_init__(self) -> None:
        _check_finite(self, "")
        _check(self.embed_dim > 0, "embed_dim", f"must be positive, got {self.embed_dim}")
        lo, hi, init = self.logit_scale_min, self.logit_scale_max, self.logit_scale_init
        _check(lo >= 0, "logit_scale_min", f"must be ≥ 0 (a scale below 1), got {lo}")
        _check(hi > lo, "logit_scale_max", f"must exceed logit_scale_min={lo}, got {hi}")
        _check(lo <= init <= hi, "logit_scale_init", f"must lie in [{lo}, {hi}], got {init}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of ``to_dict`` (as read back from a checkpoint's JSON); unknown keys fail."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        _check(not unknown, unknown[0] if unknown else "", "unknown model config field")
        sub = {"vision": VisionConfig, "text": TextConfig, "expert": ExpertConfig}
        kw = {}
        for k, v in d.items():
            if k in sub:
                fields = {f.name for f in dataclasses.fields(sub[k])}
                bad = sorted(set(v) - fields)
                _check(not bad, f"{k}.{bad[0]}" if bad else k, "unknown model config field")
                v = {n: tuple(x) if isinstance(x, list) else x for n, x in v.items()}
                kw[k] = sub[k](**v)
            else:
                kw[k] = v
        return cls(**kw)


PRESETS: dict[str, ModelConfig] = {
    # Sized by 60 s runs on 2 CPU cores with the built-in dataset (64 px): 16-pixel patches
    # (16 tokens) and CLS pooling learned far faster per second than 8-pixel patches (64
    # tokens) or mean pooling; a 4th image block paid for itself. About 1.3M parameters.
    "tiny": ModelConfig(
        vision=VisionConfig(image_size=64, patch_size=16, width=128, depth=4, heads=4, pool="cls"),
        text=TextConfig(vocab_size=2048, context_length=32, width=128, depth=2, heads=4, pool="cls"),
        expert=ExpertConfig(width=64, heads=4),
        embed_dim=128,
    ),
    # ViT-S/16 image tower + a 6-layer, 768-wide text tower (DistilBERT-sized): the baseline.
    "vit-s16": ModelConfig(
        vision=VisionConfig(image_size=224, patch_size=16, width=384, depth=12, heads=6),
        text=TextConfig(context_length=77, width=768, depth=6, heads=12),
        expert=ExpertConfig(width=256, heads=4),
        embed_dim=512,
    ),
    # ViT-B/16 image tower + OpenAI CLIP's 12-layer, 512-wide text tower.
    "vit-b16": ModelConfig(
        vision=VisionConfig(image_size=224, patch_size=16, width=768, depth=12, heads=12),
        text=TextConfig(context_length=77, width=512, depth=12, heads=8),
        expert=ExpertConfig(width=256, heads=4),
        embed_dim=512,
    ),
}

_SECTIONS = ("vision", "text", "expert")


def _coerce(name: str, default: object, value: object) -> object:
    """Check ``value`` against the type of the field's default; strings (from a command line)
    are parsed. Raises ValueError naming the field."""
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, tuple):
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (tuple, list)) and len(value) == len(default):
            try:
                return tuple(float(v) for v in value)
            except (TypeError, ValueError):
                pass
    raise ValueError(f"{name}: expected {type(default).__name__}, got {value!r}")


def config_fields(cfg: ModelConfig) -> list[str]:
    """Every field an override may name: ``embed_dim``, ``vision.depth``, ..."""
    names = [f.name for f in dataclasses.fields(cfg) if f.name not in _SECTIONS]
    return names + [f"{s}.{f.name}" for s in _SECTIONS for f in dataclasses.fields(getattr(cfg, s))]


def _near(key: str, cfg: ModelConfig) -> str:
    """' (did you mean vision.depth?)' for a misspelt or unqualified field, else ''."""
    fields = config_fields(cfg)
    same_name = [f for f in fields if f.rpartition(".")[2] == key.rpartition(".")[2]]
    near = same_name or difflib.get_close_matches(key, fields, n=1)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def model_config(preset: str, image_size: int | None = None, vocab_size: int | None = None,
                 context_length: int | None = None, **overrides: object) -> ModelConfig:
    """The preset ``preset`` with the data-dictated fields filled and ``overrides`` applied.

    Override keys name a top-level field (``embed_dim``) or a dotted sub-field
    (``vision.depth``, ``expert.enabled``); pass them as ``**{"vision.depth": 6}``. Unknown
    preset, unknown field or a value of the wrong type raises ValueError naming it.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    base = PRESETS[preset]
    data = {"vision.image_size": image_size, "text.vocab_size": vocab_size,
            "text.context_length": context_length}
    changes = {k: v for k, v in data.items() if v is not None}
    # What the data dictates: a model built for other images, or for fewer token ids or
    # positions than the data has, would fail at its first batch. More ids or positions fit.
    for key, value in changes.items():
        wanted = _coerce(key, value, overrides[key]) if key in overrides else value
        if key == "vision.image_size" and wanted != value:
            raise ValueError(f"{key}: set by the data ({value}), got {wanted}; it cannot be overridden")
        if wanted < value:
            raise ValueError(f"{key}: the data needs at least {value}, got {wanted}")
    changes.update(overrides)
    top: dict[str, object] = {}
    nested: dict[str, dict[str, object]] = {s: {} for s in _SECTIONS}
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        if key in _SECTIONS:
            raise ValueError(f"{key}: a section of the model config, not a field (name one: {key}.<field>)")
        if section:
            if section not in _SECTIONS:
                raise ValueError(f"{key}: unknown model config field{_near(key, base)}")
            fields = {f.name for f in dataclasses.fields(getattr(base, section))}
            if name not in fields:
                raise ValueError(f"{key}: unknown model config field{_near(key, base)}")
            nested[section][name] = _coerce(key, getattr(getattr(base, section), name), value)
        else:
            fields = {f.name for f in dataclasses.fields(base)} - set(_SECTIONS)
            if name not in fields:
                raise ValueError(f"{key}: unknown model config field{_near(key, base)}")
            top[name] = _coerce(key, getattr(base, name), value)
    for s in _SECTIONS:  # replace() re-runs each __post_init__, so the result is validated
        top[s] = dataclasses.replace(getattr(base, s), **nested[s])
    return dataclasses.replace(base, **top)


class EclipModel(nn.Module):
    """CLIP with an optional eCLIP expert path; see the module docstring for the contract."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Re-validate: a config may have been mutated after construction.
        for sub in (cfg.vision, cfg.text, cfg.expert, cfg):
            sub.__post_init__()
        self.cfg = cfg
        mean, std = cfg.vision.mean, cfg.vision.std
        if cfg.vision.pretrained:
            from eclip.pretrained import TimmImageTower

            self.vision = TimmImageTower(cfg.vision.pretrained, cfg.vision.image_size)
            mean, std = self.vision.mean, self.vision.std
        else:
            self.vision = VisionTower(cfg.vision)
        if cfg.text.pretrained:
            from eclip.pretrained import HFTextTower

            self.text = HFTextTower(cfg.text.pretrained, cfg.text.pool)
        else:
            self.text = TextTower(cfg.text)
        self.vision_width = self.vision.width if cfg.vision.pretrained else cfg.vision.width
        self.text_width = self.text.width if cfg.text.pretrained else cfg.text.width
        self.image_proj = nn.Linear(self.vision_width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text_width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.vision_width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=self.text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.expert = (
            HeatmapProcessor(cfg.vision.image_size, cfg.vision.patch_size, cfg.expert.width,
                             cfg.expert.heads, cfg.expert.ln_eps)
            if cfg.expert.enabled else None
        )

    # -- encoders ---------------------------------------------------------------------------

    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (0..255) or float in [0, 1] → float32 normalised with mean/std."""
        s = self.cfg.vision.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images: expected [B, 3, {s}, {s}], got {list(images.shape)}")
        x = images.to(torch.float32)
        if images.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def _project_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.vision(x)), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images uint8 [B, 3, H, W] or float in [0, 1] → L2-normalised [B, embed_dim]."""
        return self._project_image(self.normalize_images(images))

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens int64 [B, L] (0 = padding), mask bool [B, L] → L2-normalised [B, embed_dim]."""
        return F.normalize(self.text_proj(self.text(tokens, mask)), dim=-1)

    def encode_expert(self, images: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
        """Expert embedding of (images [B, 3, H, W], heatmaps float [B, 1, H, W]) → [B, E]:
        the heatmap processor makes an expert image that the image tower encodes."""
        if self.expert is None:
            raise ValueError("expert.enabled: the expert path is off in this model's config")
        x = self.normalize_images(images)
        return self._project_image(self.expert(x, heatmaps))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
        """(image embeddings [B, E], text embeddings [B, E], scale = exp(logit_scale) 0-d)."""
        return self.encode_image(images), self.encode_text(tokens, mask), self.logit_scale.exp()

    # -- training helpers -------------------------------------------------------------------

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the log-scale in place to [logit_scale_min, logit_scale_max]; call it after
        each optimizer step (never clamp in the forward pass: that zeroes the gradient)."""
        self.logit_scale.clamp_(self.cfg.logit_scale_min, self.cfg.logit_scale_max)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two AdamW groups: matrices (Linear, Conv, token embedding) decay; norms, biases,
        positional embeddings, class tokens and the logit scale do not. In pretrained towers
        the position and token-type tables count as positional (Hugging Face's
        ``position_embedding(s)``, ``token_type_embeddings``; timm's ``pos_embed``)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            positional = "position_embedding" in name or "token_type_embeddings" in name
            if p.ndim < 2 or leaf in ("pos_embed", "cls_token") or positional:
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay, "weight_decay": float(weight_decay)},
                {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_sample(self, text_length: int | None = None) -> int:
        """Forward FLOPs of one (image, caption) pair through both towers and projections
        (captions padded to ``text_length``, default the context length). The expert path is
        extra: see ``expert_flops_per_sample``. Training ≈ 3× (forward + 2× backward)."""
        c = self.cfg
        proj = 2 * self.vision_width * c.embed_dim + 2 * self.text_width * c.embed_dim
        return self.vision.flops() + self.text.flops(text_length or c.text.context_length) + proj

    def expert_flops_per_sample(self, phrase_length: int | None = None) -> int:
        """Forward FLOPs the expert term adds per sample with a region: the heatmap processor,
        a second image-tower pass and the region phrase through the text tower."""
        if self.expert is None:
            return 0
        c = self.cfg
        proj = 2 * self.vision_width * c.embed_dim + 2 * self.text_width * c.embed_dim
        return self.expert.flops() + self.vision.flops() + self.text.flops(phrase_length) + proj

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig) -> EclipModel:
    """The model for ``cfg`` (random init; honours the current default device, e.g. meta)."""
    return EclipModel(cfg)
