"""Shared pieces of the CLIP model tests (``test_model_towers.py``, ``test_model_training.py``,
``test_model_config.py``, and ``test_expert.py``'s smaller one): a very small config with a
ragged shape and random token rows with their masks."""

from __future__ import annotations

import torch

from eclip.model import ModelConfig, model_config


def micro(**overrides) -> ModelConfig:
    """A very small config (fast on CPU) with a ragged shape: 24 px, patch 8 (9 patches),
    odd-sized text, widths not powers of two."""
    base = {"vision.patch_size": 8, "vision.pool": "mean", "text.pool": "mean",
            "vision.width": 24, "vision.depth": 2, "vision.heads": 3, "text.width": 20,
            "text.depth": 2, "text.heads": 2, "embed_dim": 12, "expert.width": 16,
            "expert.heads": 2}
    base.update(overrides)
    return model_config("tiny", image_size=24, vocab_size=37, context_length=7, **base)


def make_tokens(lengths: list[int], context: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (len(lengths), context), generator=g)
    mask = torch.arange(context)[None, :] < torch.tensor(lengths)[:, None]
    return tokens * mask, mask
