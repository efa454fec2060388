"""A research workspace ``runs/<tag>/``: its own git repository plus untracked records.

Tracked: ``recipe.py`` (the one file a proposer edits) and ``program.md`` (the brief a
person writes for the proposer). Ignored and never cleaned: ``journal.jsonl``,
``results.tsv``, ``experiments/<n>/`` and ``progress.png``. Keeping a change is a commit;
discarding one is a hard reset to the best commit, which touches tracked files only.
``.lock`` is held (``flock``) by the one process that runs the study or its final score:
two loops on one workspace would record each other's live runs as interrupted and commit
over each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT_MESSAGE = "baseline: the template recipe"  # the first commit of every workspace
# what creating a workspace writes (and the lock, written first): a folder holding anything
# else is not a workspace whose creation was cut short
CREATED = frozenset({".git", ".gitignore", "recipe.py", "program.md", ".lock", "experiments"})
IGNORED = ("journal.jsonl", "results.tsv", "experiments/", "progress.png", ".compile_cache/", ".lock")
PROGRAM = """# Research brief

Goal: the lowest validation mean rank (`val_mean_rank` in the harness's result.json;
image→text and text→image averaged, 0 is perfect, about (N-1)/2 is chance) after a fixed
wall-clock training budget. The budget covers the recipe's setup (import, build_model,
build_optimizer) and its steps, compilation included, so a slower step has to pay for itself
in a better model.

Rules:
- Edit only `recipe.py`. The harness owns the data, the clock and the evaluation; a recipe
  that reaches for files, processes, the network or the interpreter is rejected unrun.
- A change is kept only if it beats the best so far by more than the noise floor (twice the
  spread of the baseline's repeated runs); otherwise the recipe goes back to the best.
- Simplicity: at equal score the simpler recipe wins. A small gain that adds a lot of code
  is not worth keeping; deleting code at equal score is a result.
- A crash, divergence, out-of-memory or timeout is a failed experiment: it teaches what not
  to do. If your change caused it, fix the cause or move on; do not retry it unchanged.
- The held-out test split is scored once, at the end (`agent.report --final`); it plays no
  part in these decisions.

Edit this brief to steer the study (ideas to try, areas to avoid); it is committed with the
recipe and shown to the proposer every time.
"""


class WorkspaceError(Exception):
    """A workspace that cannot be opened or used as it is (one line for the command line)."""


@contextlib.contextmanager
def locked(root: Path):
    """Hold ``root/.lock`` exclusively for the block (creating ``root`` if need be); raise
    WorkspaceError at once, naming the holder's pid, if another process holds it. The lock
    goes with the process, so a killed loop never leaves a stale one."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a file in the way, no permission, a read-only disk
        raise WorkspaceError(f"{root}: cannot create the workspace ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise WorkspaceError(f"{root}: in use by another process (pid {holder}); wait for it to end or stop "
                                 "it, or use another --tag") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.recipe = self.root / "recipe.py"
        self.journal_path = self.root / "journal.jsonl"
        self.results_path = self.root / "results.tsv"
        self.experiments = self.root / "experiments"

    def git(self, *args: str) -> str:
        """Run git in the workspace; its stdout, stripped. A failure raises WorkspaceError
        with git's own message. A Ctrl-C (or a SIGTERM turned into one) lets git finish
        rather than killing it, which would leave ``.git/index.lock`` behind and stop every
        later git command here."""
        return self._git_bytes(*args).decode("utf-8", errors="replace").strip()

    def _git_bytes(self, *args: str) -> bytes:
        """:meth:`git`'s run, its stdout exactly as git wrote it."""
        cmd = ["git", "-C", str(self.root), "-c", "user.name=eclip research loop",
               "-c", "user.email=loop@localhost", "-c", "commit.gpgsign=false", *args]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            try:
                out, err = proc.communicate()
            except KeyboardInterrupt:
                proc.communicate()  # git ends by itself (a terminal's Ctrl-C reached it too)
                raise
        if proc.returncode:
            text = err.decode("utf-8", errors="replace")
            why = (text.strip().splitlines() or [f"exit code {proc.returncode}"])[0]
            raise WorkspaceError(f"{self.root}: git {args[0]} failed: {why}")
        return out

    def has_commit(self) -> bool:
        """Whether the repository has a first commit (creation ran to the end)."""
        try:
            self.git("rev-parse", "-q", "--verify", "HEAD")
        except WorkspaceError:
            return False
        return True

    def show(self, commit: str, path: str = "recipe.py") -> str:
        """The text of ``path`` at ``commit``, exactly: written back, the file is the commit's
        (git() would strip its blank lines and turn CRLF into LF)."""
        return self._git_bytes("show", f"{commit}:{path}").decode("utf-8")

    def root_commit(self) -> str:
        """The workspace's first commit: the recipe as copied from the template."""
        return self.git("rev-list", "--max-parents=0", "HEAD").splitlines()[0]

    @classmethod
    def check(cls, root: Path) -> bool:
        """Raise WorkspaceError where ``root`` is not the loop's to use: another project's
        repository or folder, or a workspace whose records disagree (runs but no journal, or a
        journal but no git history), which starting over would overwrite. Reads only, so the
        loop checks before it writes anything there, its lock included. True for a creation
        cut short (a repository with nothing but what creation writes), to be made again."""
        ws = cls(root)
        runs = sum(1 for p in ws.experiments.iterdir() if p.is_dir()) if ws.experiments.is_dir() else 0
        journal_size = ws.journal_path.stat().st_size if ws.journal_path.is_file() else 0
        dotgit = ws.root / ".git"
        if dotgit.exists() and not dotgit.is_dir():  # a worktree's or a submodule's: another project's
            raise WorkspaceError(f"{ws.root}: part of another git repository ({dotgit} is a file); the loop "
                                 "resets its workspace, so it refuses this one: use another --tag or --workspace-root")
        names = sorted(p.name for p in ws.root.iterdir()) if ws.root.is_dir() else []
        if dotgit.is_dir():
            begun = ws.has_commit()
            if not begun and not runs and not journal_size:
                # a creation cut short holds nothing but what creation writes, and a repository
                # without remotes: anything else is a person's repository, never deleted
                others = [n for n in names if n not in CREATED]
                if others or ws.git("remote"):
                    raise WorkspaceError(f"{ws.root}: a git repository without commits that the loop did not "
                                         f"make ({', '.join(others) or 'it has remotes'}); use another --tag or "
                                         "--workspace-root")
                return True
            if begun and ws.git("log", "-1", "--format=%s", ws.root_commit()) != ROOT_MESSAGE:
                raise WorkspaceError(f"{ws.root}: a git repository that is not a research-loop workspace (its first "
                                     f"commit is not {ROOT_MESSAGE!r}); the loop resets its workspace, so it "
                                     "refuses this one: use another --tag or --workspace-root")
            if runs and not journal_size:
                raise WorkspaceError(f"{ws.journal_path}: missing or empty, but {ws.experiments} holds {runs} runs; "
                                     "restore the journal, or use another --tag")
            if runs and journal_size:
                from agent import journal  # (journal imports this module)

                if not journal.experiments(journal.read(ws.journal_path)):
                    # every line damaged: a new study would reset the branch past the kept commits
                    # and rewrite results.tsv without their rows
                    raise WorkspaceError(f"{ws.journal_path}: no readable run in it, but {ws.experiments} holds "
                                         f"{runs} runs; restore the journal, or use another --tag")
            return False
        if runs or journal_size:
            raise WorkspaceError(f"{dotgit}: missing, but the workspace has a journal or runs whose "
                                 "commits it records; restore it, or use another --tag")
        # creation writes recipe.py and program.md after `git init`: without a .git, a person's
        # files there would go (the lock, written first, aside)
        others = [n for n in names if n != ".lock"]
        if others:
            raise WorkspaceError(f"{ws.root}: not empty ({', '.join(others[:3])}{' …' if len(others) > 3 else ''}), "
                                 "and not a research-loop workspace; use another --tag or --workspace-root")
        return False

    @classmethod
    def open_or_create(cls, root: Path, template: Path) -> Workspace:
        """Open the workspace at ``root``, or create it there; refused as :meth:`check` says.
        A repository without a commit and with no records is a creation cut short: it is made
        again."""
        ws = cls(root)
        dotgit = ws.root / ".git"
        if cls.check(root):
            shutil.rmtree(dotgit)  # a creation cut short: nothing else in it
        if dotgit.is_dir():
            ws.remove_stale_lock()
            return ws
        ws.root.mkdir(parents=True, exist_ok=True)
        ws.git("init", "-q")
        (ws.root / ".gitignore").write_text("\n".join(IGNORED) + "\n")
        shutil.copyfile(template, ws.recipe)
        (ws.root / "program.md").write_text(PROGRAM)
        ws.git("add", ".gitignore", "recipe.py", "program.md")
        ws.git("commit", "-q", "-m", ROOT_MESSAGE)
        ws.experiments.mkdir(exist_ok=True)
        return ws

    def remove_stale_lock(self, min_age_s: float = 2.0) -> None:
        """Remove a ``.git/index.lock`` that a git command killed with the loop left behind
        (a SIGKILL to the whole process group): under the workspace lock no other loop runs
        git here, and without this every git command of every later session would fail. A
        lock younger than ``min_age_s`` may be a person's git command at work: it stays."""
        lock = self.root / ".git" / "index.lock"
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= min_age_s:
            lock.unlink(missing_ok=True)
            print(f"loop: note: removed {lock}, left {age:.0f} s ago by a git command that was killed", file=sys.stderr)

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def commit(self, message: str) -> str:
        self.git("add", "recipe.py", "program.md")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def reset(self, commit: str) -> None:
        """Tracked files back to ``commit``; ignored records stay (never ``git clean``).
        ``program.md`` is the person's: git never writes it here, so an edit of it survives
        the reset (uncommitted), whenever the process is killed, and is committed with the
        next experiment. HEAD and the index move first; then the other files that differ
        from ``commit`` are checked out, or removed where ``commit`` lacks them."""
        # NUL-separated and literal: git quotes unusual names (non-ASCII ones) in plain output
        brief_gone = not (self.root / "program.md").exists()  # nothing to keep: restored as committed
        differ = [p for p in self._paths("diff", "--name-only", "--no-renames", commit)
                  if p != "program.md" or brief_gone]  # against the working tree: uncommitted edits too
        self.git("reset", "-q", "--mixed", commit)
        held = set(self._paths("ls-tree", "-r", "--name-only", commit))
        if any(p in held for p in differ):
            self.git("checkout", commit, "--", *[f":(literal){p}" for p in differ if p in held])
        for p in differ:
            if p not in held:
                path = self.root / p
                path.unlink(missing_ok=True)
                for folder in path.parents:  # as reset --hard does: folders it left empty go too
                    if folder == self.root or any(folder.iterdir()):
                        break
                    folder.rmdir()

    def _paths(self, command: str, *args: str) -> list[str]:
        """The paths a git command lists, NUL-separated (``-z``, before the revision)."""
        return [p for p in self.git(command, "-z", *args).split("\0") if p]

    def diff(self, base: str) -> str:
        return self.git("diff", base, "--", "recipe.py")
