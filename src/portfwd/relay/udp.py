"""UDP forwarding: a flow table keyed by client address, one connected upstream socket per flow.

Theory of operation. The listening socket reads datagrams in batches. A datagram from a new
client (admitted by the ACL, under the rule's flow cap) creates a flow: a UDP socket connected
to the target, so the kernel filters replies to that target for us. Replies read on the flow's
socket are sent back to the client from the listening socket, so the client sees answers from
the address it wrote to. A sweep closes flows idle for longer than `udp_idle_timeout`.
Datagrams are read into a 64 KiB buffer, so any size up to 65507 bytes crosses whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from typing import Any

from portfwd.acl import client_ip
from portfwd.config import ForwardConfig
from portfwd.errors import UpstreamError
from portfwd.relay.forwarder import compile_policy, format_peer, format_target, log_closed, resolve_target
from portfwd.relay.upstream import resolve
from portfwd.state import RuleStats, Session, State

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65536
BATCH = 64
#: Datagrams held for a flow whose target host name is still being resolved.
PENDING_LIMIT = 64


class _Flow:
    """One client's association: its upstream socket and activity clock."""

    __slots__ = ("client", "forwarder", "pending", "seen", "session", "upstream")

    def __init__(self, forwarder: UdpForwarder, client: Any, session: Session) -> None:
        self.forwarder = forwarder
        self.client = client
        self.session = session
        self.upstream: socket.socket | None = None
        self.pending: list[bytes] | None = []
        self.seen = forwarder.tick

    def attach(self, upstream: socket.socket) -> None:
        self.upstream = upstream
        self.forwarder.loop.add_reader(upstream.fileno(), self.on_reply)
        pending, self.pending = self.pending or [], None
        for datagram in pending:
            self.send(datagram)

    def send(self, datagram: bytes) -> None:
        """Send one datagram upstream (the slow path; the listener inlines the common case)."""
        if self.upstream is None:
            if self.pending is not None and len(self.pending) < PENDING_LIMIT:
                self.pending.append(datagram)
            return
        try:
            self.upstream.send(datagram)
        except OSError as exc:
            self.forwarder.send_failed(exc)
            return
        self.session.bytes_up += len(datagram)

    def on_reply(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        listener = self.forwarder.listener
        for _ in range(BATCH):
            try:
                datagram = upstream.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:
                self.forwarder.stats.count_error(
                    "refused" if isinstance(exc, ConnectionRefusedError) else "udp_error"
                )
                return
            self.seen = self.forwarder.tick
            try:
                listener.sendto(datagram, self.client)
            except OSError:
                self.forwarder.stats.count_error("udp_dropped")
                continue
            self.session.bytes_down += len(datagram)

    def close(self) -> None:
        if self.upstream is not None:
            self.forwarder.loop.remove_reader(self.upstream.fileno())
            self.upstream.close()
            self.upstream = None
        self.pending = None


class UdpForwarder:
    """Serves one UDP listening port of one rule."""

    def __init__(self, rule: ForwardConfig, port: int, listener: socket.socket, state: State) -> None:
        self.rule = rule
        self.port = port
        self.listener = listener
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.stats: RuleStats = state.rule(rule.label)
        self.policy = compile_policy(rule)
        self.flows: dict[Any, _Flow] = {}
        self._default = resolve_target(rule.listen, rule.connect, port)
        self._denied_logged: set[str] = set()
        self._full_logged = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Activity is stamped with a sweep counter, not a clock read per datagram; a flow is
        # closed after `udp_idle_timeout` of silence, give or take one sweep interval.
        interval = min(max(rule.udp_idle_timeout / 4, 0.05), 5.0)
        self._sweep_interval = interval
        self._idle_ticks = max(1, math.ceil(rule.udp_idle_timeout / interval))
        self.tick = 0
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def label(self) -> str:
        """The rule's name, for logs."""
        return self.rule.label

    def start(self) -> None:
        """Begin reading datagrams and sweeping idle flows."""
        self.loop.add_reader(self.listener.fileno(), self._on_datagram)
        self._sweeper = self.loop.call_later(self._sweep_interval, self._sweep)

    def _on_datagram(self) -> None:
        # The hot path: one recvfrom and one send per datagram, nothing else allocated.
        flows = self.flows
        receive = self.listener.recvfrom
        tick = self.tick
        for _ in range(BATCH):
            try:
                datagram, peer = receive(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error for a reply we sent; the next datagram is fine
            flow = flows.get(peer)
            if flow is None:
                flow = self._new_flow(peer)
                if flow is None:
                    continue
            flow.seen = tick
            upstream = flow.upstream
            if upstream is None:
                flow.send(datagram)
                continue
            try:
                upstream.send(datagram)
            except OSError as exc:
                self.send_failed(exc)
                continue
            flow.session.bytes_up += len(datagram)

    def send_failed(self, exc: OSError) -> None:
        """Count a datagram the kernel would not send upstream (full buffer, ICMP unreachable)."""
        if isinstance(exc, BlockingIOError):
            self.stats.count_error("udp_dropped")
        elif isinstance(exc, ConnectionRefusedError):
            self.stats.count_error("refused")
        else:
            self.stats.count_error("udp_error")

    def _new_flow(self, peer: Any) -> _Flow | None:
        client_text = format_peer(peer)
        target = self._default
        if not self.policy.is_open:
            address = client_ip(peer[0])
            if not self.policy.permits(address):
                self.stats.denied_total += 1
                if client_text not in self._denied_logged:
                    self._denied_logged.add(client_text)
                    log.info("%s: %s denied by allow/deny; datagrams dropped", self.label, client_text)
                return None
            chosen = self.policy.target_for(address, self.rule.connect)
            if chosen is not self.rule.connect:
                target = resolve_target(self.rule.listen, chosen, self.port)
        if len(self.flows) >= self.rule.udp_max_flows:
            self.stats.count_error("udp_flow_limit")
            if not self._full_logged:
                self._full_logged = True
                log.warning(
                    "%s: %d UDP flows (udp_max_flows) in use; new clients dropped until some go idle",
                    self.label,
                    len(self.flows),
                )
            return None
        assert not isinstance(target, str)
        session = self.state.open_session(self.stats, client_text, format_target(target), "udp")
        flow = _Flow(self, peer, session)
        self.flows[peer] = flow
        self.stats.udp_flows_active += 1
        log.info("%s: %s -> %s open (udp)", self.label, client_text, session.target)
        task = self.loop.create_task(self._connect(flow, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flow

    async def _connect(self, flow: _Flow, target: tuple[str, int]) -> None:
        try:
            family, sockaddr = (await resolve(target[0], target[1], socket.SOCK_DGRAM))[0]
            upstream = socket.socket(family, socket.SOCK_DGRAM)
            try:
                upstream.setblocking(False)
                upstream.connect(sockaddr)
            except OSError:
                upstream.close()
                raise
        except (UpstreamError, OSError, IndexError) as exc:
            self.stats.count_error(getattr(exc, "reason", "unreachable"))
            self._close_flow(flow, f"failed: {exc}")
            return
        if flow.pending is None:  # closed while resolving
            upstream.close()
            return
        flow.attach(upstream)

    def _sweep(self) -> None:
        self.tick += 1
        oldest = self.tick - self._idle_ticks
        for flow in [flow for flow in self.flows.values() if flow.seen <= oldest]:
            self._close_flow(flow, "idle")
        self._full_logged = False
        if len(self._denied_logged) > 4096:
            self._denied_logged.clear()
        self._sweeper = self.loop.call_later(self._sweep_interval, self._sweep)

    def _close_flow(self, flow: _Flow, reason: str) -> None:
        if self.flows.pop(flow.client, None) is None:
            return
        flow.close()
        self.stats.udp_flows_active -= 1
        log_closed(self.label, flow.session, reason)
        self.state.close_session(flow.session)

    def close(self, reason: str = "shutdown") -> None:
        """Stop reading, close every flow and the listening socket."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(OSError, ValueError):
            self.loop.remove_reader(self.listener.fileno())
        for flow in list(self.flows.values()):
            self._close_flow(flow, reason)
        self.listener.close()

    @property
    def active(self) -> int:
        """Live flows."""
        return len(self.flows)
