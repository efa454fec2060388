"""The retrieval rank tests, rerun with the Triton kernel under the interpreter.

This process runs with TRITON_INTERPRET=1 (see tests/conftest.py), so retrieval_ranks sends
CPU tensors through the Triton kernel: every test of tests/test_kernels_retrieval.py then
checks the kernel against the float64 brute force, bf16 included (upcast in the kernel).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_kernels_retrieval import *  # noqa: E402,F401,F403

import kernels  # noqa: E402
from kernels._common import resolve_backend  # noqa: E402


def test_cpu_tensors_take_the_triton_path():
    assert kernels._common.INTERPRET
    assert resolve_backend(None, torch.zeros(2, 2), "retrieval_ranks") == "triton"


def test_kernel_matches_reference_on_ragged_multi_tile_sizes():
    # 70 x 45 queries/keys: several 32-row tiles with ragged tails in both directions, and
    # captions spread over many key tiles (txt_image unsorted) so phase 1 spans tiles.
    g = torch.Generator().manual_seed(0)
    img = torch.randn(45, 19, generator=g).half()
    txt = torch.randn(70, 19, generator=g).half()
    txt_image = torch.randint(0, 45, (70,), generator=g)
    txt_image[:45] = torch.arange(45)
    txt_image = txt_image[torch.randperm(70, generator=g)]
    got = kernels.retrieval_ranks(img, txt, txt_image)
    want = kernels.retrieval_ranks(img, txt, txt_image, backend="torch")
    assert torch.equal(got.i2t, want.i2t) and torch.equal(got.t2i, want.t2i)
