"""The one source of truth for what is running: rules, listeners and live sessions with counters.

Owned by the runtime and written by the relays. Counting is plain integer addition on slotted
objects: no lock (one event loop thread), no allocation per chunk. Idle time is not stamped on
the hot path either: `sample()` runs once a second and notes which sessions moved bytes.
What is shown is typed: `status()` builds a `status.Snapshot` of frozen rows, the one picture
the control socket, `/metrics` and `portfwd status` read; this module keeps the live counters.
"""

from __future__ import annotations

import bisect
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from portfwd.status import (
    ForwardRow,
    GatewayRuleRow,
    GatewaySessionRow,
    MappingRow,
    RuleRow,
    ServerSessionRow,
    SessionRow,
    Snapshot,
    TriggerRow,
    TunnelRow,
)
from portfwd.status import Listener as Listener  # re-exported: the runtime adds listeners here

#: Upper bounds (seconds) of the upstream connect-time histogram buckets; +Inf is implied.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class RuleStats:
    """Counters for one rule, summed over its listeners and sessions (live and closed)."""

    name: str
    listen: str = ""
    connect: str = ""
    protocol: str = ""
    relay: str = ""
    running: bool = True
    connections_total: int = 0
    connections_active: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    denied_total: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    udp_flows_active: int = 0
    connect_buckets: list[int] = field(default_factory=lambda: [0] * (len(CONNECT_BUCKETS) + 1))
    connect_seconds_sum: float = 0.0
    idle_timeout: float = 0.0  # seconds a TCP session may move nothing before `sample` ends it; 0: never

    def count_error(self, reason: str, times: int = 1) -> None:
        """Add `times` to the error counter for `reason` (refused, timeout, unreachable...)."""
        self.errors[reason] = self.errors.get(reason, 0) + times

    def observe_connect(self, seconds: float) -> None:
        """Record one successful upstream connect time (for the histogram)."""
        self.connect_seconds_sum += seconds
        self.connect_buckets[bisect.bisect_left(CONNECT_BUCKETS, seconds)] += 1


class Closable(Protocol):
    """What the state needs of a running relay: a way to end it."""

    def close(self, reason: str) -> None: ...


class SessionOwner(Protocol):
    """Who a relay reports its end to (the forwarder that started it)."""

    def relay_closed(self, session: Session, reason: str) -> None: ...


@dataclass(slots=True)
class Session:
    """One relayed connection (or UDP flow). Relays add to `bytes_up`/`bytes_down` directly.

    `bytes_up` is client to target, `bytes_down` target to client. `began` is the monotonic
    clock at open (wall-clock start is derived in snapshots), `active` the monotonic time
    `sample()` last saw bytes move. `target` and `path` are shared strings.
    """

    id: int
    rule: RuleStats
    client: str
    target: str
    path: str
    began: float
    bytes_up: int = 0
    bytes_down: int = 0
    relay: Closable | None = None
    moved: int = 0
    active: float = 0.0


@dataclass(slots=True)
class TunnelForwardStats:
    """One -L/-R/-D forward of a tunnel: where it listens now, its state, and its counters."""

    spec: str
    kind: str
    listen: str
    target: str
    state: str = "waiting"
    error: str = ""
    stats: RuleStats = field(default_factory=lambda: RuleStats(""))


@dataclass(slots=True)
class TunnelStats:
    """One SSH tunnel: connecting, up, backoff or failed; since when; how often it came back."""

    name: str
    server: str
    state: str = "connecting"
    since: float = field(default_factory=time.time)
    reconnects: int = 0
    last_error: str = ""
    forwards: list[TunnelForwardStats] = field(default_factory=list)

    def enter(self, state: str, error: str | None = None) -> None:
        """Move to `state` (and note why, when it is a failure)."""
        if state != self.state:
            self.state = state
            self.since = time.time()
        if error is not None:
            self.last_error = error


@dataclass(slots=True)
class ServerSessionStats:
    """One client logged in to `portfwd server`: who, from where, with which key, asking what."""

    user: str
    source: str
    fingerprint: str
    since: float = field(default_factory=time.time)
    forwards: list[str] = field(default_factory=list)
    stats: RuleStats = field(default_factory=lambda: RuleStats(""))


class State:
    """Everything the runtime knows about its rules, listeners and sessions."""

    def __init__(self) -> None:
        self.rules: dict[str, RuleStats] = {}
        self.listeners: list[Listener] = []
        self.sessions: dict[int, Session] = {}
        self.tunnels: list[TunnelStats] = []
        self.server_sessions: list[ServerSessionStats] = []
        self.server_auth_failures = 0
        # Rows the kernel gateway and the router keeper replace whole (frozen; nothing to add to).
        self.gateway_rules: list[GatewayRuleRow] = []
        self.triggers: list[TriggerRow] = []
        self.gateway_sessions: list[GatewaySessionRow] = []
        self.mappings: list[MappingRow] = []
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        self.config_path: str | None = None
        self.instance = ""  # the instance's name (instances.py)
        self.kind = ""  # run, forward, ssh or server
        self.control = ""  # the control socket it serves
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
        now = time.monotonic()
        session = Session(next(self._ids), rule, client, target, path, now, active=now)
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

    def sample(self) -> None:
        """Note which sessions moved bytes since the last call (idle time, off the hot path), and
        end the TCP sessions idle longer than their rule's `idle_timeout`."""
        now = time.monotonic()
        idle: list[Session] = []
        for session in self.sessions.values():
            moved = session.bytes_up + session.bytes_down
            if moved != session.moved:
                session.moved = moved
                session.active = now
            elif (
                (limit := session.rule.idle_timeout)
                and now - max(session.active, session.began) > limit
                and session.path != "udp"  # UDP flows have udp_idle_timeout of their own
            ):
                idle.append(session)
        for session in idle:
            if session.relay is not None:
                session.relay.close("idle timeout")

    def rule_bytes(self) -> dict[str, tuple[int, int]]:
        """Bytes (up, down) per rule, closed sessions plus live ones, so totals grow mid-transfer."""
        live = self.live_bytes()
        totals = {}
        for name, rule in self.rules.items():
            up, down = live.get(id(rule), (0, 0))
            totals[name] = (rule.bytes_up + up, rule.bytes_down + down)
        return totals

    def live_bytes(self) -> dict[int, tuple[int, int]]:
        """Bytes (up, down) of live sessions, keyed by id() of their RuleStats."""
        live: dict[int, tuple[int, int]] = {}
        for session in self.sessions.values():
            key = id(session.rule)
            up, down = live.get(key, (0, 0))
            live[key] = (up + session.bytes_up, down + session.bytes_down)
        return live

    def rule_rows(self) -> list[RuleRow]:
        """Rules with their counters; bytes include live sessions, so they grow mid-transfer."""
        totals = self.rule_bytes()
        return [
            RuleRow(
                name=rule.name,
                listen=rule.listen,
                connect=rule.connect,
                protocol=rule.protocol,
                relay=rule.relay,
                running=rule.running,
                connections_total=rule.connections_total,
                connections_active=rule.connections_active,
                bytes_up=totals[rule.name][0],
                bytes_down=totals[rule.name][1],
                denied_total=rule.denied_total,
                errors=dict(rule.errors),
                udp_flows_active=rule.udp_flows_active,
                connect_buckets=tuple(rule.connect_buckets),
                connect_seconds_sum=rule.connect_seconds_sum,
            )
            for rule in list(self.rules.values())
        ]

    def session_rows(self) -> list[SessionRow]:
        """Live sessions: wall-clock start, age and idle seconds, bytes so far."""
        now = time.monotonic()
        wall_offset = self.started - self._started_monotonic
        return [
            SessionRow(
                id=session.id,
                rule=session.rule.name,
                client=session.client,
                target=session.target,
                path=session.path,
                started=wall_offset + session.began,
                age=now - session.began,
                idle=now - max(session.active, session.began),
                bytes_up=session.bytes_up,
                bytes_down=session.bytes_down,
            )
            for session in self.sessions.values()
        ]

    def tunnel_rows(self) -> list[TunnelRow]:
        """Tunnels with their forwards, byte totals including live sessions."""
        live = self.live_bytes()
        rows = []
        for tunnel in self.tunnels:
            forwards = []
            for forward in tunnel.forwards:
                stats = forward.stats
                up, down = live.get(id(stats), (0, 0))
                forwards.append(
                    ForwardRow(
                        spec=forward.spec,
                        kind=forward.kind,
                        listen=forward.listen,
                        target=forward.target,
                        state=forward.state,
                        error=forward.error,
                        connections_total=stats.connections_total,
                        connections_active=stats.connections_active,
                        bytes_up=stats.bytes_up + up,
                        bytes_down=stats.bytes_down + down,
                        errors=dict(stats.errors),
                    )
                )
            rows.append(
                TunnelRow(
                    name=tunnel.name,
                    server=tunnel.server,
                    state=tunnel.state,
                    since=tunnel.since,
                    reconnects=tunnel.reconnects,
                    last_error=tunnel.last_error,
                    forwards=tuple(forwards),
                )
            )
        return rows

    def server_rows(self) -> list[ServerSessionRow]:
        """Clients of `portfwd server` with their forwards and bytes."""
        live = self.live_bytes()
        rows = []
        for item in self.server_sessions:
            up, down = live.get(id(item.stats), (0, 0))
            rows.append(
                ServerSessionRow(
                    user=item.user,
                    source=item.source,
                    fingerprint=item.fingerprint,
                    since=item.since,
                    forwards=tuple(item.forwards),
                    connections_total=item.stats.connections_total,
                    connections_active=item.stats.connections_active,
                    bytes_up=item.stats.bytes_up + up,
                    bytes_down=item.stats.bytes_down + down,
                )
            )
        return rows

    def status(self) -> Snapshot:
        """The typed picture of everything, for the control socket, `/metrics` and tests."""
        return Snapshot(
            pid=os.getpid(),
            started=self.started,
            config=self.config_path,
            instance=self.instance,
            kind=self.kind,
            control=self.control,
            rules=tuple(self.rule_rows()),
            listeners=tuple(self.listeners),
            sessions=tuple(self.session_rows()),
            tunnels=tuple(self.tunnel_rows()),
            server_sessions=tuple(self.server_rows()),
            gateway_rules=tuple(self.gateway_rules),
            triggers=tuple(self.triggers),
            gateway_sessions=tuple(self.gateway_sessions),
            mappings=tuple(self.mappings),
            server_auth_failures=self.server_auth_failures,
        )

    def snapshot(self) -> dict[str, Any]:
        """`status()` in its JSON form: what the control socket sends and `status --json` prints."""
        return self.status().to_json()
