"""merge_lse and fast_scalars (kernels/_contrastive_reduce.py) against float64.

Both exist only as Triton kernels (the reference path never calls them), so their cases run
on CUDA, and on CPU tensors in the interpreter rerun (tests/interpret/); the normal CPU run
has no device for them and skips.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels._common import HAVE_TRITON, INTERPRET

if HAVE_TRITON:
    from kernels._contrastive_reduce import fast_scalars, merge_lse

DEVICES = ["cpu", "cuda"]
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")


def _needs(device: str) -> None:
    if device == "cpu" and not INTERPRET:
        pytest.skip("a Triton-only kernel: CPU tensors run it in the TRITON_INTERPRET=1 rerun (tests/interpret/)")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _lse_from_log2_parts(part: torch.Tensor) -> torch.Tensor:
    """Natural-log LSE over dim 0 of log2-sum-exp2 partials, float64."""
    return torch.logsumexp(part.double() * math.log(2.0), dim=0)


# (n, row parts, column parts): B = 1; parts over two merge steps with a ragged second one
# (MERGE_PARTS = 32); a side with 0 parts (its LSE given, as the lean forward's rows are);
# ragged column blocks.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,n_rparts,n_cparts", [(1, 1, 1), (150, 37, 5), (64, 0, 70), (300, 3, 33)])
def test_merge_lse_against_float64(n, n_rparts, n_cparts, device):
    _needs(device)
    # Tolerance (float32, atol 1e-4, rtol 1e-6): partials up to ±150 (log2 units, s = 100),
    # exp2 and log2 in fp32 leave a few ulps of values that size.
    g = torch.Generator().manual_seed(n + n_rparts)
    rpart = torch.randn(max(n_rparts, 1) + 4, n, generator=g) * 50.0
    cpart = torch.randn(n_cparts + 4, n, generator=g) * 50.0
    if n_cparts > 1:  # a spread of 300 within one column: 2^-300 underflows, weight 0
        cpart[0, 0], cpart[1, 0] = 150.0, -150.0
    if n_cparts > 40 and n > 1:  # a first merge step of -inf parts only (weight 0), then finite ones
        cpart[:32, 1] = float("-inf")
    rpart[max(n_rparts, 1):] = float("nan")  # rows past n_parts hold other configs' leftovers
    cpart[n_cparts:] = float("nan")
    diag = torch.randn(n, generator=g) * 10.0
    given_rows = torch.randn(n, generator=g) * 10.0  # the row LSE when it has 0 parts
    row_lse = given_rows.clone() if n_rparts == 0 else torch.full((n,), float("nan"))
    col_lse = torch.full((n,), float("nan"))
    rpart, cpart, diag, row_lse, col_lse = (t.to(device) for t in (rpart, cpart, diag, row_lse, col_lse))

    loss = merge_lse(rpart, n_rparts, cpart, n_cparts, row_lse, col_lse, diag)

    want_rows = given_rows.double() if n_rparts == 0 else _lse_from_log2_parts(rpart[:n_rparts].cpu())
    want_cols = _lse_from_log2_parts(cpart[:n_cparts].cpu())
    if n_rparts == 0:
        assert torch.equal(row_lse.cpu(), given_rows), "a side with 0 parts must be read, not written"
    torch.testing.assert_close(row_lse.cpu().double(), want_rows, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(col_lse.cpu().double(), want_cols, atol=1e-4, rtol=1e-6)
    want_loss = (want_rows.sum() + want_cols.sum() - 2.0 * diag.cpu().double().sum()) / (2 * n)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.cpu().double(), want_loss, atol=1e-5, rtol=1e-6)


def _scalars_inputs(n, dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    # non-contiguous: every other row and column of a larger matrix (img), a column-major view (txt)
    img = torch.randn(2 * n, 2 * dim, generator=g).to(device=device, dtype=dtype)[::2, ::2]
    txt = torch.randn(dim, n, generator=g).to(device=device, dtype=dtype).T
    return img, txt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,dim,s,grad,dtype,scale_dtype", [
    (45, 40, 0.0, 1.0, torch.float32, torch.float32),  # s = 0, ragged: 2 row blocks of 32, a D block of 64
    (70, 130, 0.0, 0.25, torch.bfloat16, torch.bfloat16),  # s = 0 over two D blocks of 128
    # s tiny but not 0: z = c·x sinks into fp32's subnormals and Σ Ĝ∘z / c flipped sign at
    # 1e-40; such s take the s = 0 sums, exact to O(s·|x|)
    (45, 40, 1e-40, 1.0, torch.float32, torch.float32),
    (45, 40, -3e-25, 1.0, torch.float16, torch.float32),
    (1, 16, 14.3, 1.0, torch.float32, torch.float32),
    (300, 64, 100.0, -0.5, torch.float16, torch.float16),
    # 1/(2B) inexact: a division by its rounded reciprocal would be an ulp off here
    (1536, 16, 100.0, 1.0, torch.bfloat16, torch.float64),
])
def test_fast_scalars_against_float64(n, dim, s, grad, dtype, scale_dtype, device):
    _needs(device)
    img, txt = _scalars_inputs(n, dim, dtype, device, seed=n)
    gz = torch.tensor(-37.25, device=device)  # Σ Ĝ∘z as the forward left it
    scale = torch.tensor(s, dtype=scale_dtype, device=device)
    g = torch.tensor(grad, device=device)

    coef, ds = fast_scalars(gz, scale, g, img, txt)

    # coef = fl(fl(s·g) / (2B)): the fp32 product, then one correctly rounded division (the
    # double quotient rounded to fp32 is that, as 53 ≥ 2·24 + 2 bits)
    sg = (scale.float() * g.float()).item()
    assert coef.item() == torch.tensor(sg / (2 * n), dtype=torch.float32).item()
    a, b = img.cpu().double(), txt.cpu().double()
    if abs(s) * math.log2(math.e) < 2.0 ** -64:
        cross = (2.0 / n) * torch.dot(a.sum(0), b.sum(0))
        trace = 2.0 * (a * b).sum()
        want = (cross - trace) * grad / (2 * n)
        # (float32, atol 1e-5·(|cross| + |trace|)·|g|/(2B)): fp32 sums of B·D products, whose
        # two terms may cancel
        atol = 1e-5 * (abs(cross.item()) + abs(trace.item())) * abs(grad) / (2 * n)
        assert abs(ds.item() - want.item()) <= atol, (ds.item(), want.item())
    else:
        want = -37.25 / (s * math.log2(math.e)) * grad / (2 * n)
        # (float32, rtol 1e-6): five correctly rounded fp32 operations (s·log2 e, ÷, ·g, 2B,
        # ÷), about 3e-7 in all
        assert math.isclose(ds.item(), want, rel_tol=1e-6), (ds.item(), want)
