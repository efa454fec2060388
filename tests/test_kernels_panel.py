"""The lean panel backward's split-K product (kernels._contrastive_panel), on the CPU.

``split_product`` computes Ĝ_panel·k as a sum over K chunks of fp32 partial products; on
CUDA the chunks are cuBLAS products that write fp32 (out_dtype), here fp32 products of
upcast operands: the chunking, the strided views and the order of the sum are the same code.
The whole panel backward with splits is checked under the Triton interpreter
(tests/interpret/) and on CUDA (tests/test_kernels_contrastive.py, B = 4,099 with small panels).
Tolerance: (any dtype, atol 0, rtol 1e-5 norm-wise) against a float64 product of the same
rounded operands: fp32 accumulation over K ≤ 3,000, in a different order.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels import _contrastive_panel as panel  # noqa: E402


def _operands(rows, n, dim, dtype, k_layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, n, generator=g).to(dtype)
    # Ĝ's rows nearly cancel: a large diagonal-like entry against many small ones
    a[:, 0] = -a[:, 1:].sum(dim=1).to(dtype)
    k = torch.randn(n, dim, generator=g).to(dtype)
    if k_layout == "column-major":  # a transposed view, as when k is txt.T-shaped storage
        k = k.T.contiguous().T
    return a, k


@pytest.mark.parametrize("rows,n,dim,splits", [
    (80, 3000, 40, 4),    # ragged: 3000 = 2 chunks of 1024 + 952
    (33, 1024, 17, 2),    # two whole chunks, no rest
    (7, 1000, 24, 3),     # 1000 / 3 aligned up to 384: 2 whole chunks + 232
    (16, 130, 8, 2),      # chunk 128 (aligned up from 65) → 1 whole + 2
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k_layout", ["row-major", "column-major"])
def test_split_product_matches_one_float64_product(rows, n, dim, splits, dtype, k_layout):
    a, k = _operands(rows, n, dim, dtype, k_layout, seed=rows)
    parts = torch.full((splits * rows * dim,), float("nan"))  # scratch exactly as the launcher sizes it
    got = panel.split_product(a, k, splits, parts)
    want = a.double() @ k.double()
    assert got.dtype == torch.float32 and got.shape == (rows, dim)
    assert torch.isfinite(got).all()
    assert (got.double() - want).norm() <= 1e-5 * want.norm()


def test_split_product_chunks():
    # Chunk lengths are multiples of SPLIT_ALIGN; never more chunks than splits; each chunk's
    # partial is a product of that chunk alone (checked through the scratch it leaves).
    a, k = _operands(8, 3000, 16, torch.float32, "row-major")
    parts = torch.zeros(4 * 8 * 16)
    panel.split_product(a, k, 4, parts)
    kc = 768  # 3000 / 4 = 750, aligned up to 64
    chunks = parts.view(4, 8, 16)
    for c in range(4):
        lo, hi = c * kc, min(3000, (c + 1) * kc)
        torch.testing.assert_close(chunks[c], a[:, lo:hi] @ k[lo:hi], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,n,dim,want", [
    (640, 32768, 512, 12),      # B = 32k, a 40 MiB bf16 panel: 20 tiles → 14, capped by 16 MiB of partials
    (1280, 16384, 512, 6),      # B = 16k: 40 tiles → 7, capped by the partials' 16 MiB
    (256, 1 << 20, 512, 32),    # B = 1M, the 256-row floor: 8 tiles → 33, capped at 32 by the bytes
    (4099, 4099, 512, 1),       # one panel of a ragged B: two chunks' partials would pass 16 MiB
    (3000, 3000, 768, 1),       # partials of one chunk would exceed SPLIT_BYTES
    (256, 1500, 64, 1),         # K too short for two chunks of MIN_SPLIT_LEN
])
def test_split_k(rows, n, dim, want):
    assert panel.split_k(rows, n, dim) == want
    assert want == 1 or want * rows * dim * 4 <= panel.SPLIT_BYTES


def test_half_precision_products_write_fp32_on_meta_tensors():
    # The CUDA call's signature (out_dtype with out=), checked where it runs without a GPU.
    a = torch.empty((3, 8, 64), dtype=torch.bfloat16, device="meta")
    b = torch.empty((3, 64, 16), dtype=torch.bfloat16, device="meta")
    out = torch.empty((3, 8, 16), device="meta")
    torch.bmm(a, b, out_dtype=torch.float32, out=out)
    torch.mm(a[0], b[0], out_dtype=torch.float32, out=out[0])
    assert out.dtype == torch.float32
