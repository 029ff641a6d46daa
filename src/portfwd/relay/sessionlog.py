"""The lines a session is logged with, by every relay path (splice, protocol, UDP, SSH).

Each is an event (logevents.py) with the same fields in both log formats: `session.open`,
`session.closed` (rule, client, target, path, reason, bytes_up, bytes_down, duration_s),
`session.denied` and `session.failed`. Opening and closing are on the hot path: nothing is
built unless INFO is logged.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from portfwd.counters import Session
from portfwd.logevents import JsonValue, event

log = logging.getLogger("portfwd.relay.forwarder")  # the logger these lines always came from


class Lines(Protocol):
    """Writes a session's open and closed lines as the front end's only handler would format
    their records, without a LogRecord (about 9 µs each through logging; bench/RESULTS.md,
    D22, D24). Each returns False when it did not write the line (another handler listens
    too), which then goes through logging."""

    def opened(self, logger: str, label: str, session: Session) -> bool: ...

    def closed(self, logger: str, label: str, session: Session, reason: str, duration: float) -> bool: ...

    def engine_lines(self, logger: str) -> int:
        """Whether the C engine may write `logger`'s session lines itself, and how: 0 no (not
        logged at INFO, or another handler listens), 1 text, 2 JSON (relay/native.py)."""
        ...

    def put_lines(self, lines: list[str]) -> None:
        """Queue lines the C engine formatted as this front end would."""
        ...


#: Set by the front end (cli/console.py) while its batched handler is the only one; None:
#: every line through logging.
direct: Lines | None = None


#: The fields of `session.open` and `session.closed` (logevents.py), in the order they are logged.
OPEN_FIELDS = ("rule", "client", "target", "path")
CLOSED_FIELDS = (*OPEN_FIELDS, "reason", "bytes_up", "bytes_down", "duration_s")


def closed_fields(session: Session, reason: str, duration: float) -> dict[str, JsonValue]:
    """`session.closed`'s fields."""
    values = (session.rule.name, session.client, session.target, session.path, reason)
    return dict(
        zip(CLOSED_FIELDS, (*values, session.bytes_up, session.bytes_down, round(duration, 3)), strict=True)
    )


def opened_fields(session: Session) -> dict[str, JsonValue]:
    """`session.open`'s fields."""
    return dict(
        zip(OPEN_FIELDS, (session.rule.name, session.client, session.target, session.path), strict=True)
    )


def log_closed(label: str, session: Session, reason: str, logger: logging.Logger = log) -> None:
    """The one line a session ends with: who, where, why, bytes each way, how long."""
    if not logger.isEnabledFor(logging.INFO):  # a hot path: no fields built for nothing
        return
    duration = time.monotonic() - session.began
    lines = direct
    if lines is not None and lines.closed(logger.name, label, session, reason, duration):
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
        extra=event("session.closed", **closed_fields(session, reason, duration)),
    )


def log_opened(label: str, session: Session, logger: logging.Logger = log) -> None:
    """The line a session starts with (`session.open`)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    lines = direct
    if lines is not None and lines.opened(logger.name, label, session):
        return
    logger.info(
        "%s: %s -> %s open (%s)",
        label,
        session.client,
        session.target,
        session.path,
        extra=event("session.open", **opened_fields(session)),
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
