"""Log lines written by a thread of their own, never by the event loop.

A log line is a write(2) to stderr or a file. When nobody reads that stderr (a terminal paused
with Ctrl-S, a pty or pipe whose reader is busy, a stalled log collector) the write blocks, and
if the event loop made it, every relay, tunnel and timer in the process stopped with it: a
burst of sessions against a full pty froze `portfwd ssh` for ten seconds (seen by
`/proc/PID/stack`: `n_tty_write`). Here the loop only formats the record's message and puts it
on a queue; a writer thread does the rest. The standard library's QueueHandler/QueueListener,
with three changes: the queue is bounded and a full one drops the line and counts it (said in
one line once the writer catches up) instead of growing without end; an exception's traceback
is formatted by the target's formatter in the logging thread (escaped, as TextFormatter does);
and the writer is started again in a child after fork (`portfwd ssh -f`). `flush()` waits, a
bounded time, for the lines queued so far: before an error line is printed, and at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import logging.handlers
import os
import queue
import threading
import time

#: Lines that may wait for the writer; past this the newest are dropped and counted.
QUEUE_LINES = 20_000
#: How long `flush()` waits for the writer (a reader that never reads must not hang exit).
FLUSH_WAIT = 5.0


class _Enqueue(logging.handlers.QueueHandler):
    """Puts records on a bounded queue; a full queue drops the record and counts it."""

    def __init__(self, lines: queue.Queue[logging.LogRecord], target: logging.Handler) -> None:
        super().__init__(lines)
        self.target = target
        self.dropped = 0
        self._lock_dropped = threading.Lock()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message with its arguments merged (they may be objects that change later), the
        # traceback as text (its frames are not kept alive); everything else stays for the
        # target's formatter, the event fields included.
        prepared = copy.copy(record)
        prepared.msg = record.getMessage()
        prepared.args = None
        if record.exc_info:
            formatter = self.target.formatter or logging.Formatter()
            prepared.exc_text = formatter.formatException(record.exc_info)
            prepared.exc_info = None
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._lock_dropped:
                self.dropped += 1


class _Writer(logging.handlers.QueueListener):
    """Writes queued records to the target handler; says how many were dropped, once caught up."""

    def __init__(
        self, lines: queue.Queue[logging.LogRecord], target: logging.Handler, front: _Enqueue
    ) -> None:
        super().__init__(lines, target, respect_handler_level=False)
        self.front = front
        self.lines = lines
        self.target = target

    def handle(self, record: logging.LogRecord) -> None:
        stream = getattr(self.target, "stream", None)
        if stream is not None and getattr(stream, "closed", False):
            return  # its stream is gone (a test's captured stderr): nowhere to write
        super().handle(record)
        front = self.front
        if front.dropped and self.lines.empty():
            with front._lock_dropped:
                dropped, front.dropped = front.dropped, 0
            note = logging.LogRecord(
                "portfwd", logging.WARNING, __file__, 0,
                "%d log line(s) dropped: the log output was not read fast enough", (dropped,), None,
            )  # fmt: skip
            super().handle(note)


class LogWriter:
    """The queue, its handler for the root logger, and the writer thread."""

    def __init__(self, target: logging.Handler) -> None:
        self.lines: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_LINES)
        self.handler = _Enqueue(self.lines, target)
        self.target = target
        self._writer: _Writer | None = None

    def start(self) -> None:
        self._writer = _Writer(self.lines, self.target, self.handler)
        self._writer.start()

    def flush(self, wait: float = FLUSH_WAIT) -> None:
        """Wait (at most `wait` seconds) until every line queued so far is written."""
        deadline = time.monotonic() + wait
        while self.lines.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)  # waiting for another thread's writes, bounded by the deadline

    def stop(self) -> None:
        """Write what is queued (bounded) and end the writer thread."""
        self.flush()
        writer, self._writer = self._writer, None
        if writer is not None and not self.lines.unfinished_tasks:
            writer.stop()
        with contextlib.suppress(OSError, ValueError):  # its stream may be gone (closed, a test's)
            self.target.flush()

    def _after_fork(self) -> None:
        self._writer = None  # the thread did not come along
        self.start()


_current: LogWriter | None = None


def install(target: logging.Handler) -> logging.Handler:
    """Start the writer for `target` and return the handler the root logger gets instead."""
    global _current
    if _current is not None:
        _current.stop()
    writer = LogWriter(target)
    writer.start()
    if _current is None:
        atexit.register(_at_exit)
        os.register_at_fork(after_in_child=_in_child)
    _current = writer
    return writer.handler


def flush() -> None:
    """Write every queued line now (bounded): before a line printed outside the log."""
    if _current is not None:
        _current.flush()


def _at_exit() -> None:
    if _current is not None:
        _current.stop()


def _in_child() -> None:
    if _current is not None:
        _current._after_fork()
