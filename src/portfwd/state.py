"""The one source of truth for what is running: rules, listeners and live sessions with counters.

Owned by the runtime and written by the relays, whose counters are counters.py's slotted
objects: plain integer addition, no lock (one event loop thread), no allocation per chunk.
Idle time and byte rates are not stamped on the hot path either: `sample()` runs once a second
and notes which sessions moved bytes, and how many. A closing session leaves one tuple in a
bounded deque of its rule (the last RECENT_CLOSED), which `status()` turns into rows.
What is shown is typed: `status()` builds a `status.Snapshot` of frozen rows, the one picture
the control socket, `/metrics` and `portfwd status` read; this module keeps the live counters.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from portfwd import merge
from portfwd.counters import (
    Closable,
    Closed,
    RuleStats,
    ServerSessionStats,
    Session,
    TunnelStats,
)
from portfwd.status import (
    BackendRow,
    ClosedRow,
    ForwardRow,
    GatewayRuleRow,
    GatewaySessionRow,
    ListeningSocket,
    MappingRow,
    RuleRow,
    ServerSessionRow,
    SessionRow,
    Snapshot,
    TriggerRow,
    TunnelRow,
    WorkerRow,
)
from portfwd.status import Listener as Listener  # re-exported: the runtime adds listeners here

#: How many closed sessions each rule, tunnel forward and the server keep for `status`.
RECENT_CLOSED = 20

_monotonic = time.monotonic  # closing reads the clock once per session: no attribute lookups


class State:
    """Everything the runtime knows about its rules, listeners and sessions."""

    def __init__(self, first_id: int = 1) -> None:
        self.rules: dict[str, RuleStats] = {}
        self.listeners: list[Listener] = []
        self.listening: list[ListeningSocket] = []  # every socket of the listeners, and the others
        self.sessions: dict[int, Session] = {}
        self.tunnels: list[TunnelStats] = []
        self.server_sessions: list[ServerSessionStats] = []
        self.server_auth_failures = 0
        # Rows the kernel gateway and the router keeper replace whole (frozen; nothing to add to).
        self.gateway_rules: list[GatewayRuleRow] = []
        self.triggers: list[TriggerRow] = []
        self.gateway_sessions: list[GatewaySessionRow] = []
        self.kernel_sessions: list[GatewaySessionRow] = []  # the kernel relays' flows, from conntrack
        self.gateway_role = ""  # with [gateway.ha]: master, backup, fault or starting
        self.mappings: list[MappingRow] = []
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        self.config_path: str | None = None
        self.instance = ""  # the instance's name (instances.py)
        self.kind = ""  # run, forward, ssh or server
        self.control = ""  # the control socket it serves
        self._ids = itertools.count(first_id)  # a worker's start apart: ids stay unique merged
        self.pid = os.getpid()
        #: With `workers`: each worker's last snapshot (refreshed before status is read) and
        #: the workers themselves; `refresher` asks them (services/workers.py). `readers` are
        #: the other parts that read what they show only when someone looks (the kernel relays'
        #: live flows: a conntrack dump is not free).
        self.peers: list[Snapshot] = []
        self.workers: list[WorkerRow] = []
        self.refresher: Callable[[int | None], Awaitable[None]] | None = None
        #: Live sessions the last `session_rows(limit)` left out (the workers' included).
        self.sessions_omitted = 0
        self.peers_omitted = 0  # what the workers left out of their last snapshots
        #: With `workers`: each rule's byte rates in the workers, summed (much less than their
        #: snapshots: what the dashboard's history needs every second).
        self.rate_reader: Callable[[], Awaitable[dict[str, tuple[float, float]]]] | None = None
        self.readers: list[Callable[[], Awaitable[None]]] = []
        self._sampled = self._started_monotonic  # when `sample()` last ran
        self._server_closed: deque[Closed] = deque(maxlen=RECENT_CLOSED)  # all server clients'
        self._rates: dict[int, tuple[float, float]] = {}  # session id -> bytes/s up, down (if moving)
        self._closing: dict[int, str] = {}  # session id -> why the state asked its relay to close
        #: Called before live sessions' bytes are read: a relay that counts where Python does not
        #: look on every chunk (the C engine, relay/native.py) copies its counts in.
        self.syncers: list[Callable[[], None]] = []
        #: Called when the last live session closes (the runtime's drain waits on it).
        self.on_empty: Callable[[], None] | None = None

    async def refresh(self, *, readers: bool = True, limit: int | None = None) -> None:
        """Bring the workers' snapshots up to date (status and /metrics call this first), with
        at most `limit` sessions each, and, with `readers`, what the other parts read only when
        asked (a conntrack dump)."""
        if self.refresher is not None:
            await self.refresher(limit)
        if readers:
            for reader in self.readers:
                await reader()

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

    def close_session(self, session: Session, reason: str = "") -> None:
        """Fold a finished session's bytes into its rule, keep it among the recently closed, and
        forget it. Why it closed: what the state asked its relay to close for (idle timeout,
        shutdown), else `reason` (the relay's own), else "closed"."""
        if self.sessions.pop(session.id, None) is None:
            return
        if self._closing:
            reason = self._closing.pop(session.id, "") or reason
        rule = session.rule
        rule.connections_active -= 1
        rule.bytes_up += session.bytes_up
        rule.bytes_down += session.bytes_down
        backend = session.backend
        if backend is not None:
            backend.active -= 1
            backend.bytes_up += session.bytes_up
            backend.bytes_down += session.bytes_down
        session.relay = None  # kept among the recently closed: without its relay
        closed = rule.closed
        if closed is None:
            closed = rule.closed = self._closed_for(rule)
        closed.append((session, reason, _monotonic()))
        if not self.sessions and self.on_empty is not None:
            self.on_empty()

    def connect_failed(self, rule: RuleStats, client: str, target: str, path: str, reason: str) -> None:
        """Keep a client whose upstream never connected (refused, timeout) among the recently
        closed, with no bytes: it never became a session."""
        closed = rule.closed
        if closed is None:
            closed = rule.closed = self._closed_for(rule)
        now = time.monotonic()
        closed.append((Session(0, rule, client, target, path, now), reason, now))

    def _closed_for(self, rule: RuleStats) -> deque[Closed]:
        """The deque a rule's closed sessions go to: its own, or the server's shared one (its
        clients come and go; their sessions stay visible after they log out)."""
        if any(item.stats is rule for item in self.server_sessions):
            return self._server_closed
        return deque(maxlen=RECENT_CLOSED)

    def close_all(self, reason: str) -> None:
        """End every live relayed session (shutdown after the drain, second signal)."""
        for session in list(self.sessions.values()):
            if session.relay is not None:
                self._closing.setdefault(session.id, reason)
                session.relay.close(reason)

    def add_listening(
        self, owner: str, path: str, sockets: Iterable[socket.socket], kind: str = "rule"
    ) -> None:
        """List the listening `sockets` of `owner` (a rule, a tunnel forward, metrics, control),
        one row each with the address it is bound to, as `ss -l` shows them."""
        for listener in sockets:
            if listener.family == socket.AF_UNIX:
                protocol = "unix"
            else:
                protocol = "udp" if listener.type == socket.SOCK_DGRAM else "tcp"
            self.listening.append(ListeningSocket(owner, kind, protocol, bound_text(listener), path))

    def order_rules(self, names: Iterable[str]) -> None:
        """Put the rules and their listeners in the order of `names` (the config's, after a
        reload added some), the rest after them as they were (removed rules, other sockets)."""
        order = {name: index for index, name in enumerate(names)}
        last = len(order)
        rules = sorted(self.rules.items(), key=lambda item: order.get(item[0], last))
        self.rules.clear()  # in place: whoever holds the dict sees the new order
        self.rules.update(rules)
        self.listeners.sort(key=lambda item: order.get(item.rule, last))
        self.listening.sort(key=lambda item: order.get(item.owner, last) if item.kind == "rule" else last)

    def remove_listening_socket(self, owner: str, address: str, kind: str) -> None:
        """Forget one listening socket of `owner` (a server client's -R port that closed while
        its others stay)."""
        self.listening = [
            item
            for item in self.listening
            if item.owner != owner or item.kind != kind or item.address != address
        ]

    def remove_listening(self, owners: Iterable[str], kind: str = "rule") -> None:
        """Forget the listening sockets of `owners` of `kind` (closed: removed by reload, or
        shutting down)."""
        gone = set(owners)
        self.listening = [item for item in self.listening if item.owner not in gone or item.kind != kind]

    def sample(self) -> None:
        """Note which sessions moved bytes since the last call and how many per second (idle
        time and rates, off the hot path), the same for every rule, tunnel forward and server
        client, and end the TCP sessions idle longer than their rule's `idle_timeout`."""
        for sync in self.syncers:
            sync()
        now = time.monotonic()
        seconds, self._sampled = now - self._sampled, now
        idle: list[Session] = []
        rates: dict[int, tuple[float, float]] = {}
        for session in self.sessions.values():
            up = session.bytes_up
            moved = up + session.bytes_down
            if moved != session.moved:
                if seconds > 0:
                    up_now = up - session.sampled_up
                    rates[session.id] = (up_now / seconds, (moved - session.moved - up_now) / seconds)
                session.moved, session.sampled_up = moved, up
                session.active = now
            elif (
                (limit := session.rule.idle_timeout)
                and now - max(session.active, session.began) > limit
                and session.path != "udp"  # UDP flows have udp_idle_timeout of their own
            ):
                idle.append(session)
        self._rates = rates
        if seconds > 0:
            live = self.live_bytes()
            for stats in self._every_stats():
                up, down = live.get(id(stats), (0, 0))
                up, down = stats.bytes_up + up, stats.bytes_down + down
                stats.rate_up = (up - stats.sampled_up) / seconds
                stats.rate_down = (down - stats.sampled_down) / seconds
                stats.sampled_up, stats.sampled_down = up, down
        for session in idle:
            if session.relay is not None:
                self._closing.setdefault(session.id, "idle timeout")
                session.relay.close("idle timeout")

    def end(self, ident: int, reason: str) -> bool:
        """Close live session `ident` (an operator asked), its close line and the recently
        closed list saying `reason`. False when no such session lives here."""
        session = self.sessions.get(ident)
        if session is None or session.relay is None:
            return False
        self._closing.setdefault(ident, reason)
        session.relay.close(reason)
        return True

    def _every_stats(self) -> Iterator[RuleStats]:
        """Every counter set: the rules (config order), tunnel forwards, server clients."""
        yield from list(self.rules.values())
        for tunnel in self.tunnels:
            for forward in tunnel.forwards:
                yield forward.stats
        for item in self.server_sessions:
            yield item.stats

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
        for sync in self.syncers:
            sync()
        live: dict[int, tuple[int, int]] = {}
        for session in self.sessions.values():
            key = id(session.rule)
            up, down = live.get(key, (0, 0))
            live[key] = (up + session.bytes_up, down + session.bytes_down)
        return live

    def rule_rows(self) -> list[RuleRow]:
        """Rules with their counters; bytes include live sessions, so they grow mid-transfer."""
        totals = self.rule_bytes()
        own = [
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
                rate_up=rule.rate_up,
                rate_down=rule.rate_down,
                balance=rule.balance,
                backends=self._backend_rows(rule) if rule.backends else (),
                mode=rule.mode,
            )
            for rule in list(self.rules.values())
        ]
        if self.peers:
            return merge.rules(own, [peer.rules for peer in self.peers])
        return own

    def _backend_rows(self, rule: RuleStats) -> tuple[BackendRow, ...]:
        live: dict[int, tuple[int, int]] = {}
        for session in self.sessions.values():
            if session.rule is rule and session.backend is not None:
                up, down = live.get(id(session.backend), (0, 0))
                live[id(session.backend)] = (up + session.bytes_up, down + session.bytes_down)
        rows = []
        for backend in rule.backends:
            up, down = live.get(id(backend), (0, 0))
            rows.append(
                BackendRow(
                    name=backend.name,
                    target=backend.target,
                    weight=backend.weight,
                    backup=backend.backup,
                    state="up" if backend.up else "down",
                    since=backend.since,
                    why=backend.why,
                    sessions_active=backend.active,
                    sessions_total=backend.total,
                    bytes_up=backend.bytes_up + up,
                    bytes_down=backend.bytes_down + down,
                    failures=backend.failures,
                    last_check=backend.last_check,
                    last_check_result=backend.last_check_result,
                )
            )
        return tuple(rows)

    def session_rows(self, limit: int | None = None) -> list[SessionRow]:
        """Live sessions: wall-clock start, age and idle seconds, bytes so far; with `limit`, the
        `limit` that moved most bytes (a page cannot use ten thousand rows a second, and each
        row costs a system call), and how many were left out in `sessions_omitted`."""
        for sync in self.syncers:
            sync()
        now = time.monotonic()
        sessions: Iterable[Session] = self.sessions.values()
        omitted = self.peers_omitted if limit is not None else 0
        if limit is not None and len(self.sessions) > limit:
            sessions = heapq.nlargest(limit, sessions, key=_moved)
            omitted += len(self.sessions) - limit
        wall_offset = self.started - self._started_monotonic
        rows = [
            SessionRow(
                id=session.id,
                rule=session.rule.name,
                client=session.client,
                target=session.target,
                path=session.path,
                started=wall_offset + session.began,
                age=now - session.began,
                # bytes moved since the last sample (under a second ago): not idle
                idle=0.0
                if session.bytes_up + session.bytes_down != session.moved
                else now - max(session.active, session.began),
                bytes_up=session.bytes_up,
                bytes_down=session.bytes_down,
                rate_up=rates[0],
                rate_down=rates[1],
                upstream_local=upstream_text(session.relay),
                pid=self.pid,
            )
            for session in sessions
            for rates in (self._rates.get(session.id, (0.0, 0.0)),)
        ]
        for peer in self.peers:
            rows.extend(peer.sessions)
        if limit is not None and len(rows) > limit:
            omitted += len(rows) - limit
            rows = heapq.nlargest(limit, rows, key=lambda row: row.bytes_up + row.bytes_down)
        self.sessions_omitted = omitted
        return rows

    def closed_rows(self) -> list[ClosedRow]:
        """The recently closed sessions: per rule (config order), tunnel forward, then the
        server's, newest first in each."""
        wall_offset = self.started - self._started_monotonic
        kept = [stats.closed for stats in self._every_stats() if stats.closed]
        kept = [closed for closed in kept if closed is not self._server_closed]
        kept.append(self._server_closed)
        rows = [
            ClosedRow(
                rule=session.rule.name,
                client=session.client,
                target=session.target,
                path=session.path,
                started=wall_offset + session.began,
                ended=wall_offset + ended,
                duration=ended - session.began,
                bytes_up=session.bytes_up,
                bytes_down=session.bytes_down,
                reason=reason or "closed",
            )
            for closed in kept
            for session, reason, ended in reversed(closed)
        ]
        if self.peers:
            rows.extend(row for peer in self.peers for row in peer.closed)
            return merge.closed(rows, list(self.rules), RECENT_CLOSED)
        return rows

    def tunnel_rows(self) -> list[TunnelRow]:
        """Tunnels with their forwards, byte totals including live sessions."""
        live = self.live_bytes()
        rows = []
        for tunnel in self.tunnels:
            link = tunnel.link() if tunnel.link is not None else None
            local, peer = link or ("", "")
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
                        rate_up=stats.rate_up,
                        rate_down=stats.rate_down,
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
                    local=local,
                    peer=peer,
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
                    rate_up=item.stats.rate_up,
                    rate_down=item.stats.rate_down,
                )
            )
        return rows

    def status(self, limit: int | None = None) -> Snapshot:
        """The typed picture of everything, for the control socket, `/metrics` and tests (with
        at most `limit` live sessions: `session_rows`)."""
        return Snapshot(
            pid=os.getpid(),
            started=self.started,
            config=self.config_path,
            instance=self.instance,
            kind=self.kind,
            control=self.control,
            rules=tuple(self.rule_rows()),
            listeners=tuple(self.listeners),
            sessions=tuple(self.session_rows(limit)),
            tunnels=tuple(self.tunnel_rows()),
            server_sessions=tuple(self.server_rows()),
            gateway_rules=tuple(self.gateway_rules),
            triggers=tuple(self.triggers),
            gateway_sessions=tuple(self.gateway_sessions),
            mappings=tuple(self.mappings),
            server_auth_failures=self.server_auth_failures,
            kernel_sessions=tuple(self.kernel_sessions),
            gateway_role=self.gateway_role,
            listening=tuple(self.listening),
            closed=tuple(self.closed_rows()),
            workers=tuple(self.workers),
        )

    def snapshot(self) -> dict[str, Any]:
        """`status()` in its JSON form: what the control socket sends and `status --json` prints."""
        return self.status().to_json()


def _moved(session: Session) -> int:
    return session.bytes_up + session.bytes_down


def address_text(address: Any) -> str:
    """A socket address as status shows it: `127.0.0.1:8080`, `[::1]:8080`, a Unix path ("" for
    none: an unnamed socket, or a transport that does not say)."""
    if address is None or address == "":
        return ""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    if isinstance(address, bytes):  # an abstract Unix name
        return "@" + address[1:].decode(errors="replace")
    return str(address)


def upstream_text(relay: Closable | None) -> str:
    """The local address of a live relay's upstream socket, read now (status is asked), so the
    relay pays nothing per session for it: the splice relay's `upstream` descriptor, or what
    another relay's `upstream_sockname()` says (the protocol relay's socket, an SSH bridge's
    socket or SSH connection); "" for a relay that has closed."""
    fd = getattr(relay, "upstream", None)
    if type(fd) is not int:
        sockname = getattr(relay, "upstream_sockname", None)
        address = sockname() if callable(sockname) else None
        return address_text(address) if address else ""
    if getattr(relay, "closed", True) is not False:
        return ""
    borrowed = socket.socket(fileno=fd)  # one event loop: the relay cannot close it meanwhile
    try:
        return address_text(borrowed.getsockname())
    except OSError:
        return ""
    finally:
        borrowed.detach()  # the descriptor stays the relay's


def bound_text(listener: socket.socket) -> str:
    """The address `listener` is bound to, as `address_text` writes it ("" once closed)."""
    try:
        return address_text(listener.getsockname())
    except OSError:
        return ""
