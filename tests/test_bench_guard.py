"""The benchmark guard and plot, on benchmark JSON fixtures written by the tests."""

import json
from pathlib import Path

import pytest

from bench import guard, plot
from bench.conftest import pytest_benchmark_update_json


def bench(name, group, impl, median, plain=False, ratio=None, b=1024, mem=None):
    info = {"suite": group.split()[0], "impl": impl, "plain": plain, "B": b, "peak_extra_bytes": mem}
    if ratio is not None:
        info["ratio_to_plain"] = ratio
    return {"fullname": name, "group": group, "stats": {"median": median}, "extra_info": info}


def run_file(tmp_path, name, fused_ratio, device="cpu (x86_64, 2 threads)"):
    data = {"device": device, "benchmarks": [
        bench("loss[plain]", "loss-fwd+bwd B=1024", "plain-eager", 0.010, plain=True),
        bench("loss[fused]", "loss-fwd+bwd B=1024", "fused", 0.010 * fused_ratio, ratio=fused_ratio),
        bench("step[eager]", "step preset=tiny", "fp32-eager", 0.1, plain=True),
        bench("step[template]", "step preset=tiny", "template", 0.09, ratio=0.9),
    ]}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_run_regressed_on_purpose_fails(tmp_path, capsys):
    base = run_file(tmp_path, "base.json", 1.5)
    slow = run_file(tmp_path, "slow.json", 3.0)  # the fused loss twice as slow relative to plain
    assert guard.main(["check", "--run", str(slow), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION loss[fused]: ratio to plain 1.500 → 3.000 (+100%)" in out
    assert "ok         step[template]" in out
    assert "2 figures compared with base.json, 1 regressed beyond 35%" in out


def test_a_run_within_tolerance_passes(tmp_path, capsys):
    base = run_file(tmp_path, "base.json", 1.5)
    same = run_file(tmp_path, "same.json", 1.8)  # +20%: inside the CPU tolerance of 35%
    assert guard.main(["check", "--run", str(same), "--baseline", str(base)]) == 0
    assert guard.main(["check", "--run", str(same), "--baseline", str(base), "--tolerance", "0.1"]) == 1
    gpu = run_file(tmp_path, "gpu.json", 1.8, device="NVIDIA H100 80GB HBM3")
    gpu_base = run_file(tmp_path, "gpu_base.json", 1.5, device="NVIDIA H100 80GB HBM3")
    assert guard.main(["check", "--run", str(gpu), "--baseline", str(gpu_base)]) == 1  # GPU: 15%
    capsys.readouterr()


def test_missing_baseline_and_bad_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(guard, "BASELINES", tmp_path / "baselines")
    run = run_file(tmp_path, "run.json", 1.5, device="Some GPU 9000")
    assert guard.main(["check", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no baseline for Some GPU 9000" in err and "some-gpu-9000.json" in err
    assert "python -m bench.guard save" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(SystemExit) as e:
        guard.main(["check", "--run", str(bad)])
    assert e.value.code == 2 and "bad.json: not a benchmark JSON" in capsys.readouterr().err
    assert guard.main(["save", "--run", str(run)]) == 0  # save, then the check finds it
    assert (tmp_path / "baselines" / "some-gpu-9000.json").is_file()
    assert guard.main(["check", "--run", str(run)]) == 0


@pytest.mark.parametrize("prog", ["guard", "plot"])
def test_unreadable_runs_and_bad_options_are_one_line(tmp_path, capsys, prog):
    # each of these was a traceback; a NaN tolerance failed every figure ("beyond nan%")
    binary = tmp_path / "some.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    for path, why in ((tmp_path, "unreadable (Is a directory)"), (binary, "not a benchmark JSON (not UTF-8 text)")):
        with pytest.raises(SystemExit) as e:
            guard.main(["check", "--run", str(path)]) if prog == "guard" else plot.main([str(path)])
        assert e.value.code == 2 and capsys.readouterr().err == f"{prog}: error: {path}: {why}\n"
    run = run_file(tmp_path, "run.json", 1.5)
    if prog == "guard":
        # 15 meant as 15% passed a run 16 times slower
        for value in ("nan", "-1", "inf", "15"):
            assert guard.main(["check", "--run", str(run), "--baseline", str(run), "--tolerance", value]) == 2
            assert f"guard: error: --tolerance {value}: must be a fraction from 0 to 1" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as e:
            plot.main([str(run), "--out", str(tmp_path / "x.txt")])
        assert e.value.code == 2 and "--out " in capsys.readouterr().err and not (tmp_path / "x.txt").exists()


def test_a_run_that_lacks_figures_fails(tmp_path, capsys, monkeypatch):
    # A benchmark skipped or gone once passed the check: its figure was listed, never counted.
    base = run_file(tmp_path, "base.json", 1.5)
    data = json.loads(base.read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if b["fullname"] != "step[template]"]
    part = tmp_path / "part.json"
    part.write_text(json.dumps(data))
    assert guard.main(["check", "--run", str(part), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    assert "missing    step[template]: in the baseline, not in this run" in out
    assert "1 figures compared with base.json, 0 regressed beyond 35%; 1 missing from this run\n" in out
    assert guard.main(["check", "--run", str(part), "--baseline", str(base), "--allow-missing"]) == 0
    assert "1 missing from this run (a partial run)" in capsys.readouterr().out
    # the other way round, a figure the baseline lacks is listed as unguarded, and passes
    assert guard.main(["check", "--run", str(base), "--baseline", str(part)]) == 0
    out = capsys.readouterr().out
    assert "new        step[template]: not in the baseline, so not guarded" in out
    assert "1 figures compared with part.json, 0 regressed beyond 35%\n" in out
    # nothing in common (an empty run), or nothing to save: exit 2, one line, no baseline written
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"device": "cpu (x86_64, 2 threads)", "benchmarks": []}))
    assert guard.main(["check", "--run", str(empty), "--baseline", str(base)]) == 2
    assert "empty.json: no figure in common with" in capsys.readouterr().err
    assert guard.main(["save", "--run", str(empty), "--baseline", str(tmp_path / "new.json")]) == 2
    assert "no guarded figures" in capsys.readouterr().err and not (tmp_path / "new.json").exists()
    # pytest collecting no benchmark (exit 5) is a failed run, not an empty success
    monkeypatch.setattr(guard, "run_suites", lambda out, extra: 5)
    assert guard.main(["check", "--baseline", str(base)]) == 2
    assert "collected no benchmarks (pytest exit 5)" in capsys.readouterr().err


def test_device_slugs():
    assert guard.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert guard.slug("cpu (x86_64, 2 threads)") == "cpu-x86-64-2-threads"


def test_ratios_filled_from_group_medians():
    out = {"benchmarks": [
        bench("a", "g", "plain-eager", 0.002, plain=True),
        bench("b", "g", "fused", 0.003),
        bench("c", "g", "paired", 0.004, ratio=1.7),  # a paired measurement is kept
        {**bench("d", "g", "step", 0.5), "extra_info": {"samples_per_step": 64, "flop": 1e9}},
    ]}
    pytest_benchmark_update_json(None, None, out)
    infos = [b["extra_info"] for b in out["benchmarks"]]
    assert infos[0]["ratio_to_plain"] == 1.0 and infos[1]["ratio_to_plain"] == pytest.approx(1.5)
    assert infos[2]["ratio_to_plain"] == 1.7
    assert infos[3]["samples_per_s"] == pytest.approx(128) and infos[3]["tflops"] == pytest.approx(0.002)
    assert "device" in out


def test_plot_writes_a_png(tmp_path):
    data = {"device": "test", "benchmarks": [
        bench(f"{impl}-{b}", f"loss-fwd+bwd B={b}", impl, 1e-3 * b / 256, plain=impl == "plain-eager", b=b, mem=b * 1024)
        for impl in ("fused", "plain-eager") for b in (256, 1024, 4096)]}
    path = plot.plot(data, tmp_path / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.loss_series(data, "loss-fwd+bwd")["fused"][0] == (256, 1.0, 0.25)
    with pytest.raises(SystemExit, match="no 'loss-fwd' benchmarks"):
        plot.plot(data, tmp_path / "x.png", suite="loss-fwd")


def test_pytest_arguments_follow_the_options_in_any_order(tmp_path, capsys, monkeypatch):
    # `check --baseline F -- -k ranks` once failed: "unrecognized arguments: -- -k ranks"
    base = run_file(tmp_path, "base.json", 1.5)
    seen = []

    def suites(out, extra):
        seen.append(list(extra))
        out.write_text(base.read_text())
        return 0

    monkeypatch.setattr(guard, "run_suites", suites)
    assert guard.main(["check", "--baseline", str(base), "--", "-k", "ranks"]) == 0
    assert guard.main(["--baseline", str(base), "check", "--", "-k", "ranks"]) == 0
    assert seen == [["-k", "ranks"], ["-k", "ranks"]]


def without(path, tmp_path, name, fullname):
    data = json.loads(path.read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if b["fullname"] != fullname]
    out = tmp_path / name
    out.write_text(json.dumps(data))
    return out


def test_only_pytest_arguments_that_select_make_a_run_partial(tmp_path, capsys, monkeypatch):
    # `check -- -v` once excused a missing figure as "a partial run"
    base = run_file(tmp_path, "base.json", 1.5)
    part = without(base, tmp_path, "part.json", "step[template]")
    monkeypatch.setattr(guard, "run_suites", lambda out, extra: out.write_text(part.read_text()) and 0)
    assert guard.main(["check", "--baseline", str(base), "--", "-v", "-p", "no:cacheprovider"]) == 1
    assert "1 missing from this run\n" in capsys.readouterr().out
    assert guard.main(["check", "--baseline", str(base), "--", "-k", "loss"]) == 0
    assert "1 missing from this run (a partial run)" in capsys.readouterr().out
    assert guard.selects(["bench/bench_loss.py"]) and guard.selects(["--deselect=bench/x.py::y"])
    assert guard.selects(["bench"]) and guard.selects(["bench/bench_loss.py::bench_contrastive_loss"])
    assert not guard.selects(["-x", "-n", "2", "--tb=short"])
    # an option's value separated by a space is no test path
    assert not guard.selects(["--benchmark-max-time", "2", "--benchmark-columns", "min", "--timeout", "60"])


@pytest.mark.parametrize("args", [["--ignore-glob=*step*"], ["--ignore-glob", "*step*"], ["-mnot slow"],
                                  ["--ignore=bench/bench_step.py"], ["--deselect", "bench/bench_step.py::bench_train_step"]])
def test_every_narrowing_option_makes_a_run_partial(args):
    # each pytest option that drops benchmarks, in both spellings of its value
    assert guard.selects(["-v", *args])


def test_save_refuses_to_drop_figures_of_the_baseline(tmp_path, capsys):
    # a partial run saved over a full baseline silently stopped guarding what it lacked
    base = run_file(tmp_path, "base.json", 1.5)
    before = base.read_text()
    part = without(base, tmp_path, "part.json", "step[template]")
    assert guard.main(["save", "--run", str(part), "--baseline", str(base)]) == 2
    err = capsys.readouterr().err
    assert "base.json: this run lacks 1 of its figures (first: step[template]); nothing saved" in err
    assert f"this run stays in {part}): add --allow-missing to replace it anyway" in err
    assert base.read_text() == before
    # a baseline without a device field is this device's for check, so for save too
    data = json.loads(before)
    del data["device"]
    base.write_text(json.dumps(data))
    assert guard.main(["save", "--run", str(part), "--baseline", str(base)]) == 2
    assert "lacks 1 of its figures" in capsys.readouterr().err
    base.write_text(before)
    assert guard.main(["save", "--run", str(part), "--baseline", str(base), "--allow-missing"]) == 0
    assert json.loads(base.read_text()) == json.loads(part.read_text())
    assert "--allow-missing: 1 figures of the previous baseline dropped" in capsys.readouterr().err


def test_a_ratio_that_is_not_a_number_regresses(tmp_path, capsys):
    base = run_file(tmp_path, "base.json", 1.5)
    nan = run_file(tmp_path, "nan.json", float("nan"))
    assert guard.main(["check", "--run", str(nan), "--baseline", str(base)]) == 1
    assert "REGRESSION loss[fused]: ratio to plain 1.500 → nan" in capsys.readouterr().out


@pytest.mark.parametrize("ratio", [float("nan"), float("inf"), 0.0])
def test_save_refuses_a_ratio_that_is_not_a_positive_number(tmp_path, capsys, ratio):
    # saved, it failed every later check: a change against NaN is NaN, against 0 infinite
    bad = run_file(tmp_path, "bad.json", ratio)
    base = tmp_path / "base.json"
    assert guard.main(["save", "--run", str(bad), "--baseline", str(base)]) == 2
    assert "bad.json: 1 figures are not positive finite ratios (first: loss[fused]); nothing saved" in \
        capsys.readouterr().err
    assert not base.exists()


def test_a_baseline_of_another_device_is_refused(tmp_path, capsys):
    base = run_file(tmp_path, "base.json", 1.5, device="NVIDIA A100-SXM4-80GB")
    run = run_file(tmp_path, "run.json", 1.5, device="NVIDIA H100 80GB HBM3")
    assert guard.main(["check", "--run", str(run), "--baseline", str(base)]) == 2
    assert ("base.json: a baseline of NVIDIA A100-SXM4-80GB, not of this run's device (NVIDIA H100 80GB HBM3)"
            in capsys.readouterr().err)


def test_references_are_not_guarded(tmp_path, capsys):
    # plain + torch.compile against plain eager measures PyTorch, not this project
    data = json.loads(run_file(tmp_path, "base.json", 1.5).read_text())
    ref = bench("loss[compile]", "loss-fwd+bwd B=1024", "plain-compile", 0.004, ratio=0.4)
    ref["extra_info"]["reference"] = True
    data["benchmarks"].append(ref)
    assert set(guard.guarded(data)) == {"loss[fused]", "step[template]"}


def test_save_refuses_another_devices_baseline_and_replaces_an_unreadable_one(tmp_path, capsys):
    run = run_file(tmp_path, "run.json", 1.5)
    other = run_file(tmp_path, "other.json", 1.5, device="NVIDIA A100-SXM4-80GB")
    before = other.read_text()
    assert guard.main(["save", "--run", str(run), "--baseline", str(other)]) == 2
    assert "other.json: a baseline of NVIDIA A100-SXM4-80GB, not of this run's device" in capsys.readouterr().err
    assert other.read_text() == before
    broken = tmp_path / "broken.json"
    broken.write_text("{half a fi")
    assert guard.main(["save", "--run", str(run), "--baseline", str(broken)]) == 0
    assert "broken.json: unreadable (JSONDecodeError); replacing it" in capsys.readouterr().err
    assert json.loads(broken.read_text()) == json.loads(run.read_text())


def test_a_baseline_from_before_a_benchmark_became_a_reference_still_checks(tmp_path, capsys):
    # plain + compile was guarded once: an older baseline lists it without the reference flag
    def with_compile(name, reference):
        data = json.loads(run_file(tmp_path, name, 1.5).read_text())
        ref = bench("loss[compile]", "loss-fwd+bwd B=1024", "plain-compile", 0.004, ratio=0.4)
        if reference:
            ref["extra_info"]["reference"] = True
        data["benchmarks"].append(ref)
        (tmp_path / name).write_text(json.dumps(data))
        return tmp_path / name

    old, new = with_compile("old.json", False), with_compile("new.json", True)
    assert guard.main(["check", "--run", str(new), "--baseline", str(old)]) == 0
    out = capsys.readouterr().out
    assert "2 figures compared with old.json, 0 regressed beyond 35%\n" in out and "missing" not in out
    assert guard.main(["save", "--run", str(new), "--baseline", str(old)]) == 0


def test_loss_series_sorts_by_batch_size_and_skips_untimed_benchmarks():
    # pytest-benchmark writes its entries in the order they ran, and a benchmark that
    # errored carries no stats: the lines go left to right, without it
    data = {"benchmarks": [
        bench("f-4096", "loss-fwd+bwd B=4096", "fused", 0.016, b=4096, mem=4 * 2**20),
        bench("f-256", "loss-fwd+bwd B=256", "fused", 0.001, b=256),
        {**bench("f-1024", "loss-fwd+bwd B=1024", "fused", 0.004, b=1024), "stats": None},
        bench("f-fwd", "loss-fwd B=256", "fused", 0.0005, b=256),
    ]}
    assert plot.loss_series(data, "loss-fwd+bwd") == {"fused": [(256, 1.0, None), (4096, 16.0, 4.0)]}


def _drawn(monkeypatch):
    """The figures ``plot.plot`` closes, to read their axes."""
    figs = []
    real = plot.plt.close
    monkeypatch.setattr(plot.plt, "close", lambda fig: (figs.append(fig), real(fig)))
    return figs


def test_the_memory_panel_shows_the_implementations_measured(tmp_path, monkeypatch):
    # memory measured for one implementation at one size only still draws its line; one
    # never measured has none, and a run without any memory figure says so in the panel
    figs = _drawn(monkeypatch)
    data = {"device": "test", "benchmarks": [
        bench("f-256", "loss-fwd+bwd B=256", "fused", 0.001, b=256, mem=2**20),
        bench("f-1024", "loss-fwd+bwd B=1024", "fused", 0.004, b=1024),
        bench("p-256", "loss-fwd+bwd B=256", "plain-eager", 0.002, b=256),
    ]}
    plot.plot(data, tmp_path / "loss.png")
    ax_t, ax_m = figs[-1].axes
    assert [line.get_label() for line in ax_t.lines] == ["fused", "plain-eager"]
    assert [line.get_label() for line in ax_m.lines] == ["fused"] and not ax_m.texts
    for b in data["benchmarks"]:
        b["extra_info"]["peak_extra_bytes"] = None
    plot.plot(data, tmp_path / "loss.png")
    ax_m = figs[-1].axes[1]
    assert not ax_m.lines and [t.get_text() for t in ax_m.texts] == ["not measured on this device"]


def test_plot_command_writes_where_asked(tmp_path, capsys, monkeypatch):
    # --out in a folder that does not exist yet is created; without --out, loss.png here
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"device": "test", "benchmarks": [
        bench("f-256", "loss-fwd B=256", "fused", 0.001, b=256),
        bench("f-1024", "loss-fwd B=1024", "fused", 0.004, b=1024)]}))
    out = tmp_path / "figures" / "cpu" / "fwd.png"
    assert plot.main([str(run), "--out", str(out), "--suite", "loss-fwd"]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.chdir(tmp_path)
    assert plot.main([str(run), "--suite", "loss-fwd"]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("change,why", [
    (lambda b: b.update(extra_info={"ratio_to_plain": "abc"}), "'ratio_to_plain' is 'abc', not a number"),
    (lambda b: b.update(extra_info={"ratio_to_plain": True}), "'ratio_to_plain' is True, not a number"),
    (lambda b: b.update(extra_info=None), "'extra_info' is a NoneType, not an object"),
    (lambda b: b.pop("fullname"), "no 'fullname' string"),
])
@pytest.mark.parametrize("side", ["run", "baseline"])
def test_a_malformed_entry_is_one_line(tmp_path, capsys, change, why, side):
    # each was a traceback with exit 1, the code of a regression
    good = run_file(tmp_path, "good.json", 1.5)
    data = json.loads(good.read_text())
    change(data["benchmarks"][1])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    run, base = (bad, good) if side == "run" else (good, bad)
    with pytest.raises(SystemExit) as e:
        guard.main(["check", "--run", str(run), "--baseline", str(base)])
    name = "loss[fused]" if "fullname" not in why else "#1"
    assert e.value.code == 2 and capsys.readouterr().err == f"guard: error: {bad}: benchmark {name}: {why}\n"


@pytest.mark.parametrize("ratios", [(1.5, 0.0), (1.5, -5.0), (float("inf"), 100.0), (-5.0, 100.0), (0.0, 1.5)])
def test_a_ratio_of_zero_or_less_or_infinite_on_either_side_regresses(tmp_path, capsys, ratios):
    # a run's 0 passed as -100%, a baseline's inf or -5 passed anything, a baseline's 0 was a
    # ZeroDivisionError
    base, run = (run_file(tmp_path, f"{n}.json", r) for n, r in zip(("base", "run"), ratios, strict=True))
    assert guard.main(["check", "--run", str(run), "--baseline", str(base)]) == 1
    assert "(not a positive finite ratio)" in capsys.readouterr().out


def test_a_figure_timed_on_other_inputs_is_stale_not_compared(tmp_path, capsys):
    # a suite's inputs changed under the same names: the old baseline's ratio measured
    # another workload, and the check compared the two (a slowdown or a speedup of nothing)
    base = run_file(tmp_path, "base.json", 1.5)
    data = json.loads(base.read_text())
    for b in data["benchmarks"]:
        b["extra_info"]["workload"] = 2 if b["fullname"].startswith("loss") else 1
    run = tmp_path / "run.json"
    run.write_text(json.dumps(data))
    assert guard.main(["check", "--run", str(run), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    assert "changed    loss[fused]: timed on other inputs than the baseline's (workload 1 → 2); save a baseline " \
           "again" in out
    assert "1 figures compared with base.json, 0 regressed beyond 35%; 1 missing from this run\n" in out
    assert guard.main(["save", "--run", str(run), "--baseline", str(base)]) == 0
    assert guard.main(["check", "--run", str(run), "--baseline", str(base)]) == 0
    capsys.readouterr()


def test_a_save_that_selects_keeps_the_baselines_other_figures(tmp_path, capsys, monkeypatch):
    # save -- -k loss replaced a full baseline with the loss figures alone: the others were
    # no longer guarded, and a later check listed them as new
    base = run_file(tmp_path, "base.json", 1.5)
    faster = without(run_file(tmp_path, "faster.json", 1.2), tmp_path, "part.json", "step[template]")
    monkeypatch.setattr(guard, "run_suites", lambda out, extra: out.write_text(faster.read_text()) and 0)
    assert guard.main(["save", "--baseline", str(base), "--", "-k", "loss"]) == 0
    assert "1 entries of the runs this one left out (-k loss) kept from the previous baseline" in \
        capsys.readouterr().err
    saved = {b["fullname"]: b["extra_info"].get("ratio_to_plain") for b in json.loads(base.read_text())["benchmarks"]}
    assert saved["loss[fused]"] == 1.2 and saved["step[template]"] == 0.9


def test_check_without_a_baseline_says_so_before_running_the_suites(tmp_path, capsys, monkeypatch):
    # it ran every benchmark (minutes on a GPU) and only then found no baseline
    monkeypatch.setattr(guard, "BASELINES", tmp_path / "none")
    monkeypatch.setattr(guard, "run_suites", lambda out, extra: pytest.fail("the suites ran"))
    assert guard.main(["check"]) == 2
    assert "no baseline for cpu" in capsys.readouterr().err


def test_an_options_value_is_no_test_path_and_paths_narrow_the_run(monkeypatch):
    # --basetemp /tmp (a folder) and -o python_files=x.py counted as test paths: a partial run,
    # whose missing figures were excused
    for args in (["--basetemp", "/tmp"], ["--rootdir", "."], ["--confcutdir", "bench"], ["-o", "python_files=b_*.py"],
                 ["-r", "a"], ["--color", "yes"], ["--benchmark-precision", "0.02"], ["--log-format", "%(message)s"]):
        assert not guard.selects(args), args
    # flags take no value: the path after them selects
    assert guard.selects(["--benchmark-quiet", "bench/bench_ranks.py"]) and guard.selects(["--pyargs", "bench"])
    assert guard.selects(["--basetemp", "/tmp", "bench/bench_ranks.py"])
    # and a path given runs that path alone (pytest ran bench and the path: every suite)
    seen = []
    monkeypatch.setattr(guard.subprocess, "call", lambda cmd, cwd: seen.append(cmd) or 0)
    guard.run_suites(Path("r.json"), ["bench/bench_ranks.py"])
    guard.run_suites(Path("r.json"), ["-k", "loss"])
    assert [c.count("bench") for c in seen] == [0, 1] and "bench/bench_ranks.py" in seen[0]


def test_save_replaces_a_baseline_with_an_unreadable_entry(tmp_path, capsys, monkeypatch):
    # a save that selects merged the old entries by name: one without a name was a KeyError
    base = run_file(tmp_path, "base.json", 1.5)
    data = json.loads(base.read_text())
    del data["benchmarks"][0]["fullname"]
    base.write_text(json.dumps(data))
    new = run_file(tmp_path, "new.json", 1.2)
    monkeypatch.setattr(guard, "run_suites", lambda out, extra: out.write_text(new.read_text()) and 0)
    assert guard.main(["save", "--baseline", str(base), "--", "-k", "loss"]) == 0
    assert "base.json: an entry is unreadable (no 'fullname' string); replacing it" in capsys.readouterr().err
    assert json.loads(base.read_text()) == json.loads(new.read_text())
