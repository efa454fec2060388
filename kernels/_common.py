"""Shared helpers of the kernel modules: backend dispatch and input checks.

Dispatch rule (the same for every public op):
  * an explicit ``backend="triton"`` / ``backend="torch"`` wins;
  * otherwise CUDA tensors go through the Triton kernels, CPU tensors through the plain
    PyTorch reference, except under ``TRITON_INTERPRET=1`` where CPU tensors also go through
    the Triton kernels (run by the Triton interpreter), so the interpreter tests exercise
    the kernels through the public functions.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so the variable must be set
before ``kernels`` is imported; changing it later has no effect on the kernels.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton ships Linux x86_64 wheels only; elsewhere the reference path still works.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    HAVE_TRITON = False


def _interpret_mode() -> bool:
    """Whether Triton decorates kernels for its interpreter: its own reading of
    TRITON_INTERPRET ("1", "true", "on", ... ), so the two never disagree."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # no Triton (or one without knobs): the same spellings
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


# Read once, like Triton itself: kernels decorated in this process use this mode.
INTERPRET = _interpret_mode()

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fix_interpreter_scalar_index() -> None:
    """Make Triton 3.6's interpreter work with numpy >= 2.4 (interpreter mode only).

    The interpreter keeps scalars as 1-element arrays and turns them into loop bounds with
    ``int(array)``, which numpy 2.4 rejects for arrays with ndim > 0 ("only 0-dimensional
    arrays can be converted to Python scalars"), so any ``range(runtime_value)`` in a kernel
    fails. Upstream fixed it after 3.6 (triton-lang/triton#9171) by converting through a
    squeeze; this applies the same conversion on top of the interpreter's own patching.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_eclip_scalar_index_fix", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._eclip_scalar_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET and HAVE_TRITON:
    _fix_interpreter_scalar_index()


def resolve_backend(backend: str | None, x: torch.Tensor, op: str) -> str:
    """Return "triton" or "torch" for an op on tensor ``x`` (see the module docstring)."""
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"{op}: backend must be None, 'triton' or 'torch', got {backend!r}")
    if backend is None:
        backend = "triton" if (x.is_cuda or (INTERPRET and x.device.type == "cpu")) else "torch"
    if backend == "triton":
        if not HAVE_TRITON:
            raise RuntimeError(f"{op}: backend='triton' needs the triton package")
        if not x.is_cuda and not INTERPRET:
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                f"tensors), got a tensor on {x.device}"
            )
    return backend


def check_matrix(op: str, name: str, x: torch.Tensor, max_dim: int | None = None) -> None:
    """Raise a one-line ValueError unless ``x`` is a 2-d float16/bfloat16/float32 tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-d [N, D], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: {name} must be float32, float16 or bfloat16, got {x.dtype}"
        )
    if x.shape[1] < 1:
        raise ValueError(f"{op}: {name} must have D >= 1, got shape {tuple(x.shape)}")
    if max_dim is not None and x.shape[1] > max_dim:
        raise ValueError(
            f"{op}: {name} has D = {x.shape[1]}, more than the supported {max_dim}"
        )


_REDUCTION_FLAGS = ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")


def _reduction_setting(name: str):
    """A cuBLAS reduction flag as it can be set back: (reduced precision, split-K) where
    PyTorch has the pair (2.10 and later; assigning a bool there resets split-K to True),
    else the bool."""
    m = torch.backends.cuda.matmul
    try:
        return getattr(m, name), getattr(m, name + "_split_k")
    except AttributeError:
        return getattr(m, name)


@contextlib.contextmanager
def full_precision_reduction():
    """cuBLAS half-precision products with fp32 split-K reductions. PyTorch lets cuBLAS
    reduce split-K partials in bf16/fp16 by default; the gradient products Ĝ·k have a long
    K (= B) and heavy cancellation (Ĝ's rows sum to about 0), where that rounding would
    show. Only the reduced-precision part changes (the split-K part is kept), and both are
    restored on exit, exceptions included. The flags are host-side and read at each call,
    so a CUDA-graph capture keeps them."""
    m = torch.backends.cuda.matmul
    saved = {name: _reduction_setting(name) for name in _REDUCTION_FLAGS}
    try:
        for name, value in saved.items():
            setattr(m, name, (False, value[1]) if isinstance(value, tuple) else False)
        yield
    finally:
        for name, value in saved.items():
            setattr(m, name, value)


@contextlib.contextmanager
def on_device_of(x: torch.Tensor):
    """The context every op body runs in, Triton and reference alike:
      * autocast off for ``x``'s device type. A custom op's body, like any plain function,
        runs under the caller's autocast, which would compute the reference's and the
        top-k's fp32 matmuls in bf16 (and the reference forward's LSEs from bf16 logits,
        against which its fp32 backward would then be biased);
      * ``x``'s CUDA device current: Triton launches on the current device and its stream,
        whatever device the tensors are on."""
    kind = x.device.type
    # only when it is on (the launch path stays light); meta has no autocast, and torch.autocast refuses it
    on = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
    with torch.autocast(kind, enabled=False) if on else contextlib.nullcontext(), \
            torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        yield


if HAVE_TRITON:

    @triton.jit
    def _scale_kernel(x_ptr, coef_ptr, numel, BLOCK: tl.constexpr, BF16: tl.constexpr):
        """x ← coef·x in place: each element read in fp32, multiplied by the fp32 coef, and
        rounded once to x's dtype, to nearest even. For bf16 the rounding is done on the bits
        (the fp32 pattern plus 0x7FFF plus the kept lowest bit, then the high half): the
        Triton interpreter truncates fp32 → bf16 conversions, and this way the GPU and the
        interpreter run the same arithmetic. Overflow rounds to inf. A NaN is written as the
        quiet NaN 0x7FC0 first: the GPU's canonical NaN, 0x7FFFFFFF, would carry into the sign
        bit and come out as -0.0, hiding a NaN gradient."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        coef = tl.load(coef_ptr).to(tl.float32)
        y = tl.load(x_ptr + offs, mask=mask).to(tl.float32) * coef
        if BF16:
            u = tl.where(y != y, 0x7FC00000, y.to(tl.uint32, bitcast=True)).to(tl.uint32)
            u = u + (0x7FFF + ((u >> 16) & 1))
            out = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = y.to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + offs, out, mask=mask)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """coef·(a @ b) in ``out_dtype``, scaled in fp32. Not ``prod.mul_(coef)`` on the half-precision
    product: on CUDA a 0-d device tensor is read in the other operand's dtype, so coef would be
    rounded to bf16 first (a bias of up to 2⁻⁹ on every gradient entry) or, in fp16, overflow
    under a loss scaler. When the product already has ``out_dtype`` (and Triton runs here) a
    kernel scales it in place, in fp32 per element: no temporary. Otherwise (fp32 out of a
    half-precision product, or CPU tensors outside the interpreter) an fp32 copy is scaled,
    4 bytes an output element; the results are the same bit for bit."""
    prod = a @ b.to(a.dtype)
    if prod.dtype == out_dtype and HAVE_TRITON and (prod.is_cuda or INTERPRET) and prod.is_contiguous():
        block = 1024 if INTERPRET else 4096
        _scale_kernel[(max(1, -(-prod.numel() // block)),)](
            prod, coef, prod.numel(), BLOCK=block, BF16=prod.dtype == torch.bfloat16, num_warps=4)
        return prod
    return prod.float().mul_(coef).to(out_dtype)


# Launch policy shared by the contrastive kernels (lean forward and backwards, fast forward).
TINY_B = 1024  # up to here a fixed small config: launch overhead dominates, tuning buys nothing
HUGE_B = 1 << 17  # from here a fixed config: a single tuning run would take seconds


def tuned(n: int) -> bool:
    """Whether B = n takes the autotuned configs: never under the interpreter, nor with
    ``torch.use_deterministic_algorithms(True)``: the autotuner picks by timing, so two
    processes may run different configs, which sum in different orders; the fixed configs
    make the results bitwise repeatable across processes too."""
    return not (INTERPRET or n <= TINY_B or n >= HUGE_B or torch.are_deterministic_algorithms_enabled())


def launch_tuned(tuner, kernel, chosen: dict, key, grid, args: tuple, consts: dict) -> dict:
    """Launch ``kernel`` with the config chosen for ``key``, and return that config's launch
    kwargs. The first time (no entry in ``chosen``) the launch goes through ``tuner``, whose
    choice is then kept in ``chosen``; later launches go straight to the kernel, without the
    autotuner's host work. A fixed config is passed by putting it in ``chosen`` beforehand
    (``tuner`` may then be None). ``grid`` takes a config's parameters, as Triton's do."""
    cfg = chosen.get(key)
    if cfg is None:
        tuner[grid](*args, **consts)
        cfg = chosen[key] = tuner.best_config.all_kwargs()
    else:
        kernel[grid(cfg)](*args, **consts, **cfg)
    return cfg


def n_bucket(n: int) -> int:
    """Autotune key for B: its bit length, capped at HUGE_B's."""
    return min(n, HUGE_B).bit_length()


def tune_key(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor) -> tuple:
    """A launcher's key for the config its autotuner chose (``launch_tuned``'s ``chosen``):
    the autotuner's own key (D, B bucket, the inputs' dtypes) and the device."""
    return (q.shape[1], n_bucket(q.shape[0]), q.dtype, k.dtype, scale.dtype, q.device)


def prune_by_dim(configs, named_args, **kwargs):
    """Autotune pruning: drop configs whose D-blocks (BLOCK_D, and BLOCK_V where present)
    exceed D rounded up to a power of two; keep the last config if none is left."""
    d_max = max(16, next_pow2(named_args["dim"]))
    kept = [cf for cf in configs if cf.kwargs["BLOCK_D"] <= d_max and cf.kwargs.get("BLOCK_V", 16) <= d_max]
    return kept or configs[-1:]


def dot_precisions(dtype: torch.dtype, is_cuda: bool) -> tuple[str, str]:
    """(score dot, gradient dot) input precision. It only matters for fp32 operands: 3xTF32
    keeps fp32 scores accurate (plain TF32 would put 1e-3 relative errors into logits of up
    to 100); TF32 suffices for the gradient products. Other dtypes keep Triton's default."""
    if dtype == torch.float32 and is_cuda:
        return "tf32x3", "tf32"
    return "tf32", "tf32"


def int32_columns(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or a contiguous copy when its last column lies 2³¹ elements or more
    from its first (a column-major view of a buffer of over 2·10⁹/D rows): the kernels
    step along D with int32 offsets times the column stride (rows use int64), which would
    overflow there. Every ordinary layout, non-contiguous ones included, passes as it is."""
    if x.stride(1) * (x.shape[1] - 1) >= 2**31:
        return x.contiguous()
    return x


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())
