"""Retrieval ranks: the streamed kernel (the chunked reference on CPU) against the dense
similarity matrix and one comparison, the plain way."""

import pytest
import torch
import torch.nn.functional as F

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
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(DEVICE)
    txt = F.normalize(img.cpu() + 0.5 * torch.randn(n, d, generator=g), dim=-1).to(DEVICE)
    fn = (lambda: kernels.retrieval_ranks(img, txt)[:2]) if impl == "kernel" else (lambda: dense_ranks(img, txt))
    fn()
    describe(benchmark, "ranks", impl, impl == "dense", N=n, D=d, peak_extra_bytes=peak_extra_bytes(fn))
    i2t, t2i = benchmark(timed(fn))
    ref = dense_ranks(img, txt)
    assert torch.equal(i2t, ref[0]) and torch.equal(t2i, ref[1])
    if impl == "kernel":
        paired_ratio(benchmark, fn, lambda: dense_ranks(img, txt))
