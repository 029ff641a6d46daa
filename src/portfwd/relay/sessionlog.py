"""The lines a session is logged with, by every relay path (splice, protocol, UDP, SSH).

Each is an event (logevents.py) with the same fields in both log formats: `session.open`,
`session.closed` (rule, client, target, path, reason, bytes_up, bytes_down, duration_s),
`session.denied` and `session.failed`. Opening and closing are on the hot path: nothing is
built unless INFO is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from portfwd.logevents import JsonValue, event
from portfwd.state import Session

log = logging.getLogger("portfwd.relay.forwarder")  # the logger these lines always came from

#: Set by the front end (cli/console.py) while its batched handler is the only one: writes a
#: session's open and closed lines, the two of every connection, as that handler's formatter
#: would, without a LogRecord (about 9 µs each through logging; bench/RESULTS.md, D22).
#: Called as direct(logger name, event, fields, message): False when it did not write the line
#: (another handler listens too), which then goes through logging. None: through logging.
Direct = Callable[[str, str, dict[str, JsonValue], str], bool]
direct: Direct | None = None


def log_closed(label: str, session: Session, reason: str, logger: logging.Logger = log) -> None:
    """The one line a session ends with: who, where, why, bytes each way, how long."""
    if not logger.isEnabledFor(logging.INFO):  # a hot path: no fields built for nothing
        return
    duration = time.monotonic() - session.began
    if direct is not None and direct(
        logger.name,
        "session.closed",
        {
            "rule": session.rule.name,
            "client": session.client,
            "target": session.target,
            "path": session.path,
            "reason": reason,
            "bytes_up": session.bytes_up,
            "bytes_down": session.bytes_down,
            "duration_s": round(duration, 3),
        },
        f"{label}: {session.client} -> {session.target} closed ({reason}): "
        f"{session.bytes_up:d} B up, {session.bytes_down:d} B down, {duration:.3f}s",
    ):
        return
    logger.info(
        "%s: %s -> %s closed (%s): %d B up, %d B down, %.3fs",
        label,
        session.client,
        session.target,
        reason,
        session.bytes_up,
        session.bytes_down,
        duration,
        extra=event(
            "session.closed",
            rule=session.rule.name,
            client=session.client,
            target=session.target,
            path=session.path,
            reason=reason,
            bytes_up=session.bytes_up,
            bytes_down=session.bytes_down,
            duration_s=round(duration, 3),
        ),
    )


def log_opened(label: str, session: Session, logger: logging.Logger = log) -> None:
    """The line a session starts with (`session.open`)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    if direct is not None and direct(
        logger.name,
        "session.open",
        {"rule": session.rule.name, "client": session.client, "target": session.target, "path": session.path},
        f"{label}: {session.client} -> {session.target} open ({session.path})",
    ):
        return
    logger.info(
        "%s: %s -> %s open (%s)",
        label,
        session.client,
        session.target,
        session.path,
        extra=event(
            "session.open",
            rule=session.rule.name,
            client=session.client,
            target=session.target,
            path=session.path,
        ),
    )


def log_denied(
    label: str, client: str, what: str, logger: logging.Logger = log, *, by: str = "allow/deny"
) -> None:
    """A client the rule refused (`session.denied`): by its allow/deny, or as a sender of PROXY
    headers it does not trust (`by`)."""
    if not logger.isEnabledFor(logging.INFO):  # a scanner's every connection: nothing built
        return
    logger.info(
        "%s: %s denied by %s; %s",
        label,
        client,
        by,
        what,
        extra=event("session.denied", rule=label, client=client, reason=by),
    )


def log_refused(label: str, client: str, limit: str, text: str, logger: logging.Logger = log) -> None:
    """A client over one of its rule's limits (`session.refused`): a WARNING, so a flood of
    them is summarised by the log's flood filter instead of written line by line."""
    logger.warning(
        "%s: %s refused: %s reached; closed",
        label,
        client,
        text,
        extra=event("session.refused", rule=label, client=client, reason=limit),
    )


def log_failed(
    label: str,
    client: str,
    target: str,
    reason: str,
    logger: logging.Logger = log,
    *,
    rule: str | None = None,
) -> None:
    """A client whose upstream (or channel) never opened (`session.failed`). `rule` is the
    name its sessions are counted under (a tunnel forward's, not the tunnel's `label`)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    logger.info(
        "%s: %s -> %s failed: %s; client closed",
        label,
        client,
        target,
        reason,
        extra=event("session.failed", rule=rule or label, client=client, target=target, reason=reason),
    )
