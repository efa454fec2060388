"""Triton kernels for eCLIP training, each with a plain PyTorch reference.

Public API:
  * ``retrieval_ranks`` / ``retrieval_ranks_ref`` and the ``Ranks`` result type
    (streamed retrieval ranks, both directions).

Importing this package touches neither the network nor the GPU.
"""

from .retrieval import Ranks, retrieval_ranks, retrieval_ranks_ref

__all__ = ["Ranks", "retrieval_ranks", "retrieval_ranks_ref"]
