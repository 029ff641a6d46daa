"""The one source of truth for what is running: listeners and live sessions with their counters.

Owned by the runtime and written by the relays. Counting is plain integer addition on slotted
objects: no lock (one event loop thread), no allocation per chunk.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class RuleStats:
    """Counters for one rule, summed over its listeners and sessions (live and closed)."""

    name: str
    connections_total: int = 0
    connections_active: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    denied_total: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    udp_flows_active: int = 0

    def count_error(self, reason: str) -> None:
        """Add one to the error counter for `reason` (refused, timeout, unreachable...)."""
        self.errors[reason] = self.errors.get(reason, 0) + 1


class Closable(Protocol):
    """What the state needs of a running relay: a way to end it."""

    def close(self, reason: str) -> None: ...


class SessionOwner(Protocol):
    """Who a relay reports its end to (the forwarder that started it)."""

    def relay_closed(self, session: Session, reason: str) -> None: ...


@dataclass(slots=True)
class Session:
    """One relayed connection (or UDP flow). Relays add to `bytes_up`/`bytes_down` directly.

    `bytes_up` is client to target, `bytes_down` target to client. `started` is wall-clock
    time (for display), `began` the monotonic clock (for durations). `target` and `path` are
    shared strings, so a session costs little more than its two counters.
    """

    id: int
    rule: RuleStats
    client: str
    target: str
    path: str
    started: float
    began: float
    bytes_up: int = 0
    bytes_down: int = 0
    relay: Closable | None = None


@dataclass(slots=True)
class Listener:
    """One bound socket of a rule."""

    rule: str
    address: str
    protocol: str
    path: str


class State:
    """Everything the runtime knows about its rules, listeners and sessions."""

    def __init__(self) -> None:
        self.rules: dict[str, RuleStats] = {}
        self.listeners: list[Listener] = []
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        #: Called when the last live session closes (the runtime's drain waits on it).
        self.on_empty: Callable[[], None] | None = None

    def rule(self, name: str) -> RuleStats:
        """The stats of a rule, created on first use."""
        stats = self.rules.get(name)
        if stats is None:
            stats = self.rules[name] = RuleStats(name)
        return stats

    def open_session(self, rule: RuleStats, client: str, target: str, path: str) -> Session:
        """Register a new live session and count it."""
        session = Session(next(self._ids), rule, client, target, path, time.time(), time.monotonic())
        self.sessions[session.id] = session
        rule.connections_total += 1
        rule.connections_active += 1
        return session

    def close_session(self, session: Session) -> None:
        """Fold a finished session's bytes into its rule and forget it."""
        if self.sessions.pop(session.id, None) is None:
            return
        rule = session.rule
        rule.connections_active -= 1
        rule.bytes_up += session.bytes_up
        rule.bytes_down += session.bytes_down
        if not self.sessions and self.on_empty is not None:
            self.on_empty()

    def close_all(self, reason: str) -> None:
        """End every live relayed session (shutdown after the drain, second signal)."""
        for session in list(self.sessions.values()):
            if session.relay is not None:
                session.relay.close(reason)
