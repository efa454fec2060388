"""``bench/kernel_table.py``: its CPU dry run end to end, then each section and figure with the
measurements faked (accuracy, lean memory, the table's cells, tuned configs, the panel sweep,
the sizes each section gets). Nothing is measured."""

import re

import pytest
import torch
from bench_support import kernel_table, tuning


def _empty_autotuner_caches(monkeypatch):
    """The autotuners' caches are per process: on a GPU, earlier tests at tuned sizes fill them."""
    for tuner in tuning._tuners().values():
        if tuner is not None:
            monkeypatch.setattr(tuner, "cache", {})


def test_kernel_table_dry_run(tmp_path, capsys, monkeypatch):
    _empty_autotuner_caches(monkeypatch)
    out = tmp_path / "table.md"
    assert kernel_table.main(["--dry-run", "--out", str(out)]) == 0
    text = out.read_text()
    assert "FAIL" not in text and "error" not in text
    for mode in ("lean:fused", "lean:panel", "fast"):
        assert f"compiled step ({mode}): ok" in text
        assert re.search(rf"accuracy B=96 D=48 bf16 {re.escape(mode)}: .*\(ok", text)
        assert f"breakdown {mode} B=64" in text
    # the table: a header with every implementation and one row per size, five cells each
    assert "plain + compile" in text
    rows = [line for line in text.splitlines() if re.match(r"\s+(64|100)\s+(48|40) \|", line)]
    assert len(rows) == 2 and all(line.count("|") == 5 for line in rows)
    assert "panel sweep B=256" in text and "finite: ok" in text and "collapsed model ranks N-1: ok" in text
    assert "tuned fast fwd: nothing tuned in this run" in text  # the references tune nothing


def test_a_refused_run_leaves_an_earlier_table(tmp_path, capsys, monkeypatch):
    # no GPU: it once emptied --out before it said so
    out = tmp_path / "table.md"
    out.write_text("an earlier table\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernel_table.main(["--out", str(out)]) == 1
    assert "no CUDA device: nothing to check" in capsys.readouterr().out and out.read_text() == "an earlier table\n"
    with pytest.raises(SystemExit) as e:  # a folder: one line of usage error, not a traceback
        kernel_table.main(["--dry-run", "--out", str(tmp_path)])
    assert e.value.code == 2 and f"--out {tmp_path}: a folder; name the file the table goes to" in capsys.readouterr().err


def test_kernel_table_fails_when_a_check_fails(capsys, monkeypatch):
    # A loss 5% off, a collapsed model that ranks 0 and a non-finite B = 1M loss: each check
    # prints FAIL and the exit code must say so (the sections once returned None, counted ok).
    real = kernel_table.fused
    monkeypatch.setattr(kernel_table, "fused", lambda mode: lambda *a, **k: 1.05 * real(mode)(*a, **k))
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    assert kernel_table.check_accuracy([40], 16) is False
    assert kernel_table.check_lean_memory([40], 16, limit=-1.0) is False  # no extra memory is under -1 MiB
    assert kernel_table.check_lean_memory([40], 16) is True
    text = capsys.readouterr().out
    assert text.count("(FAIL: targets 1e-3 / 1e-2)") == 3 and text.count("(FAIL: target -1.0 MiB") == 2, text
    monkeypatch.setattr(kernel_table, "fused", lambda mode: lambda *a, **k: float("nan") * real(mode)(*a, **k))
    assert kernel_table.huge(64, 16) is False
    ranks = kernel_table.kernels.retrieval_ranks
    monkeypatch.setattr(kernel_table.kernels, "retrieval_ranks", lambda i, t: ranks(i, t)._replace(
        i2t=torch.zeros_like(ranks(i, t).i2t)))
    assert kernel_table.ranks(50, 16) is False
    monkeypatch.setattr(kernel_table, "check_accuracy", lambda sizes, d: False)
    assert kernel_table.main(["--dry-run"]) == 1


def test_a_table_cell_that_raises_fails_the_table(capsys, monkeypatch):
    # an implementation failing at a size the accuracy check does not run (D = 768, B = 64k)
    # printed "error" in its cells, and the script exited 0
    def broken(*a, **k):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(kernel_table, "impls", lambda: {"fast": broken, "plain eager": kernel_table.plain_loss})
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    kernel_table.LINES.clear()
    assert kernel_table.table([(40, 16)]) is False
    assert any("error" in line for line in kernel_table.LINES)
    assert kernel_table.LINES[-1] == "table: FAIL (a fused mode raised or ran out of memory: see the error and OOM cells)"
    monkeypatch.setattr(kernel_table, "impls", lambda: {"plain eager": kernel_table.plain_loss})
    assert kernel_table.table([(40, 16)]) is True
    capsys.readouterr()


def test_out_of_memory_is_a_cell_for_the_plain_losses_and_a_failure_for_ours(capsys, monkeypatch):
    # a lean mode out of memory once printed "OOM" like the plain losses and passed
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    kernel_table.LINES.clear()
    monkeypatch.setattr(kernel_table, "impls", lambda: {"plain eager": oom})
    assert kernel_table.table([(40, 16)]) is True and "OOM" in kernel_table.LINES[-1]
    monkeypatch.setattr(kernel_table, "impls", lambda: {"lean:panel": oom, "plain eager": kernel_table.plain_loss})
    assert kernel_table.table([(40, 16)]) is False
    assert "lean:panel at B=40: out of memory" in capsys.readouterr().out


def test_plain_compile_times_a_static_graph_at_every_size(monkeypatch):
    # one compiled function reused across sizes made Dynamo trace B and D as symbols from the
    # second size on: the table's first row timed a static graph, the others a dynamic one
    shapes = []
    real = torch.compile

    def recording(fn, **kw):
        def backend(gm, example_inputs):
            shapes.append([x for x in example_inputs if isinstance(x, torch.SymInt)])  # B or D as a symbol
            return gm.forward
        return real(fn, **dict(kw, backend=backend))

    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    monkeypatch.setattr(kernel_table.torch, "compile", recording)
    monkeypatch.setattr(kernel_table, "_COMPILED", {})
    for b, d in ((64, 16), (96, 16), (96, 24)):
        img, txt, scale = (x.detach() for x in kernel_table.inputs(b, d))
        kernel_table.plain_compiled(img, txt, scale)
    torch._dynamo.reset()
    assert shapes == [[], [], []]  # three graphs, none with a symbolic size


def test_kernel_table_reports_the_tuned_configs(monkeypatch):
    # What each autotuner chose, one line per kernel and key, and the median time of every
    # config it tried (Triton keeps only the last tuning's timings: the table wraps each
    # tuner to keep them all); a kernel that did not tune says so. Stand-in tuners here.
    triton = pytest.importorskip("triton")
    wide = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    square = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=4)

    class Tuner:  # the autotuner's attributes the table reads
        def __init__(self):
            self.cache, self.configs_timings = {}, None

        def run(self, key, timings):
            if key not in self.cache:  # a known key is not tuned again
                self.configs_timings = timings
                self.cache[key] = min(timings, key=lambda cf: timings[cf][0])

    fast, panel = Tuner(), Tuner()
    monkeypatch.setattr(tuning, "_tuners", lambda: {"fast fwd": fast, "lean:panel Ĝ": panel})
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(tuning, "TIMINGS", [])
    kernel_table.LINES.clear()
    tuning.watch_tuning()
    tuning.watch_tuning()  # idempotent: one wrapper, one record per tuning
    fast.run((512, 15, "torch.bfloat16"), {square: [0.9, 0.8, 1.0], wide: [0.6, 0.5, 0.7]})
    fast.run((512, 16, "torch.bfloat16"), {square: [3.0, 2.9, 3.1], wide: [3.5, 3.4, 3.6]})
    fast.run((512, 16, "torch.bfloat16"), {})  # a cached key: no new tuning
    kernel_table.tuned_configs()
    lines = list(kernel_table.LINES)
    assert lines == [
        "tuned fast fwd [512,15]: BLOCK_M=128 BLOCK_N=64 warps=8 stages=3",
        "tuned fast fwd [512,16]: BLOCK_M=128 BLOCK_N=128 warps=8 stages=4",
        "tuned lean:panel Ĝ: nothing tuned in this run",
        "tuning fast fwd [512,15]: BLOCK_M=128 BLOCK_N=64 warps=8 stages=3 0.600 ms; "
        "BLOCK_M=128 BLOCK_N=128 warps=8 stages=4 0.900 ms",
        "tuning fast fwd [512,16]: BLOCK_M=128 BLOCK_N=128 warps=8 stages=4 3.000 ms; "
        "BLOCK_M=128 BLOCK_N=64 warps=8 stages=3 3.500 ms",
    ]


# --- the figures the table reports and the checks' criteria, with measurements faked ---------


def test_table_cells_are_the_median_peak_and_6_b2_d_tflops(monkeypatch):
    # every cell is median ms / peak extra MiB / TFLOP/s with 6·B²·D flop, whatever the
    # implementation; repetitions drop from 20 to 10 past B = 16,384 and to 5 past 32,768
    seen = []

    def measure(fn, img, txt, scale, reps):
        seen.append((img, reps))
        return 0.02, 123.4

    monkeypatch.setattr(kernel_table, "measure", measure)
    monkeypatch.setattr(kernel_table, "inputs", lambda b, d: ((b, d), None, None))  # nothing allocated
    monkeypatch.setattr(kernel_table, "impls", lambda: {"fast": None, "plain eager": None})
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    kernel_table.LINES.clear()
    sizes = [(16384, 1), (16385, 2), (32768, 3), (32769, 4)]
    assert kernel_table.table(sizes) is True
    assert seen == [((16384, 1), 20)] * 2 + [((16385, 2), 10)] * 2 + [((32768, 3), 10)] * 2 + [((32769, 4), 5)] * 2
    rows = kernel_table.LINES[2:]
    assert len(rows) == len(sizes)
    for (b, d), row in zip(sizes, rows, strict=True):
        head, *cells = row.split("|")
        assert head.split() == [str(b), str(d)] and len(cells) == 2
        for cell in cells:
            ms, peak, tflops = (float(v) for v in cell.split())
            assert (ms, peak) == (0.02, 123)
            assert tflops == round(6 * b * b * d / 0.02e-3 / 1e12)


@pytest.mark.parametrize("peak,ok", [(68.0, True), (68.5, False)])
def test_lean_memory_is_the_peak_beyond_the_two_input_gradients(monkeypatch, capsys, peak, ok):
    # B = 4,096, D = 256 in bf16: the input gradients are 2·4096·256·2 bytes = 4 MiB of the
    # measured peak; what is left is held to the default limit, 64 MiB, which itself passes
    modes = []

    def measure(fn, img, txt, scale, reps):
        modes.append(fn.keywords["mode"])
        return 1.0, peak

    monkeypatch.setattr(kernel_table, "measure", measure)
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    assert kernel_table.check_lean_memory([4096], 256) is ok
    assert modes == ["lean:fused", "lean:panel"]  # both lean backwards, not the fast mode
    out = capsys.readouterr().out
    for mode in modes:
        assert (f"{mode} memory B=4096: {peak - 4:.1f} MiB beyond the input gradients "
                f"({'ok' if ok else 'FAIL'}: target 64 MiB; B²·2 bytes = 32 MiB)") in out


@pytest.mark.parametrize("wrong,shows", [
    (lambda loss: loss + 0.005 * loss.detach(), "loss 5.0e-03"),  # the value off, the gradients exact
    (lambda loss: loss + 0.05 * (loss - loss.detach()), "dI 5.0e-02, dT 5.0e-02, ds 5.0e-02"),  # the reverse
], ids=["loss", "gradients"])
def test_accuracy_fails_on_the_loss_alone_and_on_the_gradients_alone(monkeypatch, capsys, wrong, shows):
    # the loss is held to 1e-3 and every gradient to 1e-2, each on its own
    real = kernel_table.fused
    monkeypatch.setattr(kernel_table, "fused", lambda mode: lambda *a, **k: wrong(real(mode)(*a, **k)))
    monkeypatch.setattr(kernel_table, "FUSED_MODES", ("fast",))
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    assert kernel_table.check_accuracy([40], 16) is False
    out = capsys.readouterr().out
    assert shows in out and "(FAIL: targets 1e-3 / 1e-2)" in out, out


@pytest.mark.parametrize("wrong", [
    lambda loss: loss * float("nan"),
    lambda loss: 2 * loss.detach() - loss,  # the right value, the gradient reversed: training climbs
    lambda loss: loss * (1.01 if torch.compiler.is_compiling() else 1.0),  # compiled 1% off eager
], ids=["nan", "climbing", "off-eager"])
def test_compiled_step_fails_on_a_loss_not_finite_not_falling_or_off_eager(monkeypatch, capsys, wrong):
    real = kernel_table.kernels.contrastive_loss
    monkeypatch.setattr(kernel_table.kernels, "contrastive_loss", lambda *a, **k: wrong(real(*a, **k)))
    monkeypatch.setattr(kernel_table, "FUSED_MODES", ("lean:fused",))
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    try:
        assert kernel_table.check_compiled_step() is False
    finally:
        torch._dynamo.reset()
    assert "compiled step (lean:fused): FAIL;" in capsys.readouterr().out


def test_panel_sweep_sets_each_panel_size_and_restores_the_default(monkeypatch, capsys):
    # each size in MiB becomes the panel's bytes (at B = 4,096 in bf16, 2 MiB is 256 rows of
    # 8 KiB), the floor of rows drops to 128; the defaults come back, after an error too
    from kernels import _contrastive_panel as panel

    default, floor = panel.PANEL_BYTES, panel.MIN_PANEL_ROWS
    seen = []

    def measure(fn, img, txt, scale, reps):
        seen.append((panel.PANEL_BYTES, panel.MIN_PANEL_ROWS))
        if len(seen) == 3:
            raise RuntimeError("out of resources")
        return 1.5, 2.0

    monkeypatch.setattr(kernel_table, "measure", measure)
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    kernel_table.panel_sweep(4096, 8, (1, 2))
    assert seen == [(1 << 20, 128), (2 << 20, 128)]
    assert (panel.PANEL_BYTES, panel.MIN_PANEL_ROWS) == (default, floor)
    assert (f"panel sweep B=4096 D=8 bf16 (default {default >> 20} MiB): 1 MiB (128 rows): 1.50 ms, 2 MiB; "
            "2 MiB (256 rows): 1.50 ms, 2 MiB") in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="out of resources"):
        kernel_table.panel_sweep(4096, 8, (4,))
    assert (panel.PANEL_BYTES, panel.MIN_PANEL_ROWS) == (default, floor)


def test_measure_times_the_median_with_no_gradient_held_at_the_window(monkeypatch):
    # two warm-up steps, one step in the peak window, then the timed ones; gradients left
    # over from the warm-ups would count in the window's base and be freed by the step
    # itself, so the peak would come out one set of gradients short
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    img, txt, scale = kernel_table.inputs(8, 4)
    calls, held = [], []
    monkeypatch.setattr(kernel_table, "reset_peak", lambda: held.append(img.grad is not None) or 0)
    monkeypatch.setattr(kernel_table, "peak_since", lambda base: 7.0)
    times = iter([5.0, 1.0, 2.0, 100.0, 3.0])
    monkeypatch.setattr(kernel_table, "timed_ms", lambda fn: (fn(), next(times))[1])
    ms, peak = kernel_table.measure(lambda *a: calls.append(1) or kernel_table.plain_loss(*a), img, txt, scale, 5)
    assert (ms, peak) == (3.0, 7.0) and held == [False] and len(calls) == 2 + 1 + 5


def test_peak_and_time_on_cuda_from_fake_counters(monkeypatch):
    # the host-side arithmetic of the CUDA paths: MiB beyond the window's base, and
    # milliseconds between two CUDA events
    state = {"now": 100 << 20, "peak": 500 << 20}
    cuda = kernel_table.torch.cuda
    monkeypatch.setattr(kernel_table, "DEV", "cuda")
    monkeypatch.setattr(cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda: state.update(peak=state["now"]))
    monkeypatch.setattr(cuda, "memory_allocated", lambda: state["now"])
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda: state["peak"])
    base = kernel_table.reset_peak()
    assert base == 100 << 20 and state["peak"] == base  # the old peak is forgotten
    state["peak"] += 48 << 20
    assert kernel_table.peak_since(base) == 48.0

    class Event:
        clock = 0.0

        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = Event.clock

        def elapsed_time(self, end):
            return end.at - self.at

    monkeypatch.setattr(cuda, "Event", Event)
    assert kernel_table.timed_ms(lambda: setattr(Event, "clock", 2.5)) == 2.5


def test_time_on_the_cpu_is_milliseconds_of_the_wall_clock(monkeypatch):
    clock = iter([10.0, 10.25])
    monkeypatch.setattr(kernel_table.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    assert kernel_table.timed_ms(lambda: None) == 250.0


def test_huge_reports_gib_and_fails_on_a_loss_alone_not_finite(monkeypatch, capsys):
    real = kernel_table.fused
    monkeypatch.setattr(kernel_table, "fused", lambda mode: lambda *a, **k: (lambda loss: loss + float("nan") * loss.detach())(real(mode)(*a, **k)))
    monkeypatch.setattr(kernel_table, "peak_since", lambda base: 1536.0)  # MiB
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    assert kernel_table.huge(64, 16) is False  # the gradients are finite, the loss is not
    out = capsys.readouterr().out
    assert "lean B=64 D=16 bf16: " in out and "peak extra 1.50 GiB, loss nan, finite: FAIL" in out


SECTIONS = ("check_compiled_step", "check_accuracy", "check_lean_memory", "table", "ranks", "huge",
            "tuned_configs", "breakdown", "panel_sweep")


def _fake_sections(monkeypatch, raising=None):
    """Every section of kernel_table.main replaced by one that records its arguments."""
    calls = {}
    for name in SECTIONS:
        def fake(*args, name=name):
            calls[name] = args
            if name == raising:
                raise RuntimeError("boom")
        monkeypatch.setattr(kernel_table, name, fake)
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    return calls


FULL = [(4096, 512), (16384, 512), (32768, 512), (65536, 512), (32768, 256), (32768, 768)]


@pytest.mark.parametrize("flags,table", [([], FULL), (["--quick"], [(16384, 512), (32768, 512)]),
                                         (["--table", "16384:512,65536:256"], [(16384, 512), (65536, 256)])])
def test_kernel_table_sections_get_the_documented_sizes(monkeypatch, capsys, flags, table):
    # the module docstring's sizes: accuracy at 4,096 and 16,384, lean memory at 16,384 and
    # 32,768, breakdown at 16,384, the panel sweep at 32,768, ranks at N = 100,000, lean at
    # B = 1,048,576, all at D = 512; --quick and --table change the table alone
    calls = _fake_sections(monkeypatch)
    cuda = kernel_table.torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(kernel_table, "empty_cache", lambda: None)
    assert kernel_table.main(flags) == 0
    assert calls == {"check_compiled_step": (), "check_accuracy": ((4096, 16384), 512),
                     "check_lean_memory": ((16384, 32768), 512), "table": (table,), "ranks": (100_000, 512),
                     "huge": (1_048_576, 512), "tuned_configs": (), "breakdown": (16384, 512),
                     "panel_sweep": (32768, 512, (16, 32, 56, 64, 96))}
    assert kernel_table.LINES[0] == f"device: Fake GPU (torch {torch.__version__})"
    capsys.readouterr()


@pytest.mark.parametrize("bad", ["0:512", "16384", "16384:512:1", "16384:x", "16384:512,", "16384:-512"])
def test_kernel_table_refuses_a_malformed_table(monkeypatch, capsys, bad):
    calls = _fake_sections(monkeypatch)
    with pytest.raises(SystemExit) as e:
        kernel_table.main(["--dry-run", "--table", bad])
    assert e.value.code == 2 and not calls
    assert (f"--table: expected B:D pairs of positive integers, comma-separated, got {bad!r}"
            in capsys.readouterr().err)


def test_a_section_that_raises_fails_the_run_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    # priority order: a section raising is recorded (in --out too) and the later ones still
    # report; --out starts empty each run, in a folder made for it
    calls = _fake_sections(monkeypatch, raising="check_accuracy")
    out = tmp_path / "new" / "table.md"
    out.parent.mkdir()
    out.write_text("a line of an earlier run\n")
    assert kernel_table.main(["--dry-run", "--table", "40:16", "--out", str(out)]) == 1
    assert set(calls) == set(SECTIONS) and calls["table"] == ([(40, 16)],)
    assert out.read_text().splitlines() == ["device: CPU dry run (nothing measured) (torch " + torch.__version__ + ")",
                                            "accuracy: FAILED with RuntimeError: boom"]
    nested = tmp_path / "a" / "b" / "table.md"  # a folder that does not exist yet
    assert kernel_table.main(["--dry-run", "--out", str(nested)]) == 1 and nested.is_file()
    capsys.readouterr()


def test_a_refused_table_leaves_the_out_file_of_an_earlier_run(tmp_path, capsys, monkeypatch):
    # the arguments are checked before --out is emptied
    monkeypatch.setattr(kernel_table, "OUT", None)
    out = tmp_path / "table.md"
    out.write_text("a line of an earlier run\n")
    with pytest.raises(SystemExit) as e:
        kernel_table.main(["--dry-run", "--out", str(out), "--table", "0:512"])
    assert e.value.code == 2 and out.read_text() == "a line of an earlier run\n"


def test_table_columns_line_up_with_the_header(monkeypatch):
    monkeypatch.setattr(kernel_table, "measure", lambda *a: (0.02, 123.4))
    monkeypatch.setattr(kernel_table, "inputs", lambda b, d: ((b, d), None, None))
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    kernel_table.LINES.clear()
    kernel_table.table([(64, 48)])
    header, row = kernel_table.LINES[1:3]
    bars = lambda line: [m.start() for m in re.finditer(r"\|", line)]
    assert bars(row) == bars(header)[:len(bars(row))] and len(bars(row)) == len(bars(header))
