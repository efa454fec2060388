"""Retrieval ranks: the streamed kernel (the chunked reference on CPU) against the dense
similarity matrix and one comparison, the plain way."""

import pytest
import torch

import kernels
from bench.conftest import DEVICE, describe, paired_ratio, peak_extra_bytes, timed

SIZES = [(20_000, 512)] if DEVICE.type == "cuda" else [(2_000, 64)]


def dense_ranks(img, txt):
    s = img.float() @ txt.float().T
    pos = s.diagonal()
    return (s >= pos[:, None]).sum(1) - 1, (s >= pos[None, :]).sum(0) - 1


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("impl", ["kernel", "dense"])
def bench_retrieval_ranks(benchmark, impl, n, d):
    # Small integers (fp32): every score is exact whatever the summation order (the kernel's
    # 3xTF32 D-chunks, cuBLAS), so the two rankings must agree to the last tie. Random floats
    # at N = 20k have near-ties that the two orders round apart.
    g = torch.Generator().manual_seed(0)
    img = torch.randint(-2, 3, (n, d), generator=g).float()
    txt = (img + torch.randint(-2, 3, (n, d), generator=g)).float()
    img, txt = img.to(DEVICE), txt.to(DEVICE)
    fn = (lambda: kernels.retrieval_ranks(img, txt)[:2]) if impl == "kernel" else (lambda: dense_ranks(img, txt))
    fn()
    describe(benchmark, "ranks", impl, impl == "dense", N=n, D=d, peak_extra_bytes=peak_extra_bytes(fn))
    i2t, t2i = benchmark(timed(fn))
    ref = dense_ranks(img, txt)
    assert torch.equal(i2t, ref[0]) and torch.equal(t2i, ref[1])
    if impl == "kernel":
        paired_ratio(benchmark, fn, lambda: dense_ranks(img, txt))
