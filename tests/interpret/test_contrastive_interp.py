"""The contrastive-loss tests, rerun with the Triton kernels under the interpreter.

This process runs with TRITON_INTERPRET=1 (see tests/conftest.py), so contrastive_loss sends
CPU tensors through the Triton kernels of both modes: every test of
tests/test_kernels_contrastive.py then checks the kernels against the float64 reference,
bf16 included (upcast in the kernel, as the interpreter's bf16 tl.dot is wrong), and every
test of tests/test_kernels_contrastive_behaviour.py runs on the kernels too.
"""

import collections
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contrastive_support import (  # noqa: E402
    assert_close,
    check_against_reference,
    make_inputs,
    reference,
    run,
)
from test_kernels_contrastive import *  # noqa: E402,F401,F403
from test_kernels_contrastive_behaviour import *  # noqa: E402,F401,F403

import kernels  # noqa: E402
from kernels import _contrastive_fast, _contrastive_lean, _contrastive_panel  # noqa: E402
from kernels._common import resolve_backend  # noqa: E402


@pytest.fixture(autouse=True)
def small_panels(monkeypatch):
    """Panels of 80 rows in these tests (the default panel would hold every B tested here in one): the
    panel backward then runs several panels with a ragged last one, a diagonal that starts
    inside a row tile (80 is not a multiple of the interpreter's 64-row tiles), and B = 1
    still in one."""
    monkeypatch.setattr(_contrastive_panel, "PANEL_BYTES", 0)
    monkeypatch.setattr(_contrastive_panel, "MIN_PANEL_ROWS", 80)


class _FakeTuner:
    """Stands in for an autotuner (not built under the interpreter): runs every config, as
    the timing phase does (each leaves its writes behind), then the "chosen" one again."""

    def __init__(self, kernel, configs, chosen):
        self.kernel, self.configs, self.best_config, self.calls = kernel, configs, chosen, 0

    def __getitem__(self, grid):
        def launch(*args, **consts):
            self.calls += 1
            for cf in [*self.configs, self.best_config]:
                self.kernel[grid(cf.kwargs)](*args, **consts, **cf.all_kwargs())
        return launch


def _fake_tuned(monkeypatch, module, kernel, tuner_name: str, configs, **match):
    """Send ``module``'s launcher down its tuned path under the interpreter, with a stand-in
    autotuner that "chooses" the config whose parameters include ``match``."""
    chosen = next(c for c in configs if all(c.kwargs[k] == v for k, v in match.items()))
    tuner = _FakeTuner(kernel, configs, chosen)
    monkeypatch.setattr(module, "tuned", lambda n: True)
    monkeypatch.setattr(module, tuner_name, tuner, raising=False)
    if hasattr(module, "_TUNED"):  # no choice remembered from an earlier test
        monkeypatch.setattr(module, "_TUNED", {})
    return tuner


def test_cpu_tensors_take_the_triton_path():
    assert kernels._common.INTERPRET
    assert resolve_backend(None, torch.zeros(2, 2), "contrastive_loss") == "triton"


@pytest.mark.parametrize("mode", ["lean:fused", "lean:panel", "fast"])
def test_kernels_match_the_reference_path(mode):
    # The Triton path and the PyTorch reference agree (float32, rtol 1e-5 on the loss and
    # 1e-2 on the gradients, the fast mode's bf16 Ĝ), also for a B spread over several
    # persistent programs and tiles with ragged tails.
    img, txt = make_inputs(300, 40, torch.float32, "cpu", seed=11)
    got = run(img, txt, 20.0, mode=mode)
    want = run(img, txt, 20.0, mode=mode, backend="torch")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1:], want[1:], strict=True):
        assert (g - w).norm() <= 1e-2 * w.norm()


@pytest.mark.parametrize("mode,buffers", [("lean:fused", 0), ("lean:panel", 0), ("fast", 1)])
def test_no_hidden_b_by_b_allocations(mode, buffers):
    # fwd + bwd allocate B×B tensors only where the mode says: the fast mode's saved S, once;
    # lean none (the panel backward's buffer is 80 rows here). (Autograd once materialised
    # a zero gradient for S, a second B² buffer.)
    from torch.profiler import ProfilerActivity, profile

    b = 512
    img, txt = (x.requires_grad_() for x in make_inputs(b, 64, torch.float16, "cpu", seed=2))
    scale = torch.tensor(14.3, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kernels.contrastive_loss(img, txt, scale, mode=mode).backward()
    big = [e for e in prof.events()
           if e.name in ("aten::empty", "aten::empty_strided") and e.cpu_memory_usage >= b * b * 2]
    assert len(big) == buffers, [(e.name, e.cpu_memory_usage) for e in big]
    assert img.grad is not None and txt.grad is not None and scale.grad is not None


@pytest.mark.parametrize("d,dtype,variant", [
    (256, torch.float16, "lean:fused"), (257, torch.float16, "lean:panel"),
    (384, torch.bfloat16, "lean:panel"), (384, torch.float32, "lean:fused"),
])
def test_lean_picks_its_backward_by_width_and_dtype(d, dtype, variant, monkeypatch):
    calls = []
    for name in ("lean_backward", "panel_backward"):
        real = getattr(kernels.contrastive, name)
        monkeypatch.setattr(kernels.contrastive, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    img, txt = make_inputs(40, d, dtype, "cpu", seed=3)
    run(img, txt, 14.3, mode="lean")
    assert calls == ["panel_backward" if variant == "lean:panel" else "lean_backward"]


@pytest.mark.parametrize("slots", [1, 25])
def test_panel_partials_summed_across_flushes(slots, monkeypatch):
    # The tile partials of Σ Ĝ∘x (the scale gradient) share one buffer across panels and are
    # summed when it fills: every panel (slots=1) or every second one (25 slots, 10 tiles of
    # 64×64 a panel of 80 rows at B = 300). Loss and all gradients against float64.
    monkeypatch.setattr(_contrastive_panel, "PART_SLOTS", slots)
    img, txt = make_inputs(300, 40, torch.float32, "cpu", seed=31)
    check_against_reference(img, txt, 14.3, "lean:panel")


@pytest.mark.parametrize("chosen", [(128, 128, 1), (64, 64, 3), (128, 64, 1)])
def test_lean_forward_tuned_programs_per_sm(chosen, monkeypatch):
    # Tuned sizes: the configs run 3 to 5 persistent programs here (4 "SMs" off CUDA, 1 or 3
    # programs each, at most one per row block of B = 300), each writing its row of column
    # LSEs; only the chosen config's rows are merged (the 128×128 one leaves two stale rows
    # from the timing runs behind). 128×64 tiles put a row block's diagonal in two column
    # tiles. The loss against the reference path, the column LSEs against float64.
    lean = _contrastive_lean
    block_m, block_n, progs = chosen
    tuner = _fake_tuned(monkeypatch, lean, lean._lean_fwd_kernel, "_lean_fwd_tuned", lean._FWD_CONFIGS,
                        BLOCK_M=block_m, BLOCK_N=block_n, PROGS_PER_SM=progs)
    img, txt = make_inputs(300, 40, torch.float32, "cpu", seed=61)
    want = kernels.contrastive_loss(img, txt, torch.tensor(14.3), mode="lean:fused", backend="torch")
    got, _, col_lse = lean.lean_forward(img, txt, torch.tensor(14.3))
    assert tuner.calls == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ref_col = torch.logsumexp(14.3 * txt.double() @ img.double().T, dim=1)
    torch.testing.assert_close(col_lse.double(), ref_col, rtol=1e-6, atol=1e-5)


def test_panel_tuned_config_across_panels(monkeypatch):
    # Tuned sizes: the autotuner runs on the first panel only (every config, each writing
    # its tile partials from slot 0, then the chosen one); later panels launch the chosen
    # config directly at growing part_base offsets. Here four 80-row panels of B = 300 with
    # the chosen config's 128×64 tiles, against float64.
    p = _contrastive_panel
    tuner = _fake_tuned(monkeypatch, p, p._grad_panel_kernel, "_grad_panel_tuned", p._CONFIGS,
                        BLOCK_M=128, BLOCK_N=64)
    img, txt = make_inputs(300, 40, torch.float32, "cpu", seed=51)
    check_against_reference(img, txt, 14.3, "lean:panel")
    assert tuner.calls == 2  # once per direction, for its first panel


def test_panel_rows():
    # 32 MiB of logits a panel, in multiples of 128 rows, at least MIN_PANEL_ROWS, at most B.
    p = _contrastive_panel
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(p, "PANEL_BYTES", 32 << 20)
        mp.setattr(p, "MIN_PANEL_ROWS", 256)
        assert p.panel_rows(32768, 2) == 512
        assert p.panel_rows(16384, 2) == 1024
        assert p.panel_rows(32768, 4) == 256
        assert p.panel_rows(1 << 20, 2) == 256  # 512 MiB: the floor wins at huge B
        assert p.panel_rows(3000, 2) == 3000  # small B: one panel
        assert p.panel_rows(100_000, 2) == 256  # 167 rows, rounded down, then the floor


def test_default_panel_keeps_the_lean_memory_target(monkeypatch):
    # The lean mode's target: at most 64 MiB beyond the input gradients at B = 32k (bf16);
    # the panel is nearly all of it (0.3 MiB besides, measured on an H100).
    monkeypatch.undo()  # the module's own PANEL_BYTES and MIN_PANEL_ROWS, not small_panels'
    p = _contrastive_panel
    b = 32768
    assert p.panel_rows(b, 2) * b * 2 <= 60 << 20
    assert p.panel_rows(b, 2) >= 512  # and no shorter than the 32 MiB panel measured before


@pytest.mark.parametrize("block_m,block_n,b,scale", [(64, 32, 150, 100.0), (32, 64, 97, 14.3)])
def test_fast_mode_with_rectangular_tiles(block_m, block_n, b, scale, monkeypatch):
    # The tuned configs include 128×64 tiles (two blocks an SM on an H100); the references
    # and partials then come in [B/64, B] and [B/128, B], the diagonal is split between two
    # column tiles of a row tile, and the gradient pass must index both. Here tall and wide
    # tiles with a ragged B, against float64 (tolerances of test_kernels_contrastive).
    real = _contrastive_fast.fixed_fwd_config
    monkeypatch.setattr(_contrastive_fast, "fixed_fwd_config",
                        lambda n, dim: {**real(n, dim), "BLOCK_M": block_m, "BLOCK_N": block_n})
    img, txt = make_inputs(b, 48, torch.float32, "cpu", seed=b)
    check_against_reference(img, txt, scale, "fast")


def test_fast_mode_launches_the_tuned_config_directly_after_tuning(monkeypatch):
    # The first call of a tuned size goes through the autotuner, with scratch for the
    # smallest tiles of any config (128×64: [3, B] row statistics at B = 150); later calls
    # launch the chosen config (here 128×128) without it, with scratch for its own tiles
    # ([2, B]), and give bitwise the same results, which match float64.
    fast = _contrastive_fast
    tuner = _fake_tuned(monkeypatch, fast, fast._fast_fwd_kernel, "_fast_fwd_tuned", fast._FWD_CONFIGS,
                        BLOCK_M=128, BLOCK_N=128)
    square = tuner.best_config
    monkeypatch.setattr(fast, "_TUNED", {})
    real_empty, shapes = torch.empty, []

    def empty(*size, **kw):
        t = real_empty(*size, **kw)
        shapes.append(tuple(t.shape))
        return t

    monkeypatch.setattr(fast.torch, "empty", empty)
    img, txt = make_inputs(150, 48, torch.float32, "cpu", seed=41)
    first = run(img, txt, 14.3, mode="fast")
    assert tuner.calls == 1 and shapes.count((3, 150)) == 2  # rref and rpart for 64-wide tiles
    shapes.clear()
    second = run(img, txt, 14.3, mode="fast")
    assert tuner.calls == 1 and shapes.count((3, 150)) == 0 and shapes.count((2, 150)) == 4
    assert list(fast._TUNED.values()) == [square.all_kwargs()]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    check_against_reference(img, txt, 14.3, "fast")


def test_fast_mode_allows_a_second_backward():
    # The backward only reads what the forward saved (Ĝ), so retain_graph=True works and a
    # second backward accumulates exactly the same gradients again.
    img, txt = (x.requires_grad_() for x in make_inputs(70, 24, torch.float32, "cpu", seed=4))
    scale = torch.tensor(14.3, requires_grad=True)
    loss = kernels.contrastive_loss(img, txt, scale, mode="fast")
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in (img, txt, scale)]
    loss.backward()
    for p, g in zip((img, txt, scale), once, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=0, atol=0)


def test_fast_mode_skips_the_gradient_pass_without_grad():
    # No gradient needed (no_grad, or inputs that do not require one): Ĝ is neither computed
    # nor kept, and the loss is the same.
    img, txt = make_inputs(70, 24, torch.float32, "cpu", seed=5)
    scale = torch.tensor(14.3)
    op = torch.ops.eclip.contrastive_loss_fwd.default
    loss, _, _, g, _ = op(img, txt, scale, "fast", "triton", 0, False)
    assert g.numel() == 0
    loss_g, _, _, g, gz = op(img, txt, scale, "fast", "triton", 0, True)
    assert g.shape == (70, 70) and g.dtype == torch.bfloat16 and gz.dim() == 0
    assert torch.equal(loss, loss_g)
    with torch.no_grad():
        assert torch.equal(kernels.contrastive_loss(img, txt, scale, mode="fast"), loss)


def test_fast_mode_backward_under_inductor_keeps_the_saved_buffer_in_place():
    # A backward op that overwrote a saved tensor made Inductor copy that B×B buffer before
    # every backward (a clone kernel in the backward's code); the read-only backward needs none.
    import torch.nn.functional as F
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 64)
    x, t = torch.randn(256, 32), F.normalize(torch.randn(256, 64), dim=1)
    scale = torch.tensor(14.3, requires_grad=True)

    def step(x, t):
        return kernels.contrastive_loss(F.normalize(proj(x), dim=1), t, scale, mode="fast")

    eager = step(x, t)
    eager.backward()
    want = proj.weight.grad.clone()
    proj.weight.grad = None
    compiled = torch.compile(step, fullgraph=True)

    def fwd_bwd():
        loss = compiled(x, t)
        loss.backward()
        return loss.detach()

    loss, codes = run_and_get_code(fwd_bwd)
    backward = [c for c in codes if "contrastive_loss_bwd" in c]
    assert backward and all("clone" not in c for c in backward)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert (proj.weight.grad - want).norm() <= 1e-4 * want.norm()


def test_auto_mode_with_a_dynamic_batch():
    # torch.compile with dynamic shapes hands a symbolic B, which the free-memory decision
    # once took as an argument and failed the trace; B is now compared with a per-device
    # bound (0 off CUDA: lean).
    import torch.nn.functional as F

    def step(a, b, s):
        return kernels.contrastive_loss(F.normalize(a, dim=1), b, s)

    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    for n in (20, 24):
        a, b = make_inputs(n, 16, torch.float32, "cpu", seed=n)
        got = compiled(a, b, torch.tensor(10.0))
        want = kernels.contrastive_loss(F.normalize(a, dim=1), b, torch.tensor(10.0), mode="lean")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1  # one graph for both sizes


# Ops that only allocate or make views: no device work, no launch.
_NO_LAUNCH = frozenset({"aten.empty", "aten.empty_strided", "aten.view", "aten.permute", "aten.t",
                        "aten.slice", "aten.detach", "aten.alias", "aten.as_strided"})


def _torch_ops_outside_triton(fn, monkeypatch) -> tuple[collections.Counter, int]:
    """(the aten ops ``fn`` dispatches that launch device work, Triton launches excluded (the
    interpreter's own tensor copies around a launch are not counted); the Triton launches)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter

    depth, launches = [0], [0]
    launch = interpreter.GridExecutor.__call__

    def counted_launch(self, *args, **kwargs):
        depth[0] += 1
        launches[0] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted_launch)

    class Record(TorchDispatchMode):
        ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if not depth[0] and name not in _NO_LAUNCH:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return Record.ops, launches[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_mode_launches_no_small_torch_ops(dtype, monkeypatch):
    # A fast forward + backward is six Triton launches (forward, merge, Ĝ, scalars, two
    # scalings), the two cuBLAS products and two sums. The LSE merges, the loss and the scale
    # gradient's terms were once some 40 small torch ops, each a launch and a gap on the GPU
    # around the mode's four big kernels. (fp32 inputs add casts and fp32 scalings of the
    # products, by design: scaled_mm.)
    img, txt = make_inputs(300, 64, dtype, "cpu", seed=4)
    scale, grad = torch.tensor(14.3), torch.tensor(1.0)

    def fwd_bwd():
        _, _, _, g, gz = _contrastive_fast.fast_forward(img, txt, scale, True)
        _contrastive_fast.fast_backward(g, gz, img, txt, scale, grad)

    assert _torch_ops_outside_triton(fwd_bwd, monkeypatch) == ({"aten.mm": 2, "aten.sum": 2}, 6)
    lean = _torch_ops_outside_triton(lambda: _contrastive_lean.lean_forward(img, txt, scale), monkeypatch)
    assert lean == ({"aten.sum": 1}, 2)  # the forward and the merge


def test_fast_mode_under_no_grad_keeps_no_gradient_buffer(monkeypatch):
    # Inputs that require a gradient, evaluated under torch.no_grad (a validation loss):
    # nothing will call the backward, so the forward must not build and keep the B×B Ĝ.
    seen = []
    real = kernels.contrastive.fast_forward
    monkeypatch.setattr(kernels.contrastive, "fast_forward",
                        lambda img, txt, scale, need_grad: seen.append(need_grad) or real(img, txt, scale, need_grad))
    img, txt = (x.requires_grad_() for x in make_inputs(70, 24, torch.float32, "cpu", seed=5))
    with torch.no_grad():
        kernels.contrastive_loss(img, txt, torch.tensor(14.3, requires_grad=True), mode="fast")
    assert seen == [False]


@pytest.mark.parametrize("block_v", [256, 512])
def test_lean_backward_tuned_config_sums_only_its_qdot_rows(block_v, monkeypatch):
    # Tuned sizes: the autotuner times every backward config, each writing the scale
    # gradient's per-D-chunk rows <(Ĝ·k)_i, q_i> of its own chunk width (128 to 512); only the
    # chosen config's cdiv(D, BLOCK_V) rows may be summed. D = 200: the 128-wide timing runs
    # leave a stale second row behind a chosen 256- or 512-wide one. All gradients against
    # float64, with an upstream gradient.
    lean = _contrastive_lean
    img, txt = make_inputs(70, 200, torch.float32, "cpu", seed=71)
    scale, grad = torch.tensor(14.3), torch.tensor(-0.7)
    _, row_lse, col_lse = lean.lean_forward(img, txt, scale)  # fixed config (before tuned is faked)
    tuner = _fake_tuned(monkeypatch, lean, lean._lean_bwd_kernel, "_lean_bwd_tuned", lean._BWD_CONFIGS,
                        BLOCK_V=block_v)
    got = lean.lean_backward(img, txt, scale, grad, row_lse, col_lse)
    assert tuner.calls == 2  # once per direction
    want = reference(img, txt, 14.3, upstream=-0.7)
    for name, g, w in zip(("d_img", "d_txt", "d_scale"), got, want[1:], strict=True):
        assert_close(g, w, 2e-3, name)


_ROW_OFFSETS_SCRIPT = r"""
import sys
sys.path[:0] = sys.argv[1:3]  # the parent's kernels, and tests/ for its helpers
import torch
import kernels
from contrastive_support import assert_close, make_inputs, reference

b, d, stride = 3, 16, 2**30 + 64  # the last row starts 2^31 + 128 elements into the buffer
try:
    big = torch.empty(stride * (b - 1) + d, dtype=torch.float16)  # 4 GiB of address space, 3 rows touched
except RuntimeError:
    sys.exit(77)
img = big.as_strided((b, d), (stride, 1))
base, txt = make_inputs(b, d, torch.float16, "cpu", seed=17)
img.copy_(base)
want = reference(base, txt, 14.3)
for mode in ("lean:fused", "lean:panel", "fast"):
    a, t = img.detach().requires_grad_(), txt.detach().requires_grad_()
    s = torch.tensor(14.3, requires_grad=True)
    loss = kernels.contrastive_loss(a, t, s, mode=mode)
    got = (loss, *torch.autograd.grad(loss, (a, t, s)))
    for name, g, w in zip(("loss", "d_img", "d_txt", "d_scale"), got, want, strict=True):
        assert_close(g, w, 1e-2, f"{name} ({mode})")

# The fast mode's B x B buffer passes 2^31 elements from B = 46,341 (4.3 GB in bf16): its
# gradient pass, on the same kind of view (in place, as in fast_forward; one program).
from kernels._contrastive_fast import _fast_grad_kernel
gen = torch.Generator().manual_seed(3)
y = big.as_strided((b, b), (stride, 1))
y.copy_(torch.randn(b, b, generator=gen))
rref, cref, row_lse, col_lse = torch.randn(4, 1, b, generator=gen)
row_lse, col_lse = row_lse[0], col_lse[0]
z = y.double() + torch.minimum(rref[0, :, None], cref[0, None, :]).double()
ln2 = 0.6931471805599453
g = torch.exp2(z - row_lse.double()[:, None] / ln2) + torch.exp2(z - col_lse.double()[None, :] / ln2) - 2 * torch.eye(b)
part = torch.empty(1)
_fast_grad_kernel[(1,)](y, y, rref, cref, row_lse, col_lse, part, b, stride, BLOCK_M=64, BLOCK_N=64, SUB_M=32)
assert_close(y, g, 1e-3, "G")
assert_close(part[0], (g * z).sum(), 1e-5, "sum G.z")
"""


def test_row_offsets_past_int32():
    # The kernels index rows with int64 offsets (kernels._common.int32_columns): a B·D of 2^31
    # elements or more (B = 2^21 at D = 1024) would wrap int32 ones. Emulated with three rows
    # of a view whose row stride puts the last one past 2^31 elements, in a buffer whose pages
    # are never touched beyond those rows. In a child process: a wrapped offset reads unmapped
    # memory and would crash this one. The same for the fast mode's gradient pass over its
    # B x B buffer, which passes 2^31 elements at B = 46,341.
    import subprocess

    paths = [str(Path(kernels.__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1])]
    proc = subprocess.run([sys.executable, "-c", _ROW_OFFSETS_SCRIPT, *paths],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip("no 4 GiB of address space for the strided buffer")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("block_m,block_n", [(64, 32), (128, 64), (32, 64)])
def test_fast_forward_tile_writes_only_the_diagonal_it_holds(block_m, block_n):
    # With rectangular tiles a row tile's diagonal lies in several column tiles, each storing
    # the S_ii of the rows it holds. On a GPU the tiles run in no fixed order, so a tile that
    # also stored a row it does not hold (its partial sum there: 0) would race with the
    # owner; the interpreter runs them in order, the owner last, which hides it. Program 0
    # alone here (the first row and column tiles): only rows < min(BLOCK_M, BLOCK_N) written.
    import triton

    n, dim = 160, 16
    img, txt = make_inputs(n, dim, torch.float32, "cpu", seed=3)
    n_rt, n_ct = triton.cdiv(n, block_m), triton.cdiv(n, block_n)
    f32 = dict(dtype=torch.float32)
    diag = torch.full((n,), float("nan"))
    _contrastive_fast._fast_fwd_kernel[(1,)](
        img, txt, torch.tensor(14.3), torch.empty((n, n), dtype=torch.bfloat16),
        torch.empty((n_ct, n), **f32), torch.empty((n_rt, n), **f32), torch.empty((n_ct, n), **f32),
        torch.empty((n_rt, n), **f32), diag, n, dim, *img.stride(), *txt.stride(), n, 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=16, GROUP_M=8, UPCAST=False, PRECISION="tf32")
    held = min(block_m, block_n)
    want = 14.3 * (img.double() * txt.double()).sum(1)
    torch.testing.assert_close(diag[:held].double(), want[:held], rtol=1e-5, atol=1e-5)
    assert diag[held:].isnan().all()
