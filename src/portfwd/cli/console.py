"""What reaches the terminal from every command: log set-up and the one-line error report.

Used by `cli/__init__.py` (the error boundary), `commands.py` and `maps.py`, so every command
formats logs and failures identically. Only the standard library's small modules here:
`portfwd map add` loads this module and should start fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from portfwd.errors import ConfigError, PortfwdError, UsageError
from portfwd.logevents import RESERVED, record_event
from portfwd.printable import printable

if TYPE_CHECKING:
    from portfwd.cli.logwriter import BatchedHandler
    from portfwd.counters import Session

#: What a dependency may warn about without a user seeing it: deprecations (cryptography's
#: CryptographyDeprecationWarning is a UserWarning) are for their authors and for ours, who meet
#: them in the test suite, where pyproject.toml names each one.
QUIET_CATEGORIES: tuple[type[Warning], ...] = (
    DeprecationWarning,
    PendingDeprecationWarning,
    FutureWarning,
    UserWarning,
)
#: Every module but portfwd's own: a warning is attributed to the module its `stacklevel` names,
#: so cryptography's warning about a type asyncssh imports is asyncssh's.
NOT_OURS = r"(?!portfwd(\.|$))"


def quiet_dependencies() -> None:
    """Keep dependencies' warnings off the user's terminal, unless the user asked for them.

    Called first thing by `main`, before any command imports a dependency. Filters
    by category and by module (everything but `portfwd.*`), so portfwd's own warnings, and
    anything the user turns on with `python -W` or PYTHONWARNINGS, still show.
    """
    if sys.warnoptions:
        return
    for category in QUIET_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=NOT_OURS)


class Flood(logging.Filter):
    """Rate limit for warnings and errors an attacker can repeat (denied channels, bad SOCKS clients).

    Records with the same logger, level and message template share a budget of `burst` lines
    per `window` seconds; past it they are counted, not written, and when the window ends one
    line says how many were left out, so a flood cannot fill the disk or bury what matters.
    Lines below WARNING (sessions opening and closing) are never held back.
    """

    def __init__(self, burst: int = 10, window: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, object], list[Any]] = {}  # key -> [start, count, held, last]
        self.handler: logging.Handler | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "summary", False):
            return True
        key = (record.name, record.levelno, record.msg)
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or now - seen[0] >= self.window:
                self._seen[key] = [now, 1, 0, None]
                return True
            seen[1] += 1
            if seen[1] <= self.burst:
                return True
            seen[2] += 1
            seen[3] = record
            if seen[2] == 1:
                timer = threading.Timer(seen[0] + self.window - now, self._summarise, (key, seen))
                timer.daemon = True
                timer.start()
            return False

    def _summarise(self, key: tuple[str, int, object], seen: list[Any]) -> None:
        # `seen` is the window this timer was set for; a record that arrived after it ended may
        # have opened the next one under the same key, which is left alone.
        with self._lock:
            if self._seen.get(key) is seen:
                del self._seen[key]
            held = seen[2]
        if not held or self.handler is None:
            return
        last: logging.LogRecord = seen[3]
        summary = logging.LogRecord(
            last.name,
            last.levelno,
            last.pathname,
            last.lineno,
            "%s (and %d more like it in the last %g s, not logged)",
            (last.getMessage(), held, self.window),
            None,
        )
        summary.summary = True
        self.handler.handle(summary)


class TextFormatter(logging.Formatter):
    """One line per record for people: whatever came from the network is escaped (printable.py)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        # A traceback keeps its lines; an exception's text (which may quote a peer) is escaped.
        return "\n".join(map(printable, super().formatException(ei).splitlines()))


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for `--log-format json`: `ts`, `level`, `logger`, `event`,
    the event's fields (logevents.py), `msg`, and `exc` when an exception was logged. json.dumps
    escapes whatever came from the network."""

    def format(self, record: logging.LogRecord) -> str:
        import json  # not at the top: one-shot commands start without it

        name, fields = record_event(record)
        line: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": name,
        }
        for key, value in fields.items():
            line[key if key not in RESERVED else f"field_{key}"] = value
        line["msg"] = record.getMessage()
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted already (a record formatted once before)
            line["exc"] = record.exc_text
        return json.dumps(line, default=str)


class _Direct:
    """A session's open and closed lines straight to the batched handler, formatted as the text
    or JSON formatter would format their records (same text, same fields, same order), with no
    LogRecord: those two lines are on every connection's path (bench/RESULTS.md, D22). In text
    each is one f-string made from the session; no field dict is built (D24)."""

    def __init__(self, front: BatchedHandler, json_format: bool) -> None:
        self.front = front
        self.json = json_format
        self._until = 0.0  # the end of the second `_prefix` was made for
        self._prefix = ""
        self._root = logging.getLogger()
        self._loggers: dict[str, logging.Logger] = {}

    def opened(self, logger: str, label: str, session: Session) -> bool:
        handlers: Sequence[object] = self._root.handlers
        if len(handlers) != 1 or handlers[0] is not self.front:  # someone else listens too (tests)
            return False
        if self.json:
            fields = (session.rule.name, session.client, session.target, session.path)
            message = f"{label}: {session.client} -> {session.target} open ({session.path})"
            self._json(logger, "session.open", fields, message)
            return True
        now = time.time()
        if not self._until - 1 <= now < self._until:  # another second (or the clock was set back)
            self._stamp(now)
        line = f"{self._prefix}{label}: {session.client} -> {session.target} open ({session.path})"
        self.front.put(line if line.isprintable() else printable(line))
        return True

    def closed(self, logger: str, label: str, session: Session, reason: str, duration: float) -> bool:
        handlers: Sequence[object] = self._root.handlers
        if len(handlers) != 1 or handlers[0] is not self.front:
            return False
        up, down = session.bytes_up, session.bytes_down
        if self.json:
            fields = (session.rule.name, session.client, session.target, session.path, reason, up, down)
            message = (
                f"{label}: {session.client} -> {session.target} closed ({reason}): "
                f"{up} B up, {down} B down, {duration:.3f}s"
            )
            self._json(logger, "session.closed", (*fields, round(duration, 3)), message)
            return True
        now = time.time()
        if not self._until - 1 <= now < self._until:  # another second (or the clock was set back)
            self._stamp(now)
        line = (
            f"{self._prefix}{label}: {session.client} -> {session.target} closed ({reason}): "
            f"{up} B up, {down} B down, {duration:.3f}s"
        )
        self.front.put(line if line.isprintable() else printable(line))
        return True

    def engine_lines(self, logger: str) -> int:
        handlers: Sequence[object] = self._root.handlers
        if len(handlers) != 1 or handlers[0] is not self.front:
            return 0
        known = self._loggers.get(logger)
        if known is None:  # logging.getLogger takes a lock: once per name
            known = self._loggers[logger] = logging.getLogger(logger)
        if not known.isEnabledFor(logging.INFO):
            return 0
        return 2 if self.json else 1

    def put_lines(self, lines: list[str]) -> None:
        self.front.put_many(lines)

    def _stamp(self, now: float) -> None:
        """The date and time as the text formatter writes them, for the second `now` is in."""
        second = int(now)
        self._until = second + 1
        self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)) + " INFO "

    def _json(self, logger: str, event_name: str, values: tuple[Any, ...], message: str) -> None:
        from portfwd.relay.sessionlog import CLOSED_FIELDS  # loaded already: it called us

        line: dict[str, Any] = {"ts": time.time(), "level": "info", "logger": logger, "event": event_name}
        for key, value in zip(CLOSED_FIELDS, values, strict=False):  # open's are its first four
            line[key if key not in RESERVED else f"field_{key}"] = value
        line["msg"] = message
        self.front.put(json.dumps(line, default=str))


def setup_logging(verbose: int, quiet: bool, log_format: str, log_file: str | None = None) -> None:
    """-q: warnings only; -v: portfwd's debug lines; -vv: every library's too. `log_file` (ssh's
    -E): append there instead of stderr. Raises UsageError when it cannot be opened."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    # Worker processes (`workers = N`) log the same way: they read this from their environment.
    os.environ["PORTFWD_LOG_SETUP"] = json.dumps(
        {"verbose": verbose, "quiet": quiet, "format": log_format, "file": log_file}
    )
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot open the log file {log_file}: {exc.strerror}", field="-E") from exc
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    from portfwd.cli import logwriter  # not at the top: `map add` starts without its thread

    # What no line of ours shows, and each record would otherwise pay for: the caller's file
    # and line (a walk up the stack), the thread, the process id (a getpid() system call) and
    # the multiprocessing name (bench/RESULTS.md, D18).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False

    front = logwriter.install(handler)  # written by a thread: a stalled stderr never stops the loop
    from portfwd.relay import sessionlog

    sessionlog.direct = _Direct(front, log_format == "json")  # this handler is the only one
    flood = Flood()
    flood.handler = front
    front.addFilter(flood)
    root = logging.getLogger()
    root.handlers[:] = [front]
    root.setLevel(level)
    global _LOG_FILE  # the one place that installs the log's handler
    _LOG_FILE = log_file
    logging.getLogger("portfwd").setLevel(logging.DEBUG if verbose and not quiet else logging.NOTSET)
    # asyncssh narrates every channel at INFO; portfwd logs what matters itself.
    logging.getLogger("asyncssh").setLevel(logging.NOTSET if verbose > 1 else logging.WARNING)


#: The file the log goes to (`-E FILE`), once its handler is installed; None: stderr.
_LOG_FILE: str | None = None


def _also_in_log_file(lines: list[str]) -> None:
    """With a log file (`-E FILE`), the line that ends the process goes there too, as ssh -E
    puts it: after `-f` nobody reads stderr."""
    if _LOG_FILE is None:
        return
    for line in lines:
        logging.getLogger("portfwd").error("%s", line)
    writer = sys.modules.get("portfwd.cli.logwriter")
    if writer is not None:
        writer.flush()


def report(exc: BaseException) -> int:
    """Print `exc` as the line(s) a person sees and return the exit code; never a traceback.

    ConfigError prints every problem found; any other PortfwdError its one line; anything else
    is a bug, still shown as one line unless PORTFWD_DEBUG is set.
    """
    writer = sys.modules.get("portfwd.cli.logwriter")
    if writer is not None:
        writer.flush()  # the log lines before it come first
    if isinstance(exc, ConfigError):
        for line in exc.problems:
            print(f"portfwd: {printable(line)}", file=sys.stderr)
        _also_in_log_file(exc.problems)
        return exc.exit_code
    if isinstance(exc, PortfwdError):  # may quote a peer (a server's refusal reason, say)
        print(f"portfwd: {printable(exc.line())}", file=sys.stderr)
        _also_in_log_file([exc.line()])
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if os.environ.get("PORTFWD_DEBUG"):
        import traceback  # only here: it costs a millisecond at every start

        traceback.print_exception(exc)
    line = f"internal error: {type(exc).__name__}: {printable(str(exc))} (set PORTFWD_DEBUG=1 for details)"
    print(f"portfwd: {line}", file=sys.stderr)
    _also_in_log_file([line])  # after -f, nobody reads stderr
    return 1
