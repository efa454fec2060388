"""Triton kernels for eCLIP training, each with a plain PyTorch reference.

Public API:
  * ``contrastive_loss`` / ``contrastive_loss_ref``: fused symmetric InfoNCE loss (lean and
    fast modes), a torch.library custom op usable under torch.compile;
  * ``retrieval_ranks`` / ``retrieval_ranks_ref`` and the ``Ranks`` result type
    (streamed retrieval ranks, both directions).

Importing this package touches neither the network nor the GPU.
"""

from .contrastive import contrastive_loss, contrastive_loss_ref
from .retrieval import Ranks, retrieval_ranks, retrieval_ranks_ref

__all__ = ["Ranks", "contrastive_loss", "contrastive_loss_ref", "retrieval_ranks", "retrieval_ranks_ref"]
