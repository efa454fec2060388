"""A run's log (``experiments/<n>/run.log``): secrets kept out of it, and its size bounded.

The harness's stdout and stderr reach the loop through a pipe, and ``LogCopier`` writes
them to the log as they come (``tail -f`` follows a run), with the values of the loop's
secret-looking environment variables replaced by ``[redacted]`` on the way. A study runs
for hours, unattended, and a recipe that prints without measure (a tensor each step, a
debugging line in a tight loop) would otherwise fill the disk that every later run needs:
the log keeps the first ``LOG_HEAD_BYTES`` and the last ``LOG_TAIL_BYTES`` of what a run
printed, and one line between them says how much was dropped. The tail is what the journal
and the proposer see (``log_tail``), so a failure's traceback survives the cut.

A run's code may also write to the log's path itself (its folder is the training process's
output folder); ``redact_file`` cleans the file once more when the run has ended. Neither
bounds what a run writes elsewhere in its folder: the loop's disk checks
(``agent.disk``) stop a study that meets a full disk.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
from pathlib import Path

from eclip.fileio import atomic_write, map_json, open_regular, remove, tail_lines
from eclip.process import SECRET

LOG_HEAD_BYTES = 32 << 20  # a run's log keeps the first 32 MiB it printed ...
LOG_TAIL_BYTES = 1 << 20  # ... and the last 1 MiB, its end (a traceback), the middle dropped
READ_BYTES = 1 << 16  # the most the copier reads from the pipe at once
DRAIN_S = 2.0  # once the harness has ended: how long its output is still read (a process it left may hold the pipe)
REDACT_CHUNK = 1 << 20  # bytes ``redact_file`` holds at a time


def secret_values() -> list[str]:
    """Values of this process's secret-looking environment variables (8 characters or more)."""
    return [v for k, v in os.environ.items() if SECRET.search(k) and len(v) >= 8]


def redact(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every secret value replaced by ``[redacted]``; ``secrets``: the values,
    longest first (default: read from the environment now)."""
    for value in sorted(secret_values(), key=len, reverse=True) if secrets is None else secrets:
        text = text.replace(value, "[redacted]")  # longest first: one may begin another
    return text


def map_strings(value, fn):
    """``value`` (JSON-like: dicts, lists, strings) with ``fn`` applied to every string in
    it, keys included; tuples become lists, other values stay as they are."""
    return map_json(value, lambda leaf: fn(leaf) if isinstance(leaf, str) else leaf)


def redact_value(value):
    """``value`` (JSON-like) with every secret value replaced in each string in it, keys
    included: what the loop journals or saves may hold what a model echoed."""
    secrets = sorted(secret_values(), key=len, reverse=True)  # read once, not at every string
    return map_strings(value, lambda text: redact(text, secrets)) if secrets else value


class Scrubber:
    """Replaces the secrets' bytes in a stream fed in pieces: ``feed`` returns what is clean
    so far, holding back an end that may begin a secret the next piece goes on with;
    ``end`` returns what was held back. ``found``: whether a secret was replaced."""

    def __init__(self):
        # as the bytes a run would print (an environment value may hold bytes that are not UTF-8)
        values = sorted({os.fsencode(v) for v in secret_values()}, key=len, reverse=True)
        # at each place the longest first: a secret may begin another
        self.pattern = re.compile(b"|".join(map(re.escape, values))) if values else None
        self.values = values
        self.keep = len(values[0]) - 1 if values else 0  # a secret this close to a piece's end may go on
        self.carry, self.found = b"", False

    def feed(self, chunk: bytes, final: bool = False) -> bytes:
        data = self.carry + chunk
        if self.pattern is None:
            self.carry = b""
            return data
        limit = len(data) if final else len(data) - self.keep  # a match from here on may be cut
        if not any(v in data for v in self.values):  # the common case, at memchr speed (the regex: 10x slower)
            cut = max(0, limit)
            self.carry = data[cut:]
            return data[:cut]
        parts, pos = [], 0
        for match in self.pattern.finditer(data):
            if match.start() >= limit:
                break
            parts += [data[pos:match.start()], b"[redacted]"]
            pos, self.found = match.end(), True
        cut = max(pos, limit)
        self.carry = data[cut:]
        return b"".join(parts) + data[pos:cut]

    def end(self) -> bytes:
        return self.feed(b"", final=True)


def redact_file(path: Path) -> None:
    """Rewrite ``path`` without secret values, if it holds any (a run printed one): read in
    pieces of ``REDACT_CHUNK`` bytes, so a log of gigabytes is never held whole, its other
    bytes unchanged."""
    if not secret_values():
        return

    def scrub(source, sink=None) -> bool:
        """Copy ``source`` cleaned into ``sink`` (None: only look); whether it held a secret."""
        scrubber = Scrubber()
        while chunk := source.read(REDACT_CHUNK):
            clean = scrubber.feed(chunk)
            if sink is not None:
                sink.write(clean)
        clean = scrubber.end()
        if sink is not None:
            sink.write(clean)
        return scrubber.found

    def rewrite(tmp: Path) -> None:
        with open_regular(path) as source, open(tmp, "wb") as sink:
            scrub(source, sink)

    try:  # never through a link, nor from a FIFO: the run could write where its log lies
        with open_regular(path) as f:
            if not scrub(f):
                return
    except FileNotFoundError:
        return
    except OSError:  # not a regular file: no log of this harness's to clean (or to show)
        remove(path)
        return
    atomic_write(path, rewrite)


def log_tail(path: Path, lines: int = 30) -> str:
    """A run log's last ``lines`` lines, without secrets (from its last 64 KB)."""
    try:
        return redact("\n".join(tail_lines(path, lines)))
    except FileNotFoundError:
        return ""
    except OSError:  # a link or a FIFO the run left in its place
        return f"(no log: {path.name} is not a regular file)"


class LogCopier:
    """Copies a run's output from the pipe ``fd`` into the log file ``sink`` (binary, each
    piece flushed) in a thread of its own, cleaned of secrets and cut to ``LOG_HEAD_BYTES``
    plus ``LOG_TAIL_BYTES``. ``finish()``, once the harness has ended, reads what is left
    (for ``DRAIN_S`` at most), writes the tail and closes ``fd``."""

    def __init__(self, fd: int, sink):
        self.fd, self.sink, self.scrubber = fd, sink, Scrubber()
        self.head_left = LOG_HEAD_BYTES  # room left in the log's head
        self.tail = bytearray()  # past the head: the last bytes, at most 2 × LOG_TAIL_BYTES between trims
        self.dropped = 0  # bytes past the head that the tail no longer holds
        self.past_head = False  # whether the run printed more than the head holds
        self.broken = False  # a write to the log failed (a full disk): the output is read on, and dropped
        self.stop = threading.Event()
        self.done = threading.Event()  # set by the thread as it ends, its fd closed
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()

    def _out(self, data: bytes) -> None:
        if not self.broken:
            try:
                self.sink.write(data)
                self.sink.flush()  # as it comes: ``tail -f`` follows the run
            except OSError:  # never stop reading: the harness would block on a full pipe
                self.broken = True

    def _write(self, data: bytes) -> None:
        if self.head_left > 0:
            head = data[:self.head_left]
            self._out(head)
            self.head_left -= len(head)
            data = data[len(head):]
        if data and not self.past_head:
            self.past_head = True
            self._out(f"\n[run.log: the run printed more than {LOG_HEAD_BYTES >> 20} MiB; what follows "
                      "is held back, and its last part is written when the run ends]\n".encode())
        if data:
            self.tail += data
            if len(self.tail) > 2 * LOG_TAIL_BYTES:  # trimmed now and then, not at every piece
                self.dropped += len(self.tail) - LOG_TAIL_BYTES
                del self.tail[:-LOG_TAIL_BYTES]

    def _copy(self) -> None:
        try:
            self._pump()
        finally:  # the thread alone closes the fd: closed under it, the number could be another file's
            os.close(self.fd)
            self.done.set()

    def _pump(self) -> None:
        drain_until = None
        while True:
            if self.stop.is_set() and drain_until is None:
                drain_until = time.monotonic() + DRAIN_S
            wait = 0.25 if drain_until is None else max(0.0, drain_until - time.monotonic())
            if not select.select([self.fd], [], [], wait)[0]:
                if drain_until is not None:
                    break  # nothing more came in time (or the time is up)
                continue
            chunk = os.read(self.fd, READ_BYTES)
            if not chunk:  # every writer has closed the pipe
                break
            self._write(self.scrubber.feed(chunk))
            if drain_until is not None and time.monotonic() >= drain_until:
                break  # a process left behind that prints on: no more of it
        self._write(self.scrubber.end())
        if self.tail:
            self.dropped += max(0, len(self.tail) - LOG_TAIL_BYTES)
            del self.tail[:-LOG_TAIL_BYTES]
            self._out(f"[run.log: {self.dropped} bytes dropped here; the last {len(self.tail)} follow]\n".encode()
                      + bytes(self.tail))

    def finish(self) -> None:
        """Stop reading once the harness has ended (at most ``DRAIN_S`` more), write the
        tail; the fd is closed then (a process left behind that still writes gets EPIPE).
        A Ctrl-C meanwhile is raised once the copier is done: the log file must outlive it."""
        self.stop.set()
        interrupted = False
        while not self.done.is_set():
            try:
                self.done.wait(0.1)
            except KeyboardInterrupt:
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt
