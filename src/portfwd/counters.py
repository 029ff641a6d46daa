"""The live counters the relays write and the state keeps: a rule's, a backend's, a session's,
a tunnel's and a server client's.

Plain slotted dataclasses, apart from `state.State` (which owns them and turns them into
status rows) so the objects on every connection's path are one small module. Counting is plain
integer addition: no lock (one event loop thread), no allocation per chunk.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

#: Upper bounds (seconds) of the upstream connect-time histogram buckets; +Inf is implied.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: A closed session as kept: the session, why it closed ("" for "closed") and when (monotonic).
#: One small tuple per close; rows are made when status is asked.
Closed = tuple["Session", str, float]


@dataclass(slots=True)
class BackendStats:
    """One backend of a rule: whether it is up, and its counters (the balancer writes `up`,
    the sessions it opens and closes count here too)."""

    name: str
    target: str
    weight: int = 1
    backup: bool = False
    up: bool = True
    since: float = field(default_factory=time.time)  # wall-clock of the last change of `up`
    why: str = ""  # what took it down
    active: int = 0
    total: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    failures: int = 0  # upstream connects that failed
    last_check: float = 0.0  # wall-clock of the last active check; 0: none yet
    last_check_result: str = ""


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
    closed: deque[Closed] | None = None  # the last RECENT_CLOSED sessions, made at the first close
    sampled_up: int = 0  # bytes each way at the last sample, and the rates measured then
    sampled_down: int = 0
    rate_up: float = 0.0
    rate_down: float = 0.0
    balance: str = ""  # a rule with backends: how it balances them...
    backends: list[BackendStats] = field(default_factory=list)  # ...and their stats
    mode: str = ""  # "" (accepting), "paused" or "draining": set through the web API

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
    `sample()` last saw bytes move, `moved` and `sampled_up` the bytes it saw then (for idle
    time and rates; rates themselves live in the state, for moving sessions only: an idle
    session costs no more). `target` and `path` are shared strings.
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
    sampled_up: int = 0
    backend: BackendStats | None = None  #: the backend it reached, on a rule with several


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
    #: The SSH connection's (local, peer) socket addresses, read when status is asked; None: none.
    link: Callable[[], tuple[str, str] | None] | None = None

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
