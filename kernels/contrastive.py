"""Fused symmetric contrastive (CLIP / InfoNCE) loss with its gradients.

Math: with S = s·I·Tᵀ (I = img, T = txt: [B, D]; s = ``scale``, the exponentiated logit
scale, a 0-d tensor that receives a gradient),
    L = ½·[mean_i(LSE_j S_ij − S_ii) + mean_j(LSE_i S_ij − S_jj)]
    G = ∂L/∂S = (P + Q − 2·Id)/(2B),  P = softmax over each row, Q = softmax over each column
    ∂L/∂I = s·G·T,  ∂L/∂T = s·Gᵀ·I,  ∂L/∂s = Σ_ij G_ij·(I·Tᵀ)_ij

Modes (Triton backend; chosen from the free device memory with ``mode="auto"``):
  * ``lean`` never stores S. The forward streams over S tiles (``_contrastive_lean``); the
    backward comes in two implementations, both 5 passes of B²·D matmul work or more:
      - ``lean:fused``: two Triton kernels recompute S and accumulate Ĝ·k in registers;
        memory O(B·D), but a wide D is split into chunks that each recompute S;
      - ``lean:panel``: Ĝ built a row panel (56 MiB) at a time by a Triton kernel, the
        products by cuBLAS (``_contrastive_panel``); memory O(B·D) plus the panel.
    ``lean`` picks the panel for bf16/fp16 inputs with D > PANEL_MIN_DIM, where the fused
    kernels recompute S per chunk, and the fused kernels otherwise: below it writing the
    panel would cost more than its product (a roofline choice, to be confirmed by
    bench/kernel_table.py), and for fp32 the panel's cuBLAS products would run in full fp32
    (or TF32, by the global setting) where the fused kernels use TF32 by design.
  * ``fast`` stores S once, 2 bytes a logit (half the 4 bytes/logit of the compiled plain
    loss), and needs 3 matmuls; when a gradient is needed its forward turns S into Ĝ in
    the same buffer, which the backward's two products read. See ``_contrastive_fast``.
Both take bf16 / fp16 / fp32 inputs (fp32 accumulation; fp32 inputs use 3xTF32 for the
scores), any B ≥ 1, D ≤ 1024, non-contiguous inputs, and are deterministic (no atomics):
bitwise the same outputs for the same inputs within a process, and across processes under
``torch.use_deterministic_algorithms(True)``, which pins the fixed launch configs.
The loss is returned in fp32; gradients come back in the inputs' dtypes. The fast mode's
Ĝ is stored in bf16 whatever the inputs, so its gradients are bf16-accurate (relative
error up to about 1e-2 against float64, fp32 inputs included), and where a gradient is a
small difference of large terms (near-duplicate rows at a large scale: at s = 100, B = 8,
rows equal up to 1e-4, the largest error was half the largest entry of dI and four times
that of dT) they carry bf16's error relative to the terms, about 3e-3·s/(2B) an entry, not
to their difference (a plain loss with its logits under bf16 autocast erred as much on
those rows); the lean modes' follow the inputs' precision. Logits past fp32's reach (unnormalised fp16 inputs near 6e4) make the
loss meaningless, as for any fp32-accumulated loss.

Contract: ``contrastive_loss(img, txt, scale, *, mode="auto", backend=None)`` → 0-d fp32.
It is a ``torch.library`` custom op pair (forward, backward) with fake implementations and
autograd registered, so ``torch.compile(fullgraph=True)`` traces it without a graph break
and CUDA graphs can capture it (no host synchronisation inside). Dispatch: CUDA tensors →
Triton, CPU tensors → the chunked PyTorch reference, ``TRITON_INTERPRET=1`` → CPU tensors
through Triton; ``backend=`` overrides. The backward op only reads what the forward saved,
so Inductor keeps the fast mode's B² buffer in place and ``retain_graph=True`` works.
Triton launches follow the inputs' device, not the current one, and the caller's autocast
does not reach inside (the reference stays fp32). First-order only: the backward op has no
derivative of its own, so a second derivative (``create_graph=True``, then a backward
through the gradients) raises, and ``torch.func`` transforms (``grad``, ``vmap``) are not
supported.
"""

from __future__ import annotations

import functools
import math
import sys

import torch

from ._common import HAVE_TRITON, check_matrix, int32_columns, on_device_of, resolve_backend

if HAVE_TRITON:
    from ._contrastive_fast import fast_backward, fast_forward, grad_dtype
    from ._contrastive_lean import lean_backward, lean_forward
    from ._contrastive_panel import panel_backward

_OP = "contrastive_loss"
MAX_DIM = 1024  # the kernels' limit on D (register and shared-memory budget per tile)
MODES = ("auto", "lean", "lean:fused", "lean:panel", "fast")  # the values of contrastive_loss(mode=...)
PANEL_MIN_DIM = 256  # "lean" uses the panel backward above this D (half-precision inputs)

# ---------------------------------------------------------------------------------------
# Plain PyTorch reference, chunked: memory O(chunk·B). Used for CPU tensors and
# backend="torch"; also the body of contrastive_loss_ref.
# ---------------------------------------------------------------------------------------


def _default_chunk(n: int) -> int:
    return max(1, (1 << 22) // n)  # about 16 MiB of fp32 logits per chunk


def _ref_forward(img, txt, scale, chunk: int):
    """Returns (loss 0-d fp32, row_lse [B] fp32, col_lse [B] fp32), all in fp32."""
    n = img.shape[0]
    chunk = chunk or _default_chunk(n)
    a, b, s = img.float(), txt.float(), scale.float()
    row_lse = torch.empty(n, dtype=torch.float32, device=img.device)
    diag = torch.empty(n, dtype=torch.float32, device=img.device)
    col_m = torch.full((n,), float("-inf"), dtype=torch.float32, device=img.device)
    col_l = torch.zeros(n, dtype=torch.float32, device=img.device)
    for st in range(0, n, chunk):
        logits = s * (a[st : st + chunk] @ b.T)  # [c, B]
        row_lse[st : st + chunk] = torch.logsumexp(logits, dim=1)
        diag[st : st + chunk] = torch.diagonal(logits, offset=st)
        m_new = torch.maximum(col_m, logits.max(dim=0).values)
        col_l = col_l * torch.exp(col_m - m_new) + torch.exp(logits - m_new).sum(dim=0)
        col_m = m_new
    col_lse = col_m + torch.log(col_l)
    loss = (row_lse.sum() + col_lse.sum() - 2.0 * diag.sum()) / (2.0 * n)
    return loss, row_lse, col_lse


def _ref_backward(grad, img, txt, scale, row_lse, col_lse, chunk: int):
    """Returns (dI, dT, ds) by recomputing the logits chunk by chunk."""
    n = img.shape[0]
    chunk = chunk or _default_chunk(n)
    a, b, s = img.float(), txt.float(), scale.float()
    # Contiguous whatever the inputs' layout: the fake backward promises contiguous gradients.
    d_a = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    d_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
    gx = torch.zeros((), dtype=torch.float32, device=img.device)  # Σ Ĝ∘(I·Tᵀ)
    for st in range(0, n, chunk):
        x = a[st : st + chunk] @ b.T  # [c, B]
        logits = s * x
        g = torch.exp(logits - row_lse[st : st + chunk, None]) + torch.exp(logits - col_lse[None, :])
        torch.diagonal(g, offset=st).sub_(2.0)  # Ĝ = P + Q − 2·Id
        d_a[st : st + chunk] = g @ b
        d_b += g.T @ a[st : st + chunk]
        gx += (g * x).sum()
    coef = s * grad.float() / (2.0 * n)
    d_scale = gx * grad.float() / (2.0 * n)
    return (d_a * coef).to(img.dtype), (d_b * coef).to(txt.dtype), d_scale.to(scale.dtype)


# ---------------------------------------------------------------------------------------
# Custom ops (forward, backward) and their autograd wiring
# ---------------------------------------------------------------------------------------


def _no_buffers(img: torch.Tensor):
    return img.new_empty((0, 0), dtype=torch.bfloat16), img.new_zeros((), dtype=torch.float32)


def _saves_g(variant: str, impl: str, need_grad: bool) -> bool:
    return impl == "triton" and variant == "fast" and need_grad


@torch.library.custom_op("eclip::contrastive_loss_fwd", mutates_args=())
def _loss_fwd(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, variant: str, impl: str, chunk: int,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, row_lse, col_lse, g, gz); g = Ĝ [B, B] and gz = Σ Ĝ∘z are what the fast mode
    saves for its backward (when ``need_grad``), empty otherwise. variant: "lean:fused" |
    "lean:panel" | "fast" (the lean variants share the forward); impl: "triton" | "torch"
    (the reference); chunk: rows per reference chunk (0: default)."""
    with on_device_of(img):
        if impl == "torch":
            return (*_ref_forward(img, txt, scale, chunk), *_no_buffers(img))
        if variant == "fast":
            return fast_forward(img, txt, scale, need_grad)
        return (*lean_forward(img, txt, scale), *_no_buffers(img))


@_loss_fwd.register_fake
def _loss_fwd_fake(img, txt, scale, variant, impl, chunk, need_grad):
    n = img.shape[0]
    f32 = dict(dtype=torch.float32)
    if _saves_g(variant, impl, need_grad):
        bufs = (img.new_empty((n, n), dtype=grad_dtype(img.dtype)), img.new_empty((), **f32))
    else:
        bufs = _no_buffers(img)
    return (img.new_empty((), **f32), img.new_empty((n,), **f32), img.new_empty((n,), **f32), *bufs)


@torch.library.custom_op("eclip::contrastive_loss_bwd", mutates_args=())
def _loss_bwd(
    grad: torch.Tensor,
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    g: torch.Tensor,
    gz: torch.Tensor,
    variant: str,
    impl: str,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dI, dT, ds), reading the saved tensors only."""
    with on_device_of(img):
        if impl == "torch":
            return _ref_backward(grad, img, txt, scale, row_lse, col_lse, chunk)
        if variant == "fast":
            return fast_backward(g, gz, img, txt, scale, grad)
        if variant == "lean:panel":
            return panel_backward(img, txt, scale, grad, row_lse, col_lse)
        return lean_backward(img, txt, scale, grad, row_lse, col_lse)


@_loss_bwd.register_fake
def _loss_bwd_fake(grad, img, txt, scale, row_lse, col_lse, g, gz, variant, impl, chunk):
    return (
        img.new_empty(img.shape),
        txt.new_empty(txt.shape),
        scale.new_empty(()),
    )


def _setup_context(ctx, inputs, output):
    img, txt, scale, variant, impl, chunk, need_grad = inputs
    _, row_lse, col_lse, g, gz = output
    ctx.save_for_backward(img, txt, scale, row_lse, col_lse, g, gz)
    ctx.mark_non_differentiable(row_lse, col_lse, g, gz)
    # Without this, autograd hands the backward a zero gradient for every output, the
    # non-differentiable ones included: a B×B zero tensor for g (512 MiB at B = 16,384).
    ctx.set_materialize_grads(False)
    ctx.config = (variant, impl, chunk)
    if _saves_g(variant, impl, True) and not need_grad:
        raise RuntimeError(f"{_OP}: the fast mode's forward ran without need_grad but a gradient is required")


def _backward(ctx, grad, *_):
    if grad is None:  # the loss itself did not reach the objective
        return None, None, None, None, None, None, None
    img, txt, scale, row_lse, col_lse, g, gz = ctx.saved_tensors
    d_img, d_txt, d_scale = _loss_bwd(grad, img, txt, scale, row_lse, col_lse, g, gz, *ctx.config)
    return d_img, d_txt, d_scale, None, None, None, None


torch.library.register_autograd("eclip::contrastive_loss_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------


def _check_inputs(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, op: str) -> None:
    check_matrix(op, "img", img, MAX_DIM)
    check_matrix(op, "txt", txt, MAX_DIM)
    if img.shape != txt.shape:
        raise ValueError(
            f"{op}: img and txt must have the same shape [B, D], got {tuple(img.shape)} and {tuple(txt.shape)}"
        )
    if img.dtype != txt.dtype:
        raise ValueError(f"{op}: img and txt must have the same dtype, got {img.dtype} and {txt.dtype}")
    if img.shape[0] < 1:
        raise ValueError(f"{op}: img and txt need B >= 1 rows, got {tuple(img.shape)}")
    if img.device != txt.device:
        raise ValueError(f"{op}: img is on {img.device} but txt is on {txt.device}")
    if not isinstance(scale, torch.Tensor) or scale.dim() != 0 or not scale.is_floating_point():
        got = (f"shape {tuple(scale.shape)}, {scale.dtype}" if isinstance(scale, torch.Tensor)
               else type(scale).__name__)
        raise ValueError(f"{op}: scale must be a 0-d floating-point tensor (exp of the logit scale), got {got}")
    if scale.device != img.device:
        raise ValueError(f"{op}: scale is on {scale.device} but img is on {img.device}")


@functools.lru_cache(maxsize=16)
def _fast_max_b_cached(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    dev = torch.device(device)
    free, _ = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    # fast when its 2.2·B² bytes (S in bf16 + references + partial sums during the forward)
    # take at most half the free memory
    return math.isqrt(int(0.5 * free / 2.2))


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` when
    nothing has yet: that import costs about 1 s, a third of the start-up of every process
    that imports ``kernels`` (the harness's evaluation processes, which never compile). The
    public decorator sets one attribute, which Dynamo reads when it traces a call;
    tests/test_kernels_contrastive_behaviour.py checks that it still sets nothing else."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _fast_max_b(device: str) -> int:
    """The largest B for which ``mode="auto"`` takes the fast mode on ``device`` (0 off
    CUDA), fixed at the first call, so every step of a run uses the same mode; a constant for
    torch.compile, against which a dynamic B is compared (a guard, not a specialisation)."""
    return _fast_max_b_cached(device)


def contrastive_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor,
    *,
    mode: str = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE loss (math, modes and contract: module docstring).

    img, txt: [B, D] float32/float16/bfloat16 (D ≤ 1024); scale: 0-d tensor = exp(logit
    scale). Returns a 0-d fp32 tensor; differentiable in img, txt and scale.
    ``mode="auto"`` compares B with a bound fixed per device at the first call, so under
    torch.compile a dynamic B costs a guard on its side of the bound, not a recompilation.
    """
    _check_inputs(img, txt, scale, _OP)
    if mode not in MODES:
        raise ValueError(f"{_OP}: mode must be one of {MODES}, got {mode!r}")
    backend = resolve_backend(backend, img, _OP)
    if backend == "torch":
        mode = "lean"  # the reference has one implementation
    else:
        img, txt = int32_columns(img), int32_columns(txt)
        if mode == "auto":
            mode = "fast" if img.shape[0] <= _fast_max_b(str(img.device)) else "lean"
    if mode == "lean":
        half = img.dtype in (torch.bfloat16, torch.float16)
        mode = "lean:panel" if half and img.shape[1] > PANEL_MIN_DIM else "lean:fused"
    need_grad = torch.is_grad_enabled() and (img.requires_grad or txt.requires_grad or scale.requires_grad)
    return _loss_fwd(img, txt, scale, mode, backend, 0, need_grad)[0]


def contrastive_loss_ref(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """Plain PyTorch contrastive loss, ``chunk`` rows of logits at a time (memory
    O(chunk·B) in the forward and the backward, which recomputes the logits)."""
    _check_inputs(img, txt, scale, "contrastive_loss_ref")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"contrastive_loss_ref: chunk must be an int >= 1, got {chunk!r}")
    return _loss_fwd(img, txt, scale, "lean", "torch", chunk or 0, False)[0]
