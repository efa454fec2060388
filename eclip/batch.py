"""The training batch: what the harness hands a recipe's ``train_step`` each step.

Every tensor is already on the training device. Images stay uint8 until the model
normalises them, so a batch of 256 images at 224 px is 38 MB, not 154 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, H, W] RGB, or float in [0, 1] after augmentation
    tokens: torch.Tensor  # int64 [B, L] caption token ids, padded with 0
    mask: torch.Tensor  # bool [B, L], True at real tokens
    boxes: torch.Tensor  # float32 [B, K, 4] region boxes (x1, y1, x2, y2) in [0, 1]; 0 where absent
    # bool [B, K]: True at the boxes of the sampled phrase (its region, and any other box of
    # the image with the same phrase) that survived augmentation: what the heatmap shows
    box_mask: torch.Tensor
    phrase_tokens: torch.Tensor  # int64 [B, Lp] tokens of one region phrase per sample
    phrase_mask: torch.Tensor  # bool [B, Lp], True at real tokens (all False without regions)
    has_region: torch.Tensor  # bool [B], True when the sample's phrase has a box (box_mask.any(1))
    # int64 [B]: the phrase's id among the split's distinct phrases (equal ids, equal tokens),
    # so telling twin phrases apart is one sort key, not a row of tokens; None when not known
    phrase_id: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{k: v if v is None else v.to(device, non_blocking=non_blocking) for k, v in vars(self).items()})
