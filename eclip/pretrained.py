"""Pretrained towers (extra ``[pretrained]``): a timm image tower and a Hugging Face text tower.

Selected by two recipe entries (``HPARAMS["image_tower"]``, ``HPARAMS["text_tower"]``; on the
command line ``--image-tower`` / ``--text-tower``), which the template passes on as the model
config fields ``vision.pretrained`` and ``text.pretrained``:

- ``timm:NAME`` — timm model NAME with its pretrained weights from the hub (online only);
  ``timm:NAME@FILE`` — weights from a local file (safetensors or a PyTorch state dict);
  ``timm:NAME@random`` — random init. The classifier is dropped (``num_classes=0``), so the
  tower returns pooled features [B, num_features]; models that accept ``img_size`` are built
  for the cache's image size (position embeddings resampled). Its mean/std replace CLIP's.
- ``hf:NAME`` — a Hugging Face encoder (``AutoModel``) and its tokenizer, from a local
  directory or the hub when online; the tower returns the first token's hidden state
  (``text.pool = "cls"``; for the text half of a dual encoder, CLIP or SigLIP, the model's
  own pooled output instead, as CLIP's causal text transformer gives its first token no view
  of the caption) or the mask-weighted mean (``"mean"``), [B, hidden_size].

With an HF text tower the captions and region phrases are re-tokenized at load time by the
training loop (never by the recipe) with that model's tokenizer, from the cache's
``records.jsonl``; ids are stored shifted by one so that 0 stays the padding id the rest of
the code relies on, and the tower shifts them back.

Safety: weights load from safetensors only (no pickles) and no code from a checkpoint runs;
the research loop's runs are offline (``HF_HUB_OFFLINE``), so a recipe cannot make the
harness download anything. FLOPs (for MFU) are counted once per shape with PyTorch's
``FlopCounterMode`` on a dummy input.

Limits: timm needs torchvision, which does not install beside the CPU-only PyTorch wheel of
the CI machines: there the adapter and its wiring (weights file, normalisation, FLOPs, train,
resume) are tested against a stand-in module, and timm itself only where it imports. ``pool = "cls"`` takes
the first token's state (dual encoders aside, above), which means something only for
bidirectional encoders whose tokenizer prepends a CLS token (BERT-like); use
``text.pool = "mean"`` for others.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from eclip.errors import EclipError, first_line


def parse_spec(spec: str, kind: str) -> tuple[str, str | None]:
    """"timm:NAME[@FILE]" / "hf:NAME" → (NAME, FILE or None); one-line errors otherwise."""
    prefix = f"{kind}:"
    if not isinstance(spec, str) or not spec.startswith(prefix) or len(spec) == len(prefix):
        want = "timm:NAME[@FILE|@random]" if kind == "timm" else "hf:NAME_OR_DIRECTORY"
        raise EclipError(f"{'image_tower' if kind == 'timm' else 'text_tower'}: expected {want}, got {spec!r}")
    rest = spec[len(prefix):]
    if kind == "timm" and "@" in rest:
        name, weights = rest.split("@", 1)
        return name, weights
    return rest, None


def _require(module: str):
    try:
        mod = __import__(module)
    except Exception as e:  # ImportError, or timm failing on a missing/broken torchvision
        raise EclipError(f"pretrained towers need the [pretrained] extra: import {module} failed "
                         f"({type(e).__name__}: {first_line(e, 120)})") from None
    if module == "transformers":  # no progress bars or notices in the run's log and summary
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    return mod


class TimmImageTower(nn.Module):
    """A timm backbone as the image tower: normalised images [B, 3, H, W] → [B, width]."""

    def __init__(self, spec: str, image_size: int):
        super().__init__()
        name, weights = parse_spec(spec, "timm")
        kwargs = {"num_classes": 0}
        if weights not in (None, "random"):
            if not weights.endswith(".safetensors"):  # a pickle could run code when loaded
                raise EclipError(f"image_tower: {weights}: weights must be a .safetensors file")
            if not Path(weights).is_file():
                raise EclipError(f"image_tower: {weights}: weights file not found")
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        timm = _require("timm")
        try:
            try:
                self.model = timm.create_model(name, pretrained=weights != "random", img_size=image_size, **kwargs)
            except TypeError:  # a model without an img_size argument
                self.model = timm.create_model(name, pretrained=weights != "random", **kwargs)
        except Exception as e:
            raise EclipError(f"image_tower: timm could not build {name!r} "
                             f"({type(e).__name__}: {first_line(e, 160)})") from None
        self.width = int(self.model.num_features)
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        self.mean, self.std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
        self.image_size = image_size
        self._flops: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def flops(self) -> int:
        """Forward FLOPs per image, counted once on a dummy input (any architecture)."""
        if self._flops is None:
            p = next(self.model.parameters())
            self._flops = count_flops(self.model, torch.zeros(1, 3, self.image_size, self.image_size,
                                                              device=p.device, dtype=p.dtype))
        return self._flops


class HFTextTower(nn.Module):
    """A Hugging Face encoder as the text tower: shifted ids [B, L] (0 = padding) → [B, width]."""

    def __init__(self, spec: str, pool: str):
        super().__init__()
        _require("transformers")
        from transformers import AutoModel

        name, _ = parse_spec(spec, "hf")
        try:  # safetensors only and no code from the checkpoint: loading runs nothing
            model = AutoModel.from_pretrained(name, use_safetensors=True, trust_remote_code=False)
        except Exception as e:
            raise EclipError(f"text_tower: could not load {name!r} (a local directory, or a hub id when online; "
                             f"safetensors weights): {type(e).__name__}: {first_line(e, 160)}") from None
        # "cls" on a dual-encoder's text half (CLIP, SigLIP) is the model's own pooled output:
        # CLIP's text transformer is causal, so its first token's state sees nothing of the caption
        self.own_pool = hasattr(model, "text_model")
        if self.own_pool:  # a dual-encoder checkpoint: its text half
            model = model.text_model
        elif getattr(model.config, "is_encoder_decoder", False):  # T5-like: the encoder only
            model = model.get_encoder()
        self.model = model
        cfg = model.config
        self.width = int(getattr(cfg, "hidden_size", None) or cfg.d_model)
        self.pool = pool
        self._flops: dict[int, int] = {}
        self.train()  # from_pretrained hands the model over in eval mode: its dropout would stay off

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids = (tokens.long() - 1).clamp_min(0)  # the loop stores HF ids + 1 (0 = padding)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        if self.pool == "cls" and self.own_pool:
            return out.pooler_output  # [B, W]: CLIP's end-of-text state, SigLIP's head
        hidden = out.last_hidden_state  # [B, L, W]
        if self.pool == "cls":
            return hidden[:, 0]
        w = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)

    def flops(self, length: int | None = None) -> int:
        """Forward FLOPs per text of ``length`` tokens, counted once per length on a dummy input."""
        n = int(length or 1)
        if n not in self._flops:
            p = next(self.model.parameters())
            ids = torch.ones(1, n, dtype=torch.long, device=p.device)
            self._flops[n] = count_flops(lambda t: self.forward(t, t != 0), ids)
        return self._flops[n]


def count_flops(fn, *inputs) -> int:
    """FLOPs of one forward call, counted by PyTorch's FlopCounterMode (matmuls, convolutions,
    attention): what MFU needs for towers whose shapes this project does not know."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*inputs)
    return int(counter.get_total_flops())


def max_text_length(spec: str) -> int | None:
    """The longest input the HF model's position table takes (None when it has no table)."""
    _require("transformers")
    from transformers import AutoConfig

    name, _ = parse_spec(spec, "hf")
    try:
        cfg = AutoConfig.from_pretrained(name)
    except Exception:
        return None  # the model load reports the problem
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "max_position_embeddings", None)
    if n is None:
        return None
    # RoBERTa-style models number positions from pad_token_id + 1
    offset = int(cfg.pad_token_id) + 1 if getattr(cfg, "model_type", "") in (
        "roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text") and cfg.pad_token_id is not None else 0
    return int(n) - offset


def load_tokenizer(spec: str):
    _require("transformers")
    from transformers import AutoTokenizer

    name, _ = parse_spec(spec, "hf")
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise EclipError(f"text_tower: could not load the tokenizer of {name!r}: "
                         f"{type(e).__name__}: {first_line(e, 160)}") from None


def _encode(tok, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted ids int32 [n, length] (0 = padding) and lengths int32 [n]."""
    out = torch.zeros(len(texts), length, dtype=torch.int32)
    lengths = torch.zeros(len(texts), dtype=torch.int32)
    if texts:
        ids = tok(texts, truncation=True, max_length=length, padding=False)["input_ids"]
        for i, row in enumerate(ids):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.int32) + 1
            lengths[i] = len(row)
    return out, lengths


def retokenize(cache, spec: str):
    """A copy of ``cache`` whose captions and phrases are the HF tokenizer's (shifted) ids,
    read from its ``records.jsonl`` in the order the cache stores them."""
    tok = load_tokenizer(spec)
    path = cache.path / "records.jsonl"
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for i, r in enumerate(records, 1):  # damage that keeps the file's size passes the cache's own check
            texts = [r.get("captions"), r.get("phrases", [])] if isinstance(r, dict) else [None]
            if not all(isinstance(t, list) and all(isinstance(x, str) for x in t) for t in texts):
                raise ValueError(f"record {i} has no list of captions and phrases")
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise EclipError(f"{path}: unreadable ({e}); rebuild the cache with python -m eclip.prepare") from None
    if cache.rows is not None:  # a subset (Cache.subset): the records of its images, in its order
        rows = cache.rows.tolist()
        records = [records[i] for i in rows] if max(rows, default=-1) < len(records) else []
    captions = [c for r in records for c in r["captions"]]
    phrases = [p for r in records for p in r.get("phrases", [])]
    if len(records) != cache.images.shape[0] or len(captions) != cache.tokens.shape[0] \
            or len(phrases) != cache.region_tokens.shape[0]:
        raise EclipError(f"{path}: {len(records)} images, {len(captions)} captions, {len(phrases)} phrases do not "
                         f"match the cache's {cache.images.shape[0]}, {cache.tokens.shape[0]}, "
                         f"{cache.region_tokens.shape[0]} (a cache written before records listed only the regions "
                         f"kept); rebuild it with python -m eclip.prepare --force")
    limit = min(int(getattr(tok, "model_max_length", None) or 512), max_text_length(spec) or 10**9)
    if limit < 4:
        raise EclipError(f"text_tower: {spec} takes at most {limit} tokens; too short for captions")
    length = min(int(cache.tokens.shape[1]), limit)
    tokens, lengths = _encode(tok, captions, length)
    rtokens, rlengths = _encode(tok, phrases, min(int(cache.region_tokens.shape[1]), int(limit)))
    manifest = dict(cache.manifest, tokenizer=dict(cache.manifest.get("tokenizer", {}), vocab_size=len(tok) + 1,
                                                   source=spec))
    return replace(cache, manifest=manifest, tokens=tokens, lengths=lengths, region_tokens=rtokens,
                   region_lengths=rlengths)
