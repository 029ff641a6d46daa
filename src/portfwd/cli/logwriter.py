"""Log lines written by a thread of their own, in batches, never by the event loop.

A log line is a write(2) to stderr or a file. When nobody reads that stderr (a terminal paused
with Ctrl-S, a pty or pipe whose reader is busy, a stalled log collector) the write blocks, and
if the event loop made it, every relay, tunnel and timer in the process stopped with it: a
burst of sessions against a full pty froze `portfwd ssh` for ten seconds (seen by
`/proc/PID/stack`: `n_tty_write`).

So the loop only formats a record (the formatter it always had) and appends the text to a
deque; a writer thread, woken by the first line after it went idle, waits `INTERVAL` for more
and writes what gathered, in writes of whole lines of at most PIPE_BUF bytes (`workers` share
one stderr: `write_whole_lines`). Not the standard library's QueueHandler/QueueListener: it
wakes its thread for every record, and those GIL hand-offs cost a relayed connection four times
its CPU with two lines a connection (`bench/logcost.py`); batching costs less than writing each
line where it was logged. A process with nothing to log does not wake its writer at all (it
used to, every `INTERVAL`: 50 futex time-outs a second in an idle `portfwd run`). The deque is
bounded: past `LINES` waiting, new lines are dropped and counted, and one line says how many
once the writer catches up. `flush()` waits, a bounded time, for what was logged so far: before
an error line is printed, at a `map` command's quick exit, and at exit. After a fork (`portfwd
ssh -f`) the child starts its own writer.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

#: Lines that may wait for the writer; past this the newest are dropped and counted.
LINES = 20_000
#: How long the writer lets lines gather after the first (seconds): lines appear about this late.
INTERVAL = 0.02
#: How long `flush()` waits for the writer (a reader that never reads must not hang exit).
FLUSH_WAIT = 5.0


class BatchedHandler(logging.Handler):
    """Formats with `target`'s formatter where a record is logged; a thread writes the text to
    `target`'s stream in batches."""

    def __init__(self, target: logging.StreamHandler[Any]) -> None:
        super().__init__()
        self.target = target
        self.pending: collections.deque[str] = collections.deque()
        self.logged = 0  # lines appended (the logging threads)
        self.written = 0  # lines written or given up (the writer)
        self.dropped = 0
        self._wake = threading.Event()
        # The writer is (about to be) asleep: the next line wakes it. Set by the writer before
        # it looks at `pending`, cleared by the line that wakes it: no line is left unwritten.
        self._idle = False
        self._hurry = False  # flush() waits: write without gathering
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._file: bool | None = None  # the output is a regular file (`_write` asks once)

    # ------------------------------------------------------------------ the logging side
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.target.format(record)
        except Exception:  # noqa: BLE001 - logging's own rule: a bad record is reported, not raised
            self.handleError(record)
            return
        self.put(text)

    def put(self, text: str) -> None:
        """Queue one formatted line (emit's, or a session line made without a record)."""
        if self._thread is None:  # after stop() (exit handlers, teardown): written where logged
            self._write([text])
            return
        if len(self.pending) >= LINES:
            self.dropped += 1
            return
        self.pending.append(text)
        self.logged += 1
        if self._idle:
            self._idle = False
            self._wake.set()

    def put_many(self, lines: list[str]) -> None:
        """Queue formatted lines (the C engine's session lines, relay/native.py), as `put` each."""
        if self._thread is None:
            self._write(lines)
            return
        room = LINES - len(self.pending)
        if room < len(lines):
            self.dropped += len(lines) - max(room, 0)
            lines = lines[: max(room, 0)]
        self.pending.extend(lines)
        self.logged += len(lines)
        if self._idle:
            self._idle = False
            self._wake.set()

    def flush(self, wait: float = FLUSH_WAIT) -> None:
        """Wait (at most `wait` seconds) until every line logged so far is written."""
        goal = self.logged
        self._hurry = True
        self._wake.set()
        deadline = time.monotonic() + wait
        while self.written < goal and time.monotonic() < deadline and self._alive():
            time.sleep(0.002)  # waiting for the writer thread, bounded by the deadline

    # ------------------------------------------------------------------ the writer
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="portfwd log writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what waits (bounded) and end the writer."""
        self.flush()
        self._stopping = True
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and self.written >= self.logged:
            thread.join(1.0)

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self._idle = True
            if not self.pending and not self._stopping and not self._hurry:
                self._wake.wait()  # until a line comes (put), or flush() or stop()
            self._idle = False
            self._wake.clear()
            if not self._stopping and not self._hurry:
                time.sleep(INTERVAL)  # let a batch gather: one write for many lines
            self._hurry = False
            self._write_batch()
            if self._stopping and not self.pending:
                return

    def _write_batch(self) -> None:
        lines: list[str] = []
        pending = self.pending
        while pending:
            lines.append(pending.popleft())
        taken = len(lines)
        if self.dropped and not pending:
            dropped, self.dropped = self.dropped, 0
            note = logging.LogRecord(
                "portfwd", logging.WARNING, __file__, 0,
                "%d log line(s) dropped: the log output was not read fast enough", (dropped,), None,
            )  # fmt: skip
            with contextlib.suppress(Exception):
                lines.append(self.target.format(note))
        if lines:
            self._write(lines)
        self.written += taken

    def _write(self, lines: list[str]) -> None:
        stream: IO[str] | None = getattr(self.target, "stream", None)
        if stream is None or getattr(stream, "closed", False):
            return
        text = self.target.terminator.join(lines) + self.target.terminator
        with contextlib.suppress(OSError, ValueError):  # a reader that went away: nothing to do
            try:
                fd = stream.fileno()
            except (OSError, ValueError):  # no descriptor (a StringIO): its own write is whole
                stream.write(text)
                stream.flush()
                return
            stream.flush()  # what went through the stream itself (a print) comes first
            # Never a batch lost to one character the encoding lacks (a file's "strict").
            data = text.encode(getattr(stream, "encoding", None) or "utf-8", "backslashreplace")
            if self._file is None:
                self._file = stat.S_ISREG(os.fstat(fd).st_mode)
            write_whole_lines(fd, data, len(data) if self._file else select.PIPE_BUF)


def write_whole_lines(fd: int, data: bytes, limit: int = select.PIPE_BUF) -> None:
    """Write `data` (whole lines) to `fd`, one write(2) per `pieces()` piece of at most `limit`
    bytes: `workers = N` gives N processes one stderr, and a pipe (or socket) keeps a write in
    one piece among other processes' writes only up to PIPE_BUF. One buffered write of a batch
    was cut wherever the pipe had room, and a reader saw half a line of one process run into
    another's. A regular file (`-E`, a redirect) takes each write whole under its inode's lock:
    there the caller gives the whole batch as `limit`, one write."""
    view = memoryview(data)
    for start, stop in pieces(data, limit):
        while start < stop:
            try:
                start += os.write(fd, view[start:stop])
            except BlockingIOError:  # a descriptor someone made non-blocking: wait, as a write would
                waiter = select.poll()
                waiter.register(fd, select.POLLOUT)
                waiter.poll()


def pieces(data: bytes, limit: int = select.PIPE_BUF) -> Iterator[tuple[int, int]]:
    """Cut `data` into (start, stop) spans of whole lines of at most `limit` bytes each; a line
    longer than `limit` is a span of its own (and the end of `data`, if it is no whole line)."""
    start, end = 0, len(data)
    while start < end:
        stop = end
        if end - start > limit:
            cut = data.rfind(b"\n", start, start + limit)
            if cut < 0:  # one line longer than `limit`: alone
                cut = data.find(b"\n", start + limit)
            stop = end if cut < 0 else cut + 1
        yield start, stop
        start = stop


_current: BatchedHandler | None = None


def install(target: logging.StreamHandler[Any]) -> BatchedHandler:
    """Start the writer for `target` and return the handler the root logger gets instead."""
    global _current
    if _current is not None:
        _current.stop()
    else:
        atexit.register(_at_exit)
        os.register_at_fork(after_in_child=_in_child)
    _current = BatchedHandler(target)
    _current.start()
    return _current


def flush() -> None:
    """Write every line logged so far (bounded): before a line printed outside the log."""
    if _current is not None:
        _current.flush()


def _at_exit() -> None:
    if _current is not None:
        _current.stop()


def _in_child() -> None:
    """After fork: the parent's writer writes what was pending (a child writing it too would
    double it); the child starts clean, with a writer and an Event of its own."""
    writer = _current
    if writer is not None:
        writer.pending.clear()
        writer.written = writer.logged
        writer.dropped = 0
        writer._wake = threading.Event()
        writer._thread = None  # the thread did not come along
        writer.start()
