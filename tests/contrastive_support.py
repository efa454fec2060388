"""Shared pieces of the contrastive_loss tests (test_kernels_contrastive.py,
test_kernels_contrastive_behaviour.py, and interpret/test_contrastive_interp.py, which reruns
both under the Triton interpreter): inputs, the float64 reference, a training-style call, and
the norm-wise comparison with the tolerances stated in test_kernels_contrastive.py's docstring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import contrastive_loss

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The two lean backwards (see kernels.contrastive) and the fast mode; "lean" picks a lean
# backward by D (tested in tests/interpret/, where the choice reaches the kernels).
MODES = ["lean:fused", "lean:panel", "fast"]
ATOL = 1e-4


def tolerances(dtype: torch.dtype, mode: str) -> tuple[float, float]:
    """(loss rtol, gradient rtol), with their reasons in test_kernels_contrastive.py."""
    if dtype == torch.float32:
        return (1e-5, 2e-3) if mode.startswith("lean") else (1e-5, 1e-2)
    if dtype == torch.float16 and mode.startswith("lean"):
        return 1e-4, 2e-3
    return 1e-4, 1e-2


def make_inputs(b, d, dtype, device, seed=0, normalise=True):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    if normalise:
        img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    return img.to(device=device, dtype=dtype), txt.to(device=device, dtype=dtype)


def reference(img, txt, scale, upstream=1.0):
    """Float64 textbook loss and its autograd gradients."""
    a = img.detach().double().cpu().requires_grad_()
    b = txt.detach().double().cpu().requires_grad_()
    s = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    logits = s * a @ b.T
    y = torch.arange(a.shape[0])
    loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
    (loss * upstream).backward()
    return loss.detach(), a.grad, b.grad, s.grad


def run(img, txt, scale, upstream=1.0, **kwargs):
    a = img.detach().clone().requires_grad_()
    b = txt.detach().clone().requires_grad_()
    s = torch.tensor(float(scale), device=img.device, requires_grad=True)
    loss = contrastive_loss(a, b, s, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), a.grad, b.grad, s.grad


def assert_close(got, want, rtol, what, atol=ATOL):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err, ref = (got - want).norm().item(), want.norm().item()
    assert err <= atol + rtol * ref, f"{what}: error {err:.3g} vs norm {ref:.3g} (rtol {rtol}, atol {atol:.2g})"


def residue_atol(b: int, scale: float) -> float:
    """The absolute tolerance (see test_kernels_contrastive.py): B = 1's exact zeros get the
    rounding residue of the recomputed logits, s²·2⁻²³, on top of ATOL."""
    return ATOL + (float(scale) ** 2 * 2.0**-23 if b == 1 else 0.0)


def check_against_reference(img, txt, scale, mode, upstream=1.0):
    loss_tol, grad_tol = tolerances(img.dtype, mode)
    atol = residue_atol(img.shape[0], scale)
    got = run(img, txt, scale, upstream, mode=mode)
    want = reference(img, txt, scale, upstream)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert got[1].dtype == img.dtype and got[2].dtype == txt.dtype
    assert_close(got[0], want[0], loss_tol, "loss", atol)
    for name, g, w in zip(("d_img", "d_txt", "d_scale"), got[1:], want[1:], strict=True):
        assert_close(g, w, grad_tol, name, atol)
