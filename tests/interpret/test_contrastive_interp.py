"""The contrastive-loss tests, rerun with the Triton kernels under the interpreter.

This process runs with TRITON_INTERPRET=1 (see tests/conftest.py), so contrastive_loss sends
CPU tensors through the Triton kernels of both modes: every test of
tests/test_kernels_contrastive.py then checks the kernels against the float64 reference,
bf16 included (upcast in the kernel, as the interpreter's bf16 tl.dot is wrong).
"""

import collections
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_kernels_contrastive import *  # noqa: E402,F401,F403
from test_kernels_contrastive import check_against_reference, make_inputs, run  # noqa: E402

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


@pytest.mark.parametrize("chosen", [(128, 128, 1), (64, 64, 3)])
def test_lean_forward_tuned_programs_per_sm(chosen, monkeypatch):
    # Tuned sizes: the configs run 3 to 5 persistent programs here (4 "SMs" off CUDA, 1 or 3
    # programs each, at most one per row block of B = 300), each writing its row of column
    # LSEs; only the chosen config's rows are merged (the 128×128 one leaves two stale rows
    # from the timing runs behind). The loss against the reference path, the column LSEs
    # against float64.
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
