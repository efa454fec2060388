"""``python -m eclip.sandbox``: run one command where it sees only the files it is given.

    python -m eclip.sandbox --ro PATH ... --rw PATH ... --hide PATH ... -- CMD ARGS...

The recipe policy (``eclip.policy``) is a deny-list, and each adversarial review of it found
recipes that run code of their own; such code, in a process the harness starts, could read
the cache's held-out pairs from disk and fake its score. The sandbox closes that path at the
operating system instead of in the recipe's text. On Linux, with user namespaces, it:

1. unshares user, mount, PID, network and IPC namespaces (no privileges needed: the caller's
   uid becomes root of the new user namespace and of nothing else);
2. builds a new root file system on a tmpfs holding only: the system's programs and
   libraries (``/usr``, ``/etc``, ``/bin``, ``/lib*``, ``/sbin``: not ``/opt``, ``/srv``,
   ``/mnt`` or ``/home``, where data lives; a Python installed there comes by its prefix),
   the interpreter's prefixes, the folders on ``sys.path`` but the working one
   (``default_ro``), the ``eclip`` and ``kernels`` packages, the downloaded models of the
   HF and torch hub caches (``pretrained_weights``), the paths given with ``--ro``
   (read-only) and ``--rw`` (one that leads, through links, into a ``--hide`` path is
   refused), the working folder (empty but for what is bound in it), a few device nodes
   (null, zero, random, the GPU's), ``/sys`` read-only, a ``/proc`` of the new PID
   namespace (no other process is visible, so no ``/proc/<pid>/root`` leads out), and
   fresh, private ``/tmp``, ``/var/tmp`` and ``/dev/shm``;
3. switches to it with ``pivot_root`` and detaches the old root, so no path leads back;
4. refuses to run (exit 2) if any ``--hide`` path is still visible: the harness names the
   cache there, so a cache that sits under a bound path (inside ``/usr``, say) is a
   one-line error rather than a silent leak;
5. runs the command as the namespace's second process, in a user and mount namespace
   nested in the sandbox's (``lock_mounts``: the kernel locks the mounts it inherits, so the
   command, root there, can neither remount a read-only bind writable nor unmount one), in
   a session of its own with no terminal and stdin from ``/dev/null``. The first process
   (this module, no torch) passes Ctrl-C and SIGTERM on, reaps orphans, and exits with the
   command's code (128 + N for signal N). When it ends, the kernel ends every process left
   in the namespace.

Two sandboxed processes share nothing writable but what both were given with ``--rw``; the
network namespace has no interfaces, which also separates abstract Unix sockets.

Limits: Linux only, where user namespaces are allowed (some containers' seccomp profiles
and ``kernel.unprivileged_userns_clone=0`` forbid them: ``probe()`` says why). Paths under a
bound folder are visible; ``--hide`` checks the ones that matter. Code inside still has the
GPU and the bound files; it can waste the budget, not read what it was not given.
Exit codes: the command's own; 2 when the sandbox cannot be built (one line on stderr).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import platform
import signal
import subprocess
import sys
import tempfile

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
# statvfs f_flag bits -> the mount flags a read-only remount must keep: the kernel locks the
# flags a bind mount inherited from a more privileged namespace, and a remount that drops
# one (nosuid on /tmp, say) is refused with EPERM
KEEP_FLAGS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME,
              2048: MS_NODIRATIME, 4096: MS_RELATIME}
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SYSTEM_RO = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")  # no tty: see _init
GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri")
PRIVATE_TMP = ("/tmp", "/var/tmp")  # and /dev/shm, on the new /dev
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")  # the machine's, not the namespace's


class SandboxError(Exception):
    """The sandbox could not be built (the message is the one line shown)."""


_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, what: str) -> None:
    src = None if source is None else os.fsencode(source)
    fs = None if fstype is None else os.fsencode(fstype)
    _check(libc().mount(src, os.fsencode(target), fs, ctypes.c_ulong(flags), None), what)


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def default_ro(hide: list[str] = ()) -> list[str]:
    """What any sandboxed Python process of this project reads: the system, the interpreter's
    prefixes, the folders on ``sys.path`` that hold no ``hide`` path (``PYTHONPATH``'s and
    the site folders; not the working folder, which ``python -m`` puts there and which may be
    a home folder full of data), and the two packages on their own (an editable install, or
    a checkout, whose other folders may hold data). The working folder is made inside, so
    the command starts there and ``-m`` finds the packages. Found without importing the
    packages: ``kernels`` imports torch, whose threads would make ``unshare`` fail (EINVAL)."""
    import importlib.util

    paths = [p for p in SYSTEM_RO if os.path.lexists(p)]
    paths += {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.realpath(sys.executable))}
    cwd = os.getcwd()
    hidden = _hidden_forms(hide)
    for entry in sys.path:
        entry = os.path.abspath(entry or cwd)
        real = os.path.realpath(entry)
        # by real paths too: a folder reached through a link (PYTHONPATH=$PWD in a linked
        # checkout) holds what its target holds, the cache included; one inside the cache is
        # left out as well, and a link to / is no folder to bind
        if os.path.isdir(entry) and "/" not in (entry, real) and cwd != entry and real != os.path.realpath(cwd) \
                and not any(_overlap(h, p) for h in hidden for p in (entry, real)):
            paths.append(entry)
            if real != entry:  # a link (or a path through one) is rebuilt as a link: its target too
                paths.append(real)
    for name in ("eclip", "kernels"):
        paths += importlib.util.find_spec(name).submodule_search_locations
    for path in pretrained_weights():  # a linked model folder: its target too
        real = os.path.realpath(path)
        paths += [path] + ([real] if real not in (path, "/") else [])
    return sorted(set(paths))


def _hidden_forms(hide) -> list[str]:
    """Each ``hide`` path as given and as its real path (a link to the cache hides both)."""
    return sorted({form for h in hide for form in (os.path.abspath(h), os.path.realpath(h))})


def _overlap(a: str, b: str) -> bool:
    """One of the two paths lies within the other (or they are the same)."""
    return _under(a, b) or _under(b, a)


def pretrained_weights() -> list[str]:
    """The downloaded models a recipe's pretrained tower may load: each ``models--*``
    folder of the Hugging Face hub cache (not its ``datasets--*``, which may hold the very
    data scored) and torch hub's checkpoints."""
    home = os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface"))
    hub = os.path.expanduser(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))
    torch_home = os.path.expanduser(os.environ.get("TORCH_HOME", "~/.cache/torch"))
    paths = sorted(glob.glob(os.path.join(glob.escape(hub), "models--*")))
    return paths + [p for p in [os.path.join(torch_home, "hub", "checkpoints")] if os.path.isdir(p)]


def command(cmd: list[str], ro: list = (), rw: list = (), hide: list = ()) -> list[str]:
    """``cmd`` wrapped to run in a sandbox that sees ``ro`` read-only, ``rw`` writable, and
    must not see ``hide``."""
    out = [sys.executable, "-m", "eclip.sandbox"]
    for flag, paths in (("--ro", ro), ("--rw", rw), ("--hide", hide)):
        for p in paths:
            out += [flag, os.path.abspath(p)]
    return out + ["--", *cmd]


def probe(timeout: float = 30.0) -> str | None:
    """None when this machine can build the sandbox (tried for real: a Python started in
    one); else why not, in one line."""
    if sys.platform != "linux":
        return f"needs Linux namespaces (this is {sys.platform})"
    try:
        done = subprocess.run(command([sys.executable, "-c", "pass"]), capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the probe failed: {e}"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1].removeprefix("sandbox: error: ") if lines else f"the probe exited with code {done.returncode}"


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _new_user_namespace(flags: int, as_root: bool, what: str, hint: str = "") -> None:
    """Unshare a user namespace (and the others in ``flags``) and map this process's uid and
    gid into it: as 0 (``as_root``) or as themselves. ``what`` and ``hint``: the error's
    words before and after the reason, when the unshare is refused."""
    uid, gid = os.getuid(), os.getgid()
    if libc().unshare(CLONE_NEWUSER | flags) != 0:
        raise SandboxError(f"unshare ({what}): {os.strerror(ctypes.get_errno())}{hint}")
    try:
        _write("/proc/self/setgroups", "deny")  # required before an unprivileged gid_map
        _write("/proc/self/uid_map", f"{0 if as_root else uid} {uid} 1")
        _write("/proc/self/gid_map", f"{0 if as_root else gid} {gid} 1")
    except OSError as e:
        raise SandboxError(f"user namespace id maps: {e.strerror}") from None


def _exit_code(status: int) -> int:
    """A wait status as an exit code: the code, or 128 + N for signal N."""
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _enter_namespaces() -> None:
    """User, PID, network and IPC namespaces for this process's children; the mount
    namespace is PID 1's own (``_init``), so that this process, outside it, can remove
    the new root's mount point from the real ``/tmp`` once PID 1 has ended."""
    _new_user_namespace(CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC, True, "user namespaces",
                        "; this machine does not allow unprivileged user namespaces (a container's seccomp "
                        "profile, or kernel.unprivileged_userns_clone=0)")


def _place(root: str, path: str) -> str:
    """The mount point for ``path`` inside ``root``: a folder or an empty file like it."""
    target = root + path
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "w").close()
    return target


def _bind(root: str, path: str, readonly: bool) -> None:
    if os.path.islink(path):  # /lib -> usr/lib: the same link, its target bound on its own
        target = root + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(os.readlink(path), target)
        return
    if not os.path.exists(path):
        raise SandboxError(f"{path}: no such file or folder to give the sandbox")
    target = _place(root, path)
    mount(path, target, None, MS_BIND | MS_REC, f"bind {path}")
    if readonly:  # the bind and every mount under it (MS_REC brought /sys/fs/cgroup's, say, writable)
        for point in [target, *submounts(target)]:
            _remount_readonly(point, path)


def _remount_readonly(point: str, path: str) -> None:
    kept = 0
    f_flag = os.statvfs(point).f_flag
    for bit, flag in KEEP_FLAGS.items():
        if f_flag & bit:
            kept |= flag
    mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept, f"read-only {path}")


def submounts(target: str) -> list[str]:
    """The mount points strictly under ``target`` in this mount namespace, outermost first."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = line.split()[4]
            for code in ("\\040", "\\011", "\\012", "\\134"):  # mountinfo's escapes
                point = point.replace(code, chr(int(code[1:], 8)))
            if point != target and _under(point, target):
                points.append(point)
    return sorted(set(points), key=len)


def _pivot(root: str) -> None:
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise SandboxError(f"pivot_root: unknown system call number on {platform.machine()}")
    old = os.path.join(root, ".old")
    os.mkdir(old)
    _check(libc().syscall(ctypes.c_long(number), os.fsencode(root), os.fsencode(old)), "pivot_root")
    os.chdir("/")
    _check(libc().umount2(b"/.old", MNT_DETACH), "detach the old root")
    os.rmdir("/.old")


def build_root(root: str, ro: list[str], rw: list[str], cwd: str = "/") -> None:
    """Replace this process's file system view with the sandbox's, built on the empty
    folder ``root`` (see the module docstring), with the folder ``cwd`` in it (empty but
    for what was bound under it)."""
    _check(libc().unshare(CLONE_NEWNS), "unshare (mount namespace)")
    mount(None, "/", None, MS_REC | MS_PRIVATE, "make mounts private")  # nothing propagates out
    mount("tmpfs", root, "tmpfs", MS_NOSUID, "tmpfs for the new root")
    # private scratch first, so that a file given from the real /tmp is bound on top of it
    for path in PRIVATE_TMP:
        os.makedirs(root + path, exist_ok=True)
        mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, f"tmpfs for {path}")
        os.chmod(root + path, 0o1777)
    # the longest paths last: a folder given inside a bound one is mounted over it
    for path, readonly in sorted([(p, True) for p in ro] + [(p, False) for p in rw], key=lambda t: len(t[0])):
        _bind(root, path, readonly)
    os.makedirs(root + "/dev", exist_ok=True)
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID, "tmpfs for /dev")
    os.makedirs(root + "/dev/shm")
    mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "tmpfs for /dev/shm")
    os.chmod(root + "/dev/shm", 0o1777)
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            _bind(root, "/dev/" + name, False)
    for pattern in GPU_DEVICES:
        for path in sorted(glob.glob(pattern)):
            _bind(root, path, False)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    if os.path.isdir("/sys"):
        _bind(root, "/sys", True)
    os.makedirs(root + "/proc", exist_ok=True)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "a /proc of the new PID namespace")
    # the machine's settings in it read-only: the namespace's root maps to the caller's user,
    # which may be the real root, whose file permissions let it write /proc/sys; once locked
    # (lock_mounts), these also keep the command from mounting a /proc of its own
    for name in PROC_READONLY:
        point = f"{root}/proc/{name}"
        if os.path.exists(point):
            mount(point, point, None, MS_BIND, f"bind /proc/{name}")
            _remount_readonly(point, f"/proc/{name}")
    try:
        os.makedirs(root + cwd, exist_ok=True)
    except OSError:  # inside a read-only folder given: the command starts in /
        pass
    _pivot(root)


def _init(cmd: list[str], root: str, ro: list[str], rw: list[str], hide: list[str], cwd: str, errors: int) -> int:
    """PID 1 of the new namespaces: build the view, start ``cmd``, wait for it. ``errors``:
    the pipe a failure to build goes back on, closed before the command starts (which
    could otherwise write its own "error" there through ``/proc/1/fd``)."""
    libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the namespace ends with the process outside it
    os.setpgid(0, 0)  # out of the caller's process group: its Ctrl-C comes once, from the outer process
    build_root(root, ro, rw, cwd)
    seen = [p for p in hide if os.path.lexists(p)]
    if seen:
        raise SandboxError(f"{seen[0]} is visible inside the sandbox (it lies under a folder given to it); "
                           "move it out of the folders the sandbox binds")
    os.close(errors)
    child = os.fork()
    if child == 0:  # pragma: no cover - the command's process
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            # A session of its own, no terminal: a process that shares the caller's terminal
            # could push keystrokes into the shell that started the harness (TIOCSTI). Ctrl-C
            # therefore reaches it through the two processes above it, which pass it on.
            os.setsid()
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            lock_mounts()
            os.chdir(cwd if os.path.isdir(cwd) else "/")
            os.execvp(cmd[0], cmd)
        except OSError as e:
            print(f"sandbox: error: {cmd[0]}: {e.strerror}", file=sys.stderr, flush=True)
        except SandboxError as e:
            print(f"sandbox: error: {e}", file=sys.stderr, flush=True)
        finally:  # a forked copy never returns into its parent's code, whatever was raised
            os._exit(127)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: os.kill(child, signum))
    while True:  # reap every orphan the namespace hands to PID 1, until the command ends
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        except InterruptedError:  # pragma: no cover - retried by Python itself since PEP 475
            continue
        if pid == child:
            return _exit_code(status)


def lock_mounts() -> None:
    """Enter a user namespace nested in the sandbox's, with a copy of its mounts: the kernel
    locks the mounts a less privileged namespace inherits (flags such as read-only kept, each
    mount fixed to its place), so the command, root of the nested namespace, can neither
    remount a read-only bind writable nor unmount one; it has no privilege in the sandbox's
    own namespaces, whose mounts PID 1 made and could change."""
    _new_user_namespace(CLONE_NEWNS, False, "the command's nested user namespace")


def check_sources(paths: list[str], hide: list[str]) -> None:
    """Refuse a path to bind whose real path (its links followed, as the bind follows them)
    lies under a ``hide`` path: a link made by an earlier sandboxed process (a folder of a
    run directory pointed at the cache) would otherwise bind what must stay hidden."""
    real_hide = [os.path.realpath(h) for h in hide]
    for path in paths:
        real = os.path.realpath(path)
        for h, real_h in zip(hide, real_hide, strict=True):
            if _under(real, real_h):
                raise SandboxError(f"{path}: leads to {real}, under {h}, which the sandbox must not show")


def check_binds(paths: list[str], hide: list[str]) -> None:
    """Refuse to bind a folder whose real path holds a ``hide`` path (as given or as its real
    path), or lies inside one: the check inside the sandbox looks for the hidden path where
    it lies, and a bind reached through a link (a linked ``HF_HOME``, a prefix) shows it
    under another name."""
    forms = [(h, form) for h in hide for form in _hidden_forms([h])]
    for path in paths:
        real = os.path.realpath(path)
        for h, form in forms:
            if _under(form, real) or _under(form, os.path.abspath(path)):
                raise SandboxError(f"{h} is visible inside the sandbox (it lies under {path}, a folder given to "
                                   "it); move it out of the folders the sandbox binds")
            if _under(real, form):
                raise SandboxError(f"{path}, a folder given to the sandbox, lies inside {h}, which it must not "
                                   "show; move it out")


def hidden_problem(hide: list[str]) -> str | None:
    """Why a sandbox of this process's defaults would show one of ``hide`` (None when it
    would not): asked before many runs, so that a cache under a folder every sandbox binds is
    one refusal, not one failed run after another."""
    try:
        check_binds(default_ro(hide), hide)
    except SandboxError as e:
        return str(e)
    return None


def run(cmd: list[str], ro: list[str], rw: list[str], hide: list[str]) -> int:
    """This process enters the namespaces; its child (PID 1 inside) runs ``_init``."""
    cwd = os.getcwd()
    if any(_under(os.path.realpath(cwd), os.path.realpath(h)) for h in hide):
        cwd = "/"  # the working folder is made inside: within a hidden one, it would make its path seen
    check_sources([*ro, *rw], hide)
    ro = [*default_ro(hide), *ro]
    check_binds([*ro, *rw], hide)
    root = tempfile.mkdtemp(prefix="eclip-sandbox-")  # empty here; PID 1 mounts the new root on it
    try:
        return _run(cmd, root, ro, rw, hide, cwd)
    finally:
        try:
            os.rmdir(root)
        except OSError:
            pass


def _run(cmd: list[str], root: str, ro: list[str], rw: list[str], hide: list[str], cwd: str) -> int:
    _enter_namespaces()
    r, w = os.pipe()  # PID 1's one-line error, if it cannot build the sandbox
    init = os.fork()
    if init == 0:  # pragma: no cover - runs as PID 1 of the new PID namespace
        os.close(r)
        code = 2
        try:
            code = _init(cmd, root, ro, rw, hide, cwd, w)
        except (SandboxError, OSError) as e:
            os.write(w, str(e).encode()[:4000])
        finally:  # a forked copy never returns into its parent's code (a Ctrl-C while it builds)
            os._exit(code)
    os.close(w)
    # Ctrl-C (the process group's) and SIGTERM go on to PID 1, which passes them to the
    # command, in a session of its own; the two wait for its code
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: os.kill(init, signum))
    _, status = os.waitpid(init, 0)
    why = os.read(r, 4096).decode(errors="replace")
    if why:
        raise SandboxError(why)
    return _exit_code(status)


def build_parser() -> argparse.ArgumentParser:
    from eclip.errors import OneLineParser

    p = OneLineParser(prog="python -m eclip.sandbox", description=__doc__.split("\n\n")[0])
    p.add_argument("--ro", action="append", default=[], help="a file or folder the command may read")
    p.add_argument("--rw", action="append", default=[], help="a file or folder the command may write")
    p.add_argument("--hide", action="append", default=[],
                   help="a path that must not be visible inside (checked; exit 2 if it is)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("sandbox: error: no command given (after --)", file=sys.stderr)
        return 2
    try:
        return run(cmd, [os.path.abspath(p) for p in args.ro], [os.path.abspath(p) for p in args.rw],
                   [os.path.abspath(p) for p in args.hide])
    except SandboxError as e:
        print(f"sandbox: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
