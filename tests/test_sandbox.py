"""``eclip.sandbox`` and ``eclip.harness run --isolate``: what a sandboxed process can and
cannot reach, codes and signals through it, and a recipe's processes kept from the cache.

The sandbox needs Linux user namespaces; where the machine forbids them, these tests skip
with the probe's reason (the harness's and the loop's refusal is tested everywhere)."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from train_support import small_recipe

from eclip import harness, process, sandbox
from eclip.data.cache import load_cache, write_subset
from eclip.train import TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
WHY = sandbox.probe()
needs_sandbox = pytest.mark.skipif(WHY is not None, reason=f"no sandbox on this machine: {WHY}")


def sandboxed(code: str, *, ro=(), rw=(), hide=(), env=None, timeout=120) -> subprocess.CompletedProcess:
    """``python -c code`` in a sandbox, its TMPDIR under the test's folder when ``env`` names it."""
    cmd = sandbox.command([sys.executable, "-c", textwrap.dedent(code)], ro=ro, rw=rw, hide=hide)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@needs_sandbox
def test_a_sandboxed_process_reaches_what_it_is_given_and_nothing_else(tmp_path):
    secret = tmp_path / "cache"
    secret.mkdir()
    (secret / "annotations.safetensors").write_text("the pairs")
    given = tmp_path / "given.txt"
    given.write_text("read me")
    out = tmp_path / "out"
    out.mkdir()
    scratch = Path("/tmp") / f"eclip-sandbox-scratch-{os.getpid()}-{time.time_ns()}"
    p = sandboxed(f"""
        import errno, json, os, socket
        seen = {{"secret": os.path.exists({str(secret)!r}), "given": open({str(given)!r}).read(),
                 "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}}
        try:
            open({str(given)!r}, "a").write("changed")
        except OSError as e:
            seen["write_ro"] = errno.errorcode[e.errno]
        try:
            socket.create_connection(("127.0.0.1", 9), timeout=5)
        except OSError as e:
            seen["net"] = errno.errorcode.get(e.errno, str(e))
        open({str(scratch)!r}, "w").write("private")
        open({str(out / "written.txt")!r}, "w").write("from inside")
        print(json.dumps(seen))
    """, ro=[given], rw=[out], hide=[secret])
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stdout)
    assert seen["secret"] is False and seen["given"] == "read me"
    assert seen["write_ro"] == "EROFS" and given.read_text() == "read me"
    assert seen["pids"] == [1, 2]  # itself and the sandbox's first process: no /proc/<pid>/root leads out
    assert not scratch.exists()  # its /tmp is its own
    assert seen["net"] in ("ENETUNREACH", "ECONNREFUSED", "EADDRNOTAVAIL")
    assert (out / "written.txt").read_text() == "from inside"


@needs_sandbox
def test_two_sandboxes_share_no_scratch_and_leave_no_mount_point(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))  # where the new root's mount point is made
    first = sandboxed("open('/tmp/note', 'w').write('left for the other'); open('/dev/shm/n', 'w').write('x')",
                      env=env)
    assert first.returncode == 0, first.stderr
    second = sandboxed("import os; print(os.path.exists('/tmp/note'), os.path.exists('/dev/shm/n'))", env=env)
    assert second.returncode == 0 and second.stdout.split() == ["False", "False"]
    assert list(tmp_path.iterdir()) == []  # the mount point was removed once each ended


@needs_sandbox
def test_a_path_left_visible_is_refused_before_the_command_runs(tmp_path):
    (tmp_path / "cache").mkdir()
    marker = tmp_path / "ran"
    p = sandboxed(f"open({str(marker)!r}, 'w')", ro=[tmp_path], hide=[tmp_path / "cache"])
    assert p.returncode == 2 and not marker.exists()
    assert p.stderr.strip() == (f"sandbox: error: {tmp_path / 'cache'} is visible inside the sandbox (it lies under "
                                f"{tmp_path}, a folder given to it); move it out of the folders the sandbox binds")


@needs_sandbox
def test_a_folder_reached_through_a_link_shows_no_hidden_path_under_its_other_name(tmp_path):
    # PYTHONPATH=$PWD in a linked checkout: the folder was bound as it was named, the check
    # inside looked for the cache where it really lies, and a recipe read it at the linked name
    real = tmp_path / "real"
    (real / "cache").mkdir(parents=True)
    (real / "cache" / "records.jsonl").write_text("the pairs")
    (tmp_path / "link").symlink_to(real)
    leak = tmp_path / "link" / "cache" / "records.jsonl"
    code = f"import os; print(os.path.exists({str(leak)!r}))"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "link"))  # a sys.path folder holding the cache
    cmd = sandbox.command([sys.executable, "-c", code], hide=[real / "cache"])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert (p.returncode, p.stdout.strip()) == (0, "False"), p.stderr  # that folder is left out
    # given outright, through the link: refused, naming it
    p = sandboxed(code, ro=[tmp_path / "link"], hide=[real / "cache"])
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == (f"sandbox: error: {real / 'cache'} is visible inside the sandbox (it lies under "
                                f"{tmp_path / 'link'}, a folder given to it); move it out of the folders the "
                                "sandbox binds")


@needs_sandbox
@pytest.mark.parametrize("layout", ["link into the cache", "link to the root", "hidden path a link"])
def test_linked_sys_path_folders_that_would_show_or_break_are_left_out(tmp_path, layout):
    # a sys.path folder linked to a folder inside the cache was bound, and every run refused; one
    # linked to / put / among the binds (the probe failed: "read-only /"); a hidden path given as
    # a link inside a sys.path folder was compared by its target only, and that folder bound
    cache = tmp_path / "cache"
    (cache / "sub").mkdir(parents=True)
    hide = cache
    if layout == "link into the cache":
        (tmp_path / "L").symlink_to(cache / "sub")
        entry = tmp_path / "L"
    elif layout == "link to the root":
        (tmp_path / "L").symlink_to("/")
        entry, hide = tmp_path / "L", None
    else:
        (tmp_path / "sp").mkdir()
        (tmp_path / "sp" / "cachelink").symlink_to(cache)
        entry, hide = tmp_path / "sp", tmp_path / "sp" / "cachelink"
    env = dict(os.environ, PYTHONPATH=str(entry))
    cmd = sandbox.command([sys.executable, "-c", "print('ran')"], hide=[hide] if hide else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert (p.returncode, p.stdout.strip()) == (0, "ran"), p.stderr


@needs_sandbox
def test_a_linked_sys_path_folder_still_imports_inside(tmp_path):
    # the link was made again inside, its target left out: imports through it failed
    pkg = tmp_path / "real" / "pkg_inside"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 7\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "link"))
    cmd = sandbox.command([sys.executable, "-c", "import pkg_inside; print(pkg_inside.VALUE)"])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert (p.returncode, p.stdout.strip()) == (0, "7"), p.stderr


@needs_sandbox
def test_a_working_folder_inside_the_hidden_one_starts_the_command_at_the_root(tmp_path):
    # the working folder is made inside the new root: within the cache it made the cache's
    # path appear, and every run was refused as though the cache were bound
    cache = tmp_path / "cache"
    (cache / "sub").mkdir(parents=True)
    cmd = sandbox.command([sys.executable, "-c", f"import os; print(os.getcwd(), os.path.exists({str(cache)!r}))"],
                          hide=[cache])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cache / "sub")
    assert (p.returncode, p.stdout.split()) == (0, ["/", "False"]), p.stderr


def test_hidden_problem_names_a_cache_under_a_folder_every_sandbox_binds(tmp_path, monkeypatch):
    bound = tmp_path / "bound"
    (bound / "cache").mkdir(parents=True)
    monkeypatch.setattr(sandbox, "default_ro", lambda hide=(): [str(bound)])  # as if every sandbox bound it
    assert sandbox.hidden_problem([str(bound / "cache")]) == (
        f"{bound / 'cache'} is visible inside the sandbox (it lies under {bound}, a folder given to it); "
        "move it out of the folders the sandbox binds")
    assert sandbox.hidden_problem([str(tmp_path / "elsewhere")]) is None


@needs_sandbox
def test_a_path_that_leads_into_a_hidden_folder_is_refused(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "annotations.safetensors").write_text("the pairs")
    (tmp_path / "run").symlink_to(tmp_path / "cache")  # as a sandboxed process could leave one
    given = tmp_path / "run" / "annotations.safetensors"
    p = sandboxed(f"print(open({str(given)!r}).read())", ro=[given], hide=[tmp_path / "cache"])
    assert p.returncode == 2 and "the pairs" not in p.stdout
    assert p.stderr.strip() == (f"sandbox: error: {given}: leads to {tmp_path / 'cache' / 'annotations.safetensors'}, "
                                f"under {tmp_path / 'cache'}, which the sandbox must not show")


@needs_sandbox
@pytest.mark.parametrize("code, rc", [("import sys; sys.exit(3)", 3),
                                      ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 128 + 9),
                                      # Python ends itself with SIGINT then: 130, as a shell shows it
                                      ("raise KeyboardInterrupt", 128 + 2)])
def test_the_commands_exit_code_comes_through(code, rc):
    assert sandboxed(code).returncode == rc


@needs_sandbox
def test_a_missing_program_and_a_missing_command_are_one_line_errors(tmp_path):
    p = subprocess.run(sandbox.command(["no-such-program-here"]), capture_output=True, text=True, timeout=60)
    assert p.returncode == 127 and p.stderr.strip() == "sandbox: error: no-such-program-here: No such file or directory"
    p = subprocess.run([sys.executable, "-m", "eclip.sandbox", "--ro", str(tmp_path)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip() == "sandbox: error: no command given (after --)"
    p = subprocess.run(sandbox.command(["true"], ro=[tmp_path / "nothing"]), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == f"sandbox: error: {tmp_path / 'nothing'}: no such file or folder to give the sandbox"


@needs_sandbox
def test_a_sigterm_reaches_the_command_and_the_namespace_ends_with_it(tmp_path):
    tag = f"eclip-sandbox-test-{os.getpid()}-{time.time_ns()}"
    out = tmp_path / "out"
    out.mkdir()
    code = f"""
        import signal, subprocess, sys, time
        # an orphan to be: it outlives its parent unless the namespace takes it down
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", {tag!r}])
        signal.signal(signal.SIGTERM, lambda *a: (open({str(out / 'term')!r}, 'w').write('got it'), sys.exit(7)))
        print("ready", flush=True)
        time.sleep(600)
    """
    proc = subprocess.Popen(sandbox.command([sys.executable, "-c", textwrap.dedent(code)], rw=[out]),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 7
    finally:
        proc.kill()
    assert (out / "term").read_text() == "got it"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(tag in cmdline for cmdline in _cmdlines()):
        time.sleep(0.05)
    assert not any(tag in cmdline for cmdline in _cmdlines())


@needs_sandbox
def test_the_command_has_no_terminal_and_gets_ctrl_c_once_through_the_sandbox(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code = f"""
        import os, signal, sys, time
        got = []
        signal.signal(signal.SIGINT, lambda *a: got.append(1))
        facts = [os.getsid(0) == os.getpid(), os.readlink("/proc/self/fd/0"), os.path.exists("/dev/tty")]
        print(*facts, flush=True)
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # a second copy would arrive meanwhile
        open({str(out / "count")!r}, "w").write(str(len(got)))
    """
    # the caller's Ctrl-C: to its whole process group, here the sandbox's outer process
    proc = subprocess.Popen(sandbox.command([sys.executable, "-c", textwrap.dedent(code)], rw=[out]),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        # a session leader of its own: a terminal it shared would take its keystrokes (TIOCSTI)
        assert proc.stdout.readline().split() == ["True", "/dev/null", "False"]
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert (out / "count").read_text() == "1"


def _cmdlines() -> list[str]:
    lines = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
            except OSError:
                pass
    return lines


def test_the_probe_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(sandbox.sys, "platform", "darwin")
    assert sandbox.probe() == "needs Linux namespaces (this is darwin)"


def test_the_command_names_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd = sandbox.command(["prog", "arg"], ro=["a"], rw=["b"], hide=["c"])
    assert cmd == [sys.executable, "-m", "eclip.sandbox", "--ro", str(tmp_path / "a"), "--rw", str(tmp_path / "b"),
                   "--hide", str(tmp_path / "c"), "--", "prog", "arg"]


def test_cpu_seconds_count_the_work_of_a_processs_children():
    # a parent that only waits, and a child that computes about 0.5 s
    burn = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.5: pass')"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {burn!r}]); "
            "p.wait(); print('done', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "done"
        assert process.cpu_seconds(proc.pid) >= 0.45  # the reaped child's time, in the parent's cutime
    finally:
        proc.kill()
        proc.wait()


def test_a_subset_cache_holds_its_rows_under_the_same_fingerprint(small_cache, tmp_path):
    cache = load_cache(small_cache)
    rows = cache.split_images("train")
    write_subset(cache, rows, tmp_path / "train")
    sub = load_cache(tmp_path / "train")
    assert sub.manifest["fingerprint"] == cache.manifest["fingerprint"]
    assert sub.manifest["subset_of"] == str(small_cache) and sub.manifest["subset_images"] == rows.numel()
    assert bool((sub.split == 0).all()) and sub.images.shape[0] == rows.numel() == 300
    assert bool((sub.images == cache.images[rows]).all())
    # each caption still belongs to its own image
    ours = {tuple(cache.images[cache.caption_image[c]].flatten()[:64].tolist()): cache.tokens[c].tolist()
            for c in range(cache.tokens.shape[0])}
    for c in range(sub.tokens.shape[0]):
        assert ours[tuple(sub.images[sub.caption_image[c]].flatten()[:64].tolist())] == sub.tokens[c].tolist()
    records = (tmp_path / "train" / "records.jsonl").read_text().splitlines()
    assert len(records) == 300 and all(json.loads(r)["split"] == "train" for r in records)
    assert (tmp_path / "train" / "tokenizer.json").read_bytes() == (small_cache / "tokenizer.json").read_bytes()


def spy_recipe(tmp_path: Path, cache: Path) -> Path:
    """The template with a ``build_model`` that says on stderr whether the cache is readable
    from its process, and when the process built its model and when it ended (wall clock):
    code the recipe check refuses, run here by bypassing the check, as an evasion of it
    would."""
    return small_recipe(tmp_path, textwrap.dedent(f"""

        _spied = build_model


        def build_model(spec):
            import atexit, os, sys, time
            print(f"spy: cache readable: {{os.access({str(cache / 'annotations.safetensors')!r}, os.R_OK)}}",
                  file=sys.stderr, flush=True)
            print(f"spy-time: {{time.time()}} start", file=sys.stderr, flush=True)
            atexit.register(lambda: print(f"spy-time: {{time.time()}} end", file=sys.stderr, flush=True))
            return _spied(spec)
    """))


@needs_sandbox
@pytest.mark.parametrize("isolate", [False, True])
def test_isolated_recipe_processes_cannot_read_the_cache(small_cache, tmp_path, monkeypatch, capfd, isolate):
    monkeypatch.setattr(harness, "check_file", lambda path: [])  # as an evasion of the check would
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    argv = ["run", "--recipe", str(spy_recipe(tmp_path, small_cache)), "--data", str(small_cache),
            "--budget-s", "3", "--out", str(out), "--device", "cpu", "--compile-cache", str(tmp_path / "cc")]
    assert harness.main(argv + ["--isolate"] * isolate) == 0
    err = capfd.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("spy: ")]
    # training, the images, the captions and the batch check: four processes built the model
    assert said == [f"spy: cache readable: {not isolate}"] * 4, err[-3000:]
    if isolate:  # the encoders one at a time: processes that overlap can talk (a lock, the load)
        stamps = sorted((float(t), what) for t, what in re.findall(r"^spy-time: ([\d.]+) (start|end)$", err, re.M))
        assert [what for _, what in stamps] == ["start", "end"] * 4, stamps
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "ok" and r["isolated"] is isolate and r["val_mean_rank"] >= 1
    # no copy of the training split, no encoder's folder or log left behind
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.json", "checkpoint.safetensors", "metrics.jsonl",
                                                     "result.json"]


PLANTER = """

_planted = build_model


def build_model(spec):
    import os, sys
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    if os.path.isdir(cache):  # in the training process (the encoders are given no compile cache)
        print(f"spy: compile cache holds {sorted(os.listdir(cache))}", file=sys.stderr, flush=True)
        with open(os.path.join(cache, "planted.py"), "w") as f:  # what the next run would load as code
            f.write("print('planted')")
    return _planted(spec)
"""


@needs_sandbox
@pytest.mark.parametrize("template", [False, True], ids=["a recipe", "the template"])
def test_an_isolated_recipe_compiles_into_a_copy_of_the_compile_cache(small_cache, tmp_path, monkeypatch, capfd,
                                                                      template):
    # torch.compile and Triton load what they find in their cache as code: a recipe writing
    # into the workspace's shared cache would run in every later run's training
    monkeypatch.setattr(harness, "check_file", lambda path: [])  # as an evasion of the check would
    monkeypatch.setattr(harness, "is_template", lambda recipe: template)  # the template's own runs share it
    monkeypatch.chdir(ROOT)
    shared = tmp_path / "cc"
    (shared / "triton").mkdir(parents=True)
    (shared / "earlier.py").write_text("# compiled by the template's run")
    out = tmp_path / "run"
    assert harness.main(["run", "--recipe", str(small_recipe(tmp_path, PLANTER)), "--data", str(small_cache),
                         "--budget-s", "3", "--out", str(out), "--device", "cpu", "--compile-cache", str(shared),
                         "--isolate"]) == 0
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "ok" and r["compile_cache"] == ("shared" if template else "private copy")
    # warm either way: the recipe found what earlier runs compiled
    assert "spy: compile cache holds ['earlier.py', 'triton']" in capfd.readouterr().err
    assert sorted(p.name for p in shared.iterdir()) == ["earlier.py", *["planted.py"] * template, "triton"]
    assert not (out / "compile_cache").exists()  # the copy went with the training


@pytest.mark.parametrize("isolate", [False, True])
def test_links_a_recipe_leaves_in_its_run_directory_do_not_steer_the_harness(small_cache, tmp_path, monkeypatch,
                                                                             isolate):
    if isolate and WHY is not None:
        pytest.skip(f"no sandbox on this machine: {WHY}")
    out, elsewhere, victim = tmp_path / "run", tmp_path / "elsewhere", tmp_path / "victim.txt"
    elsewhere.mkdir()
    victim.write_text("keep me")
    small_recipe(tmp_path, textwrap.dedent(f"""

        _planted = build_model


        def build_model(spec):
            import os
            try:  # the training process: its run directory is writable, the links are not there yet
                os.symlink({str(elsewhere)!r}, {str(out / "eval_images")!r})
                os.symlink({str(victim)!r}, {str(out / "eval_texts.log")!r})
            except OSError:
                pass
            return _planted(spec)
    """))
    monkeypatch.setattr(harness, "check_file", lambda path: [])  # as an evasion of the check would
    monkeypatch.chdir(ROOT)
    argv = ["run", "--recipe", str(tmp_path / "recipe.py"), "--data", str(small_cache), "--budget-s", "3",
            "--out", str(out), "--device", "cpu"]
    assert harness.main(argv + ["--isolate"] * isolate) == 0
    assert json.loads((out / "result.json").read_text())["status"] == "ok"
    # the split's inputs were not written where the link pointed, the log not into the victim
    assert list(elsewhere.iterdir()) == [] and victim.read_text() == "keep me"


def test_isolate_is_refused_where_no_sandbox_can_be_built(small_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "probe", lambda: "unshare (user namespaces): Operation not permitted")
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.py"
    recipe.write_text(TEMPLATE.read_text())
    rc = harness.main(["run", "--recipe", str(recipe), "--data", str(small_cache), "--budget-s", "3",
                       "--out", str(out), "--isolate"])
    assert rc == 2 and list(out.iterdir()) == []  # nothing trained, no result
    assert capsys.readouterr().err.strip() == ("harness: error: --isolate: cannot build the sandbox on this machine: "
                                               "unshare (user namespaces): Operation not permitted")


def test_downloaded_models_are_given_and_downloaded_datasets_are_not(tmp_path, monkeypatch):
    hub = tmp_path / "hf" / "hub"
    for name in ("models--org--tower", "datasets--org--the-val-split"):
        (hub / name).mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    given = sandbox.default_ro()
    assert str(hub / "models--org--tower") in given and str(tmp_path / "torch" / "hub" / "checkpoints") in given
    assert not any(p.startswith(str(hub / "datasets--")) for p in given) and str(hub) not in given


@needs_sandbox
def test_the_command_can_neither_remount_nor_unmount_what_it_was_given(tmp_path):
    # root of the sandbox's user namespace, the command could remount a read-only bind
    # writable (the recipe, the project's code, /usr: as the caller, maybe the real root),
    # unmount one, write the machine's sysctls, or write PID 1's memory
    given = tmp_path / "given"
    given.mkdir()
    (given / "code.py").write_text("kept")
    p = sandboxed(f"""
        import ctypes, errno, json, os
        libc = ctypes.CDLL(None, use_errno=True)
        seen = {{}}
        for name, path in (("given", {str(given)!r}), ("sys", "/sys"), ("usr", "/usr")):
            ok = libc.mount(None, path.encode(), None, ctypes.c_ulong(32 | 4096), None) == 0  # MS_REMOUNT|MS_BIND
            seen["remount " + name] = ok or errno.errorcode[ctypes.get_errno()]
            seen["umount " + name] = libc.umount2(path.encode(), 2) == 0 or errno.errorcode[ctypes.get_errno()]
        try:
            open({str(given / "code.py")!r}, "w").write("changed")
        except OSError as e:
            seen["write"] = errno.errorcode[e.errno]
        seen["writable mounts under /sys, /proc/sys"] = [
            line.split()[4] for line in open("/proc/self/mountinfo")
            if line.split()[4] == "/sys" or line.split()[4].startswith(("/sys/", "/proc/sys"))
            if "rw" in line.split()[5].split(",")]
        try:
            open("/proc/1/mem", "r+b")
            seen["pid 1's memory"] = "opened"
        except OSError as e:
            seen["pid 1's memory"] = errno.errorcode[e.errno]
        print(json.dumps(seen))
    """, ro=[given])
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stdout)
    assert (given / "code.py").read_text() == "kept", seen
    assert seen["write"] == "EROFS", seen
    for name in ("given", "sys", "usr"):
        assert seen["remount " + name] == "EPERM" and seen["umount " + name] == "EINVAL", seen
    assert seen["writable mounts under /sys, /proc/sys"] == [], seen
    assert seen["pid 1's memory"] == "EACCES", seen


def harness_in_a_child(tmp_path: Path, setup: str, argv: list[str], timeout: float) -> int:
    """``eclip.harness.main(argv)`` in a child Python after ``setup`` (monkeypatches), killed
    after ``timeout`` s: a read that blocks for ever (a FIFO) ends the test, not the session."""
    script = tmp_path / "drive.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(setup)
                      + f"\nraise SystemExit(harness.main({argv!r}))\n")
    try:
        return subprocess.run([sys.executable, str(script)], cwd=ROOT, timeout=timeout, capture_output=True).returncode
    except subprocess.TimeoutExpired:
        pytest.fail(f"the harness still ran after {timeout} s: a read blocked")


@pytest.mark.parametrize("left", ["a result of its own", "a FIFO", "a folder"])
def test_what_the_training_process_leaves_as_its_result_is_never_a_score_nor_a_hang(tmp_path, left):
    # a recipe's code runs in the training process and may write any result.json: one that is
    # not "ranked_by: caller" was passed on as it was, its score included (ok, rank 1.0)
    setup = f"""
        import json, os
        from pathlib import Path
        from eclip import harness

        def child(cmd, preexec, env=None, ready=None, signals=None, **kw):
            path = Path(cmd[cmd.index("--out") + 1]) / "result.json"
            if {left!r} == "a result of its own":
                path.write_text(json.dumps({{"status": "ok", "val_mean_rank": 1.0, "ranked_by": "harness",
                                            "metrics": {{"mean_rank": 1.0}}, "isolated": True}}))
            elif {left!r} == "a FIFO":
                os.mkfifo(path)
            else:
                (path / "inside").mkdir(parents=True)
            return (0, 1.0) if ready else 0

        harness.child = child
    """
    out = tmp_path / "run"
    rc = harness_in_a_child(tmp_path, setup, ["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path),
                                              "--budget-s", "1", "--out", str(out), "--device", "cpu"], 60)
    r = json.loads((out / "result.json").read_text())
    assert rc == 1 and r["status"] == "crash" and r["val_mean_rank"] is None and "metrics" not in r, r


@pytest.mark.parametrize("isolate", [False, True])
def test_a_fifo_an_encoder_leaves_for_its_embeddings_does_not_hang_the_harness(small_cache, tmp_path, isolate):
    if isolate and WHY is not None:
        pytest.skip(f"no sandbox on this machine: {WHY}")
    small_recipe(tmp_path, textwrap.dedent("""

        import os as _os, sys as _sys
        _main = _sys.modules["__main__"]
        if hasattr(_main, "save_embeddings"):  # an encoding process: a FIFO where the harness reads
            _main.save_embeddings = lambda path, img, txt: _os.mkfifo(path)
    """))
    out = tmp_path / "run"
    setup = """
        from eclip import harness
        harness.check_file = lambda path: []  # as an evasion of the check would
    """
    rc = harness_in_a_child(tmp_path, setup, ["run", "--recipe", str(tmp_path / "recipe.py"), "--data",
                                              str(small_cache), "--budget-s", "3", "--out", str(out), "--device", "cpu",
                                              *["--isolate"] * isolate], 120)
    r = json.loads((out / "result.json").read_text())
    assert rc == 1 and r["status"] == "error" and "not a regular file" in r["reason"], r
