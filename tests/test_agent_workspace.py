"""The workspace's guards: one process a workspace (``.lock``), a creation cut short made
again, git failures as one line, and a Ctrl-C that never leaves git's index lock behind."""

import os
import subprocess
import time

import pytest
from test_agent_loop import scripted

from agent import journal, loop, report
from agent.workspace import Workspace, WorkspaceError, locked


def _loop(tmp_path, cache, *extra):
    return loop.main(["--tag", "w", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                      "--noise-runs", "1", *extra])


def test_a_second_process_on_a_workspace_is_refused(small_cache, tmp_path, monkeypatch, capsys):
    # Two loops on one tag once recorded each other's live runs as interrupted and committed
    # over each other; a final score beside a loop would share its device.
    monkeypatch.setattr(loop, "run_experiment", scripted([10.0]))
    assert _loop(tmp_path, small_cache, "--max-experiments", "0") == 0
    before = (tmp_path / "w" / "journal.jsonl").read_text()
    capsys.readouterr()
    with locked(tmp_path / "w"):  # another process's session (flock is per open file: this one conflicts too)
        assert _loop(tmp_path, small_cache, "--max-experiments", "1") == 2
        err = capsys.readouterr().err
        assert err == f"loop: error: {tmp_path / 'w'}: in use by another process (pid {os.getpid()}); wait for it " \
                      "to end or stop it, or use another --tag\n", err
        assert report.main([str(tmp_path / "w"), "--final", "--data", str(small_cache)]) == 2
        assert "in use by another process" in capsys.readouterr().err
    assert (tmp_path / "w" / "journal.jsonl").read_text() == before  # nothing written meanwhile
    monkeypatch.setattr(loop, "run_experiment", scripted([9.0]))
    assert _loop(tmp_path, small_cache, "--max-experiments", "1") == 0  # released with the block


def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    code = f"from agent.workspace import locked\nwith locked({str(tmp_path / 'w')!r}):\n    import os; os._exit(0)\n"
    subprocess.run([os.sys.executable, "-c", code], check=True)
    with locked(tmp_path / "w"):  # no stale lock: flock goes with the process
        pass


def test_a_creation_cut_short_is_made_again(small_cache, tmp_path, monkeypatch):
    # killed between `git init` and the first commit: every later start once failed in git
    root = tmp_path / "w"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "recipe.py").write_text("half-copied")
    monkeypatch.setattr(loop, "run_experiment", scripted([10.0]))
    assert _loop(tmp_path, small_cache, "--max-experiments", "0") == 0
    ws = Workspace(root)
    assert ws.recipe.read_text() == loop.TEMPLATE.read_text()
    assert [e["status"] for e in journal.experiments(journal.read(ws.journal_path))] == ["baseline"]


def test_a_git_failure_is_one_line(small_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "run_experiment", scripted([10.0]))
    assert _loop(tmp_path, small_cache, "--max-experiments", "0") == 0
    lock = tmp_path / "w" / ".git" / "index.lock"  # as a git process killed mid-write leaves it
    lock.write_text("")
    os.utime(lock, (time.time() + 60, time.time() + 60))  # young: perhaps a person's git at work, so it stays
    capsys.readouterr()
    # --isolate off: on a machine without a sandbox auto's note would come first
    assert _loop(tmp_path, small_cache, "--max-experiments", "1", "--isolate", "off") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"loop: error: {tmp_path / 'w'}: git reset failed: fatal: Unable to create ") \
        and "index.lock" in err and err.count("\n") == 1, err


def test_ctrl_c_during_a_git_command_lets_git_finish(tmp_path, monkeypatch):
    # subprocess.run kills its child when interrupted: a git commit killed mid-write leaves
    # .git/index.lock, and every later git command in the workspace fails. The interrupt
    # arrives while `git add` runs (the first of a commit's two commands): it must finish, and
    # the interrupt go on, before `git commit`.
    ws = Workspace.open_or_create(tmp_path / "w", loop.TEMPLATE)
    ws.recipe.write_text(ws.recipe.read_text() + "\n# edited\n")
    real = subprocess.Popen.communicate
    interrupted = []

    def communicate(self, *args, **kwargs):
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "communicate", communicate)
    with pytest.raises(KeyboardInterrupt):
        ws.commit("experiment 1: edited")
    monkeypatch.undo()
    assert not (ws.root / ".git" / "index.lock").exists()
    assert ws.git("diff", "--cached", "--name-only") == "recipe.py"  # staged: git add ran to its end
    assert ws.git("log", "-1", "--format=%s") == "baseline: the template recipe"


def test_git_errors_name_the_workspace(tmp_path):
    ws = Workspace.open_or_create(tmp_path / "w", loop.TEMPLATE)
    with pytest.raises(WorkspaceError, match=r"w: git show failed: fatal: .*nosuchcommit"):
        ws.show("nosuchcommit")


def test_a_stale_index_lock_is_removed_at_the_start_of_a_session(small_cache, tmp_path, monkeypatch, capsys):
    # a SIGKILL to the loop's whole process group can kill git holding the lock: every later
    # session then failed in git
    monkeypatch.setattr(loop, "run_experiment", scripted([10.0]))
    assert _loop(tmp_path, small_cache, "--max-experiments", "0") == 0
    lock = tmp_path / "w" / ".git" / "index.lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 30, time.time() - 30))
    capsys.readouterr()
    monkeypatch.setattr(loop, "run_experiment", scripted([9.0]))
    assert _loop(tmp_path, small_cache, "--max-experiments", "1") == 0
    assert not lock.exists() and f"loop: note: removed {lock}, left 30 s ago" in capsys.readouterr().err


def test_another_repository_is_never_taken_for_a_workspace(small_cache, tmp_path, monkeypatch, capsys):
    # the loop resets its workspace to the first commit: another project's uncommitted work would go
    other = tmp_path / "w"
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    (other / "notes.txt").write_text("committed")
    subprocess.run(["git", "-C", str(other), "add", "notes.txt"], check=True)
    subprocess.run(["git", "-C", str(other), "-c", "user.name=a", "-c", "user.email=a@b", "commit", "-q", "-m",
                    "my project"], check=True)
    (other / "notes.txt").write_text("uncommitted work")
    monkeypatch.setattr(loop, "run_experiment", scripted([10.0]))
    assert _loop(tmp_path, small_cache, "--max-experiments", "0") == 2
    assert capsys.readouterr().err == (
        f"loop: error: {other}: a git repository that is not a research-loop workspace (its first commit is not "
        "'baseline: the template recipe'); the loop resets its workspace, so it refuses this one: use another "
        "--tag or --workspace-root\n")
    assert (other / "notes.txt").read_text() == "uncommitted work" and not (other / "journal.jsonl").exists()


def test_an_interrupt_during_a_reset_keeps_the_edited_brief(tmp_path, monkeypatch):
    # git finishes its reset and the interrupt goes on: the brief was once left as committed
    ws = Workspace.open_or_create(tmp_path / "w", loop.TEMPLATE)
    program = ws.root / "program.md"
    program.write_text(program.read_text() + "\nMY NEW IDEAS\n")
    root = ws.root_commit()
    real = subprocess.Popen.communicate
    calls = []

    def communicate(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if not calls:
            calls.append(True)
            raise KeyboardInterrupt  # arrives while git runs; git() waits for it, then re-raises
        return out

    monkeypatch.setattr(subprocess.Popen, "communicate", communicate)
    with pytest.raises(KeyboardInterrupt):
        ws.reset(root)
    monkeypatch.undo()
    assert calls and program.read_text().endswith("MY NEW IDEAS\n")


def test_no_other_project_is_adopted_or_overwritten(tmp_path):
    # the loop resets its workspace and writes recipe.py and program.md into a new one
    main = tmp_path / "proj"
    main.mkdir()
    git = ["git", "-c", "user.name=a", "-c", "user.email=a@b"]
    subprocess.run([*git, "init", "-q", str(main)], check=True)
    (main / "notes.txt").write_text("v1")
    subprocess.run([*git, "-C", str(main), "add", "notes.txt"], check=True)
    subprocess.run([*git, "-C", str(main), "commit", "-q", "-m", "my project"], check=True)
    subprocess.run([*git, "-C", str(main), "worktree", "add", "-q", str(tmp_path / "wt")], check=True)
    (tmp_path / "wt" / "notes.txt").write_text("uncommitted")
    with pytest.raises(WorkspaceError, match=r"wt: part of another git repository \(.*wt/\.git is a file\)"):
        Workspace.open_or_create(tmp_path / "wt", loop.TEMPLATE)
    assert (tmp_path / "wt" / "notes.txt").read_text() == "uncommitted"
    fresh = tmp_path / "fresh"  # a repository with no commit yet, but work staged in it
    subprocess.run([*git, "init", "-q", str(fresh)], check=True)
    (fresh / "a.txt").write_text("staged")
    subprocess.run([*git, "-C", str(fresh), "add", "a.txt"], check=True)
    with pytest.raises(WorkspaceError, match=r"fresh: a git repository without commits that the loop did not "
                                             r"make \(a\.txt\)"):
        Workspace.open_or_create(fresh, loop.TEMPLATE)
    assert subprocess.run([*git, "-C", str(fresh), "diff", "--cached", "--name-only"], capture_output=True,
                          text=True).stdout == "a.txt\n"
    plain = tmp_path / "plain"  # no repository, a person's files
    plain.mkdir()
    (plain / "recipe.py").write_text("mine")
    (plain / "data.csv").write_text("x")
    with pytest.raises(WorkspaceError, match=r"plain: not empty \(data\.csv, recipe\.py\), and not a research-loop workspace"):
        Workspace.open_or_create(plain, loop.TEMPLATE)
    assert (plain / "recipe.py").read_text() == "mine" and not (plain / ".git").exists()


def test_a_refused_folder_gets_nothing_written_in_it(tmp_path, monkeypatch, capsys):
    # The loop's lock file was created before the refusal and stayed behind in the person's
    # folder or project (an untracked .lock there); the built-in dataset was prepared first
    # too (minutes), only to be refused after.
    monkeypatch.chdir(tmp_path)  # the default --data, data/synthetic, is missing here
    git = ["git", "-c", "user.name=a", "-c", "user.email=a@b"]
    proj = tmp_path / "root" / "proj"  # another project's repository
    proj.mkdir(parents=True)
    subprocess.run([*git, "init", "-q", str(proj)], check=True)
    (proj / "notes.txt").write_text("v1")
    subprocess.run([*git, "-C", str(proj), "add", "notes.txt"], check=True)
    subprocess.run([*git, "-C", str(proj), "commit", "-q", "-m", "my project"], check=True)
    plain = tmp_path / "root" / "plain"  # a person's files
    plain.mkdir()
    (plain / "data.csv").write_text("x")
    monkeypatch.setattr(loop.subprocess, "run", lambda *a, **k: pytest.fail("prepared before the refusal"))
    for tag, message in (("proj", "a git repository that is not a research-loop workspace"),
                         ("plain", "not empty (data.csv), and not a research-loop workspace")):
        rc = loop.main(["--workspace-root", str(tmp_path / "root"), "--tag", tag, "--budget-s", "1"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"loop: error: {tmp_path / 'root' / tag}: {message}"), err
        assert not (tmp_path / "root" / tag / ".lock").exists()
    assert sorted(p.name for p in proj.iterdir()) == [".git", "notes.txt"]
    assert sorted(p.name for p in plain.iterdir()) == ["data.csv"]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("kill_after", [1, 2, 3, 4])
def test_a_kill_at_any_point_of_a_reset_keeps_the_edited_brief(tmp_path, kill_after):
    # A kill runs no `finally`: between git's `reset --hard` and the brief's rewrite it once
    # left the committed brief in place of the person's edit. Killed after each git call of
    # the reset, then reset again (as a resumed session does).
    import sys
    from pathlib import Path

    ws = Workspace.open_or_create(tmp_path / "w", loop.TEMPLATE)
    root = ws.root_commit()
    program = ws.root / "program.md"
    ws.recipe.write_text(ws.recipe.read_text() + "\n# an experiment\n")
    program.write_text(program.read_text() + "\ncommitted with the experiment\n")
    ws.git("commit", "-qam", "experiment")
    program.write_text(program.read_text() + "MY NEW IDEAS\n")  # edited by hand after it
    code = ("import os\nfrom agent.workspace import Workspace\nreal, n = Workspace.git, [0]\n"
            "def git(self, *a):\n    out = real(self, *a)\n    n[0] += 1\n"
            f"    if n[0] == {kill_after}:\n        os._exit(137)\n    return out\n"
            f"Workspace.git = git\nWorkspace({str(ws.root)!r}).reset({root!r})\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 137, p.stderr
    assert program.read_text().endswith("committed with the experiment\nMY NEW IDEAS\n")
    ws.reset(root)
    assert program.read_text().endswith("MY NEW IDEAS\n")
    assert ws.git("rev-parse", "HEAD") == root and "# an experiment" not in ws.recipe.read_text()
    assert ws.git("status", "--porcelain") == "M program.md"


def test_a_reset_restores_files_with_unusual_names_and_a_deleted_brief(tmp_path):
    # git quotes non-ASCII names in plain output, and checkout took the quoted name for a
    # pathspec: the reset failed and left recipe.py as the experiment wrote it. A brief
    # deleted by hand is restored as committed (there is no edit to keep), as reset --hard did.
    ws = Workspace.open_or_create(tmp_path / "w", loop.TEMPLATE)
    odd, spaced, nested = ws.root / "idées.md", ws.root / "my notes.md", ws.root / "sub" / "x.txt"
    odd.write_text("v1\n")
    spaced.write_text("v1\n")
    ws.git("add", "-A")
    ws.git("commit", "-qm", "notes")
    base = ws.git("rev-parse", "HEAD")
    odd.write_text("v2\n")
    spaced.write_text("v2\n")
    nested.parent.mkdir()
    nested.write_text("new\n")
    ws.recipe.write_text(ws.recipe.read_text() + "\n# an experiment\n")
    ws.git("add", "-A")
    ws.git("commit", "-qm", "experiment")
    (ws.root / "program.md").unlink()
    ws.reset(base)
    assert odd.read_text() == spaced.read_text() == "v1\n" and "# an experiment" not in ws.recipe.read_text()
    assert not (ws.root / "sub").exists()  # the folder the experiment added, emptied, goes too
    assert (ws.root / "program.md").read_text() == ws.git("show", f"{base}:program.md") + "\n"
    assert ws.git("status", "--porcelain") == ""


def test_the_lock_holds_this_processs_pid_alone(tmp_path):
    # the pid is written over what an earlier holder left: without the truncation a shorter
    # pid kept the tail of a longer one, and the refusal named a process that never existed
    root = tmp_path / "w"
    root.mkdir()
    (root / ".lock").write_text("9" * 30 + "\n")  # longer than any pid
    with locked(root):
        assert (root / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(WorkspaceError, match=rf"in use by another process \(pid {os.getpid()}\);"), locked(root):
            pass


def test_an_empty_repository_with_a_remote_is_not_taken_for_a_creation_cut_short(tmp_path):
    # a fresh clone of an empty repository holds only .git, as a creation cut short does; its
    # remote says a person made it, and deleting .git would lose that configuration
    root = tmp_path / "w"
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    # a path, never contacted: configuring a remote is all the check looks at
    subprocess.run(["git", "-C", str(root), "remote", "add", "origin", str(tmp_path / "upstream.git")], check=True)
    with pytest.raises(WorkspaceError, match=r"w: a git repository without commits that the loop did not make "
                                             r"\(it has remotes\)"):
        Workspace.open_or_create(root, loop.TEMPLATE)
    assert Workspace(root).git("remote") == "origin" and not (root / "recipe.py").exists()


@pytest.mark.parametrize("ending", ["template", "\n\n", "\r\n", ""], ids=["template", "blank lines", "crlf", "no newline"])
def test_show_gives_the_file_as_committed(tmp_path, ending):
    # a recipe written back from a commit (a fix attempt, the final run) is the committed
    # file byte for byte: git()'s stripping and newline translation must not reach it
    ws = Workspace.open_or_create(tmp_path / "w", loop.TEMPLATE)
    text = loop.TEMPLATE.read_text()
    if ending != "template":
        text = "HPARAMS = {}  # caf\u00e9" + ending
        ws.recipe.write_bytes(text.encode("utf-8"))
        ws.commit("edited")
    commit = ws.head()
    assert ws.show(commit) == text
    ws.reset(ws.root_commit())
    ws.recipe.write_bytes(ws.show(commit).encode("utf-8"))
    assert ws.recipe.read_bytes() == text.encode("utf-8")
    ws.commit("again")
    assert ws.git("diff", commit, "HEAD") == ""  # the same file as the commit's


def test_the_loops_records_are_ignored_by_git(tmp_path):
    # the journal, the table, the runs, the plot, the compile cache and the lock never show
    # as untracked work in the workspace's repository
    ws = Workspace.open_or_create(tmp_path / "w", loop.TEMPLATE)
    for name in ("journal.jsonl", "results.tsv", "progress.png", ".lock", "experiments/1/run.log",
                 ".compile_cache/inductor/kernel.py"):
        (ws.root / name).parent.mkdir(parents=True, exist_ok=True)
        (ws.root / name).write_text("x")
    assert ws.git("status", "--porcelain", "--untracked-files=all") == ""


def test_only_an_index_lock_older_than_the_threshold_is_removed(tmp_path):
    # a young lock may be a person's git command at work: it stays; an older one was left by
    # a git killed with the loop and goes
    ws = Workspace.open_or_create(tmp_path / "w", loop.TEMPLATE)
    lock = ws.root / ".git" / "index.lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 30, time.time() - 30))
    ws.remove_stale_lock(min_age_s=600)
    assert lock.exists()
    ws.remove_stale_lock(min_age_s=10)
    assert not lock.exists()
