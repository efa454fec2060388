"""Process hygiene for the harness and the research loop: secrets kept from a recipe's
environment, children that die with their parent, SIGTERM handled as Ctrl-C, a process
tree's CPU time, the processes a child leaves behind (``kill_strays``), and the harness's
way of running a child to its end (``child``), timed from a line it prints (``relay``)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# TOKENIZERS_PARALLELISM (the tokenizers library's switch) is a setting, not a token
SECRET = re.compile(r"(API_KEY|TOKEN(?!IZERS)|SECRET|PASSWORD|CREDENTIAL)", re.IGNORECASE)
# a URL with a password in it (DATABASE_URL=postgres://user:pw@host/db), whatever its name
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@", re.IGNORECASE)


def scrub_environment(env: dict | None = None) -> list[str]:
    """Remove variables that look like secrets from ``env`` (default: os.environ), in
    place; returns their names. A recipe has no reason to see an API key, and what it
    prints reaches the run's log, which a proposer reads."""
    env = os.environ if env is None else env
    gone = [k for k in env if SECRET.search(k) or URL_PASSWORD.search(env[k])]
    for k in gone:
        del env[k]
    return gone


def prctl(*args: int) -> None:
    """prctl(2) where libc has it (Linux); elsewhere nothing."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(*args)
    except OSError:
        pass


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """Inside the block SIGTERM (a scheduler's preemption, ``timeout``) raises
    KeyboardInterrupt, as Ctrl-C does, so whatever a Ctrl-C saves and reports a SIGTERM does
    too; a repeat is ignored, so it cannot cut that clean-up short. (The training loop's own
    handler, installed while it trains, lets the step finish first.) A no-op outside the
    main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def install_stop(after: str = "this step") -> dict:
    """First Ctrl-C or SIGTERM (what a scheduler sends before it preempts a job, and what
    ``timeout`` sends): finish the current step, then stop cleanly (checkpoint, result).
    A second Ctrl-C stops at once; a repeated SIGTERM is ignored (one sent to a process
    group reaches a harness's training process twice, directly and passed on by the
    harness; SIGKILL is the hard stop there), also after the loop, while the checkpoint
    and the result are written. Returns the state: ``requested`` (a stop came), ``hard``
    (the second Ctrl-C, raised as KeyboardInterrupt), ``after`` (what a stop waits for, as
    the message says; the caller may change it) and ``restore()``, the old handlers back."""
    state = {"requested": False, "after": after, "restore": lambda: None}
    if threading.current_thread() is not threading.main_thread():
        return state
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if state["requested"]:
            if signum == signal.SIGTERM:
                return
            state["hard"] = True  # mid-step: the state may be half-updated, no checkpoint
            raise KeyboardInterrupt
        state["requested"], state["term"] = True, signum == signal.SIGTERM
        again = "Ctrl-C again to stop now" if signum == signal.SIGINT else "Ctrl-C or SIGKILL to stop now"
        print(f"\ntrain: {signal.Signals(signum).name}: stopping after {state['after']} ({again})",
              file=sys.stderr)

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():  # the repeat of a SIGTERM may still be on its way
            signal.signal(sig, signal.SIG_IGN if sig == signal.SIGTERM and state.get("term") else old)

    state["restore"] = restore
    return state


class HardStop(KeyboardInterrupt):
    """A second Ctrl-C inside ``stop_deferred``: stop at once, ``what`` cut short."""


@contextlib.contextmanager
def stop_deferred(what: str):
    """``install_stop`` for a block: a first Ctrl-C or SIGTERM is noted, not raised, so that
    ``what`` (a checkpoint, a result being written) finishes first; the caller reads the
    state this yields (``requested``) to stop after it. A second Ctrl-C is a ``HardStop``
    carrying ``what`` (an atomic write leaves the previous file in place)."""
    state = install_stop(after=what)
    try:
        yield state
    except KeyboardInterrupt:
        if state.get("hard"):
            raise HardStop(what) from None
        raise
    finally:
        state["restore"]()


def exit_main(main) -> None:
    """``sys.exit(main())`` for a command's ``__main__``, with SIGTERM ignored once ``main``
    has returned: the command has finished and written its result, and a copy of the SIGTERM
    that stopped it (a process group's, passed on late) landing during the interpreter's
    shutdown would otherwise end the process with 143 instead of the exit code the result
    stands for. A reader that went away (``| head``) ends the command quietly with 141, as
    SIGPIPE ends other command-line tools, not with a BrokenPipeError traceback. A Ctrl-C
    that ``main`` does not handle itself (one during a start-up, before its work begins)
    ends it with one line, not a traceback, and by SIGINT, as Python would."""
    try:
        rc = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush would fail again
        rc = 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).stem}: interrupted", file=sys.stderr)  # python -m agent.loop: "loop"
        sys.stderr.flush()
        # ended by the signal, as Python ends on an unhandled one: a shell script running the
        # command then stops too, where an exit code of 130 would let it go on to the next line
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        rc = 128 + signal.SIGINT  # (where the signal could not end the process)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(rc)


def die_with_parent() -> None:  # pragma: no cover - runs in a child between fork and exec
    """For ``preexec_fn``: the child is killed when the process that started it dies, so a
    run never outlives its harness or its loop, whatever killed them."""
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


PR_SET_CHILD_SUBREAPER = 36


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of process ``pid`` and of the processes under it, all their
    threads, the children they have reaped included (Linux), else None. The tree, not the
    one process: an isolated encoder runs two levels below the process the harness started
    (``eclip.sandbox``), and work a process hands to a child of its own is its work too."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime, stime, cutime, cstime
        except (OSError, IndexError, ValueError):
            if p == pid:
                return None
            continue  # a child that ended meanwhile: its parent's cutime has it once reaped
        todo += children(p)
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (Linux; elsewhere none found): from its
    threads' ``children`` files, or, on a kernel without them, from every process's parent."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:  # gone, or no /proc
        return set()
    try:
        return {int(c) for task in tasks for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()}
    except FileNotFoundError:  # a kernel without them (CONFIG_PROC_CHILDREN), or a thread that ended
        pass
    except (OSError, ValueError):
        return set()
    found = set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        try:
            if name.isdigit() and int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def own_children() -> set[int]:
    """The processes whose parent is this one."""
    return children(os.getpid())


def kill_strays(others: set[int]) -> None:
    """Kill and reap every child of this process but ``others`` (those it had before):
    orphans a training process left, handed to this subreaper; again until none is left,
    since each one killed hands its own children over in turn."""
    while strays := own_children() - others:
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in strays:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # reaped elsewhere, or not ours after all
                others.add(pid)
            except OSError:
                pass


def child_setup(preexec):
    """``preexec_fn`` of every child: Ctrl-C back to its default (the harness ignores or only
    notes it while it waits, and children inherit an ignored signal), killed if the harness
    dies, then ``preexec``."""
    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        die_with_parent()
        if preexec is not None:
            preexec()
    return setup


def child(cmd: list[str], preexec, env: dict | None = None, ready: str | None = None,
          signals: list[int] | None = None, deadline_s: float | None = None, stderr_tail: list[str] | None = None,
          stop_grace_s: float | None = None, killed: list[str] | None = None, start_s: float | None = None):
    """Run one child to its end; its exit code. Ctrl-C reaches it too (same process group):
    it finishes its step, saves and writes an interrupted result; the harness waits for that
    instead of dying first. A SIGTERM sent to the harness is passed on to the child, which
    takes it as a Ctrl-C (and ignores a repeat: a SIGTERM to the whole group reaches it
    twice). With ``ready`` (a line the child prints on stdout), ``(exit code, seconds from
    the first such line to the child's end)`` instead, None for the seconds when it never
    printed one; its other lines are passed on. ``signals``: a list the SIGINTs and SIGTERMs
    this process received while the child ran are appended to (a child that says it was
    interrupted when none came was stopped by its own code). ``deadline_s`` (with ``ready``):
    the child is killed (SIGKILL) once that long has passed since its ready line: a step that
    never returns would otherwise hold the harness for ever, a SIGTERM included, since the
    child ends its step before it stops. ``stop_grace_s``: the child is killed too once that
    long has passed since the first Ctrl-C or SIGTERM this process heard (a hung step would
    otherwise hold a stopped run to its deadline, hours away on a long budget). ``start_s``
    (with ``ready``): the child is killed once that long has passed since its start without
    a ready line (a start-up that hangs, on a file system that no longer answers, say, would
    otherwise hold the harness for ever: the deadline counts from that line). ``killed``: a
    list ``"deadline"``, ``"grace"`` or ``"start"`` is appended to when the child was killed
    for that reason (a SIGKILL from elsewhere, the kernel's OOM killer, appends nothing).
    ``stderr_tail``: a list the child's last stderr lines (at most ``TAIL_LINES``, from its
    last ``TAIL_BYTES``) are put in, its stderr being passed on byte for byte (a progress
    bar's carriage returns included)."""
    procs: list[subprocess.Popen] = []
    seen: list[float] = []
    err_reader = None
    pending: list[int] = []  # a SIGTERM that came before the child existed
    heard = signals if signals is not None else []
    first: list[float] = []  # when the first Ctrl-C or SIGTERM came
    cause = None  # why this process killed the child, if it did: "deadline", "grace" or "start"
    # a limit to watch while it runs
    polls = ((deadline_s is not None or start_s is not None) and ready) or stop_grace_s is not None

    def note(signum) -> None:
        heard.append(signum)
        if not first:
            first.append(time.monotonic())

    def forward(signum, frame) -> None:
        note(signum)
        if procs:
            procs[0].send_signal(signal.SIGTERM)
        else:
            pending.append(signum)

    # Ctrl-C is noted, not acted on: it reaches the child too, which ends its step first
    previous = signal.signal(signal.SIGINT, lambda signum, frame: note(signum))
    term = signal.signal(signal.SIGTERM, forward)
    # A process the child leaves behind (forked, in a session of its own) would work on
    # after the harness stopped timing it, and could rewrite the checkpoint before the
    # encoders read it: orphans of the child come to this process (a subreaper), which
    # kills them as soon as the child has ended.
    others = own_children()
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    reader = None
    try:
        procs.append(subprocess.Popen(cmd, preexec_fn=child_setup(preexec), env=env,
                                      stdout=subprocess.PIPE if ready else None,
                                      stderr=subprocess.PIPE if stderr_tail is not None else None))
        started = time.monotonic()
        if pending:
            procs[0].send_signal(signal.SIGTERM)
        if ready:  # errors="replace": bytes that are not UTF-8 must not end the relaying thread
            lines = io.TextIOWrapper(procs[0].stdout, encoding="utf-8", errors="replace")
            reader = relay(lines, ready, lambda: seen.append(time.monotonic()))
        if stderr_tail is not None:
            err_reader = tee(procs[0].stderr, sys.stderr, stderr_tail)
        while True:
            try:
                rc = procs[0].wait(timeout=0.25 if polls else None)
                break
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                late = ("deadline" if deadline_s is not None and seen and now - seen[0] > deadline_s
                        else "grace" if stop_grace_s is not None and first and now - first[0] > stop_grace_s
                        else "start" if start_s is not None and ready and not seen and now - started > start_s
                        else None)
                if late:
                    cause = cause or late  # the first reason; the kill repeats until the child has gone
                    # sandboxed, this is the launcher: the namespace's first process dies with it
                    # (its parent-death signal), and the kernel then ends every process inside
                    procs[0].kill()
        end = time.monotonic()
        if killed is not None and cause and rc == -signal.SIGKILL:  # one that ended just before the kill ended itself
            killed.append(cause)
    finally:
        if not procs or procs[0].poll() is not None:  # never the child itself, while it runs
            kill_strays(others)  # before anything reads what the child wrote
        prctl(PR_SET_CHILD_SUBREAPER, 0)
        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGINT, previous)
    for thread in (reader, err_reader):
        if thread is not None:
            thread.join(timeout=5)  # a grandchild still holding the pipe does not hold the harness
    if reader is None:
        return rc
    return rc, (end - seen[0] if seen else None)


LINE_CHARS = 65536  # the longest piece of a child's stdout ``relay`` holds at once


def relay(stream, ready: str, on_ready) -> threading.Thread:
    """A started thread that copies a child's stdout ``stream`` to this process's, but for
    the first ``ready`` line, for which it calls ``on_ready()`` instead (a child's code may
    print that line again later: it is passed on as output)."""
    def copy() -> None:
        said, passing, whole = False, True, True  # whole: this piece begins a line
        # in pieces of at most LINE_CHARS: a line without end (a recipe's print) holds no memory
        while line := stream.readline(LINE_CHARS):
            begins, whole = whole, line.endswith("\n")
            if not said and begins and line.rstrip("\n") == ready:
                said = True
                on_ready()
            elif passing:
                try:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                except (OSError, ValueError):  # a reader gone (| head): drain on, or the child blocks
                    passing = False

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


TAIL_LINES = 20  # the child's last stderr lines ``child`` keeps (its error line, a traceback's end)
TAIL_BYTES = 4096  # ... from at most this many last bytes: a line without end holds no memory


def tee(stream, out, tail: list[str]) -> threading.Thread:
    """A started thread that copies the binary ``stream`` to the text stream ``out`` as its
    bytes come (partial lines, carriage returns, any encoding), keeping the last
    ``TAIL_LINES`` lines of its last ``TAIL_BYTES`` in ``tail``. A failed write (a reader
    gone) stops the copying, never the draining: the child must not block on a full pipe."""
    sink = getattr(out, "buffer", None)

    def copy() -> None:
        kept, passing = b"", True
        try:
            while chunk := os.read(stream.fileno(), 65536):
                if passing:
                    try:
                        if sink is not None:
                            out.flush()  # what was written as text goes first
                            sink.write(chunk)
                            sink.flush()
                        else:  # a text-only stream (a test's capture)
                            out.write(chunk.decode("utf-8", "replace"))
                            out.flush()
                    except (OSError, ValueError):
                        passing = False
                kept = (kept + chunk)[-TAIL_BYTES:]
        finally:  # once, at the end of the stream
            tail[:] = kept.decode("utf-8", "replace").replace("\r", "\n").splitlines()[-TAIL_LINES:]

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def exit_code(rc: int) -> int:
    """A child's return code as this process's exit code: killed by signal N, 128 + N
    (the shells' convention; 130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 - rc if rc < 0 else rc
