"""UDP forwarding: a flow table keyed by client address, one connected upstream socket per flow.

Theory of operation. The listening socket reads datagrams in batches. A datagram from a new
client (admitted by the ACL, under the rule's flow cap) creates a flow: a UDP socket connected
to the target, so the kernel filters replies to that target for us. Replies read on the flow's
socket are sent back to the client from the listening socket, so the client sees answers from
the address it wrote to. A sweep closes flows idle for longer than `udp_idle_timeout`.
Datagrams are read into a 64 KiB buffer, so any size up to 65507 bytes crosses whole.

On Linux both directions move datagrams in batches (relay/mmsg.py): one recvmmsg takes up to
64, and each run of them from one client leaves in one sendmmsg, from the slots they arrived
in. Flows are then keyed by the client's raw sockaddr, which needs no parsing per datagram.
Elsewhere each datagram takes a recvfrom and a send.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import Any

from portfwd.acl import client_ip
from portfwd.counters import RuleStats, Session
from portfwd.errors import UpstreamError
from portfwd.logevents import event
from portfwd.proto.proxy import ProxyError, header
from portfwd.relay import libc
from portfwd.relay.balance import Pool
from portfwd.relay.forwarder import (
    compile_policy,
    format_peer,
    format_target,
    limit_text,
    resolve_target,
    route_target,
)
from portfwd.relay.limits import Limits
from portfwd.relay.mmsg import NAME_SIZE, Batch
from portfwd.relay.sessionlog import log_closed, log_denied, log_opened, log_refused
from portfwd.relay.upstream import resolve
from portfwd.specs import RuleSpec
from portfwd.state import State

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65536
BATCH = 64
#: recvmmsg calls per readiness event before yielding to other sockets (fairness).
ROUNDS = 4
#: Datagrams held for a flow whose target host name is still being resolved.
PENDING_LIMIT = 64


class _Flow:
    """One client's association: its upstream socket and activity clock."""

    __slots__ = (
        "client", "forwarder", "header", "key", "name", "pending", "seen", "session", "source",
        "upstream", "upstream_fd",
    )  # fmt: skip

    def __init__(self, forwarder: UdpForwarder, client: Any, key: Any, session: Session) -> None:
        self.forwarder = forwarder
        self.client = client
        self.key = key  # in the flow table: the raw sockaddr (batched) or the address tuple
        #: The batched path's reply address: the client's raw sockaddr for sendmmsg.
        self.name = ctypes.create_string_buffer(key, len(key)) if isinstance(key, bytes) else None
        self.session = session
        self.upstream: socket.socket | None = None
        self.upstream_fd = -1
        self.pending: list[bytes] | None = []
        self.seen = forwarder.tick
        self.header = b""  #: a PROXY v2 header each datagram upstream begins with (proxy_protocol)
        self.source: str | None = None  #: the client address its rule's Limits counted it under

    def attach(self, upstream: socket.socket) -> None:
        self.upstream = upstream
        self.upstream_fd = upstream.fileno()
        on_reply = self.on_reply if self.forwarder.batch is None else self.on_replies
        self.forwarder.loop.add_reader(self.upstream_fd, on_reply)
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
            self.upstream.send(self.header + datagram)
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
            except OSError as exc:
                self.forwarder.reply_dropped(exc)
                continue
            self.session.bytes_down += len(datagram)

    def on_replies(self) -> None:
        """The batched on_reply: replies leave the listening socket in runs of up to BATCH."""
        forwarder = self.forwarder
        batch = forwarder.batch
        assert batch is not None
        assert self.name is not None
        listener = forwarder.listener_fd
        for _ in range(ROUNDS):
            try:
                count = batch.receive(self.upstream_fd)
            except OSError as exc:
                refused = isinstance(exc, ConnectionRefusedError)
                forwarder.stats.count_error("refused" if refused else "udp_error")
                return
            if not count:
                return
            self.seen = forwarder.tick
            lengths = batch.lengths(count)
            went = batch.send_all(listener, 0, lengths, self.name, forwarder.reply_dropped)
            self.session.bytes_down += went
            if count < BATCH:
                return

    def close(self, reason: str) -> None:
        """End the flow (the state asks: an operator closed it): as its idle timeout would."""
        self.forwarder._close_flow(self, reason)

    def shut(self) -> None:
        """Release the upstream socket (the forwarder forgets the flow itself)."""
        if self.upstream is not None:
            self.forwarder.loop.remove_reader(self.upstream_fd)
            self.upstream.close()
            self.upstream = None
            self.upstream_fd = -1
        self.pending = None


class UdpForwarder:
    """Serves one UDP listening port of one rule."""

    def __init__(
        self,
        rule: RuleSpec,
        port: int,
        listener: socket.socket,
        state: State,
        batch: Batch | None = None,
        pool: Pool | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.rule = rule
        #: The rule's connection limits, counting flows (shared with its TCP side, if any).
        self.limits = limits
        #: The rule's backends (None: one target); a flow stays with the backend it was given.
        self.pool = pool
        #: proxy_protocol = "v2": each flow's datagrams carry its PROXY header (no batched path).
        self._proxied = rule.proxy_protocol == 2
        if self._proxied:
            batch = None
        own = listener.getsockname()[:2]  # the address a PROXY header names as reached...
        #: ...the wildcard (no IP_PKTINFO here) as the unspecified address of the client's family
        self._own = own
        self._wildcard = own[0] in ("0.0.0.0", "::")
        self.port = port
        self.listener = listener
        self.listener_fd = listener.fileno()
        #: Shared by the process's UDP forwarders (used only inside one callback); None: per datagram.
        self.batch = batch
        #: Bytes of a raw source sockaddr that identify a client: sockaddr_in or sockaddr_in6.
        self._name_size = 28 if listener.family == socket.AF_INET6 else 16
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
        #: A draining rule: datagrams that would start a flow are dropped (counted `draining`);
        #: live flows go on.
        self.refusing = False
        self._held = False
        self._reading: Callable[[], None] | None = None

    @property
    def label(self) -> str:
        """The rule's name, for logs."""
        return self.rule.label

    def start(self) -> None:
        """Begin reading datagrams and sweeping idle flows."""
        on_datagram = self._on_datagram if self.batch is None else self._on_datagrams
        if self._proxied:
            on_datagram = self._on_datagram_headed
        self._reading = on_datagram
        if not self._held:
            self.loop.add_reader(self.listener_fd, on_datagram)
        self._sweeper = self.loop.call_later(self._sweep_interval, self._sweep)

    def hold(self) -> None:
        """Stop reading the socket until `release` (a paused rule): datagrams wait in its
        receive buffer as far as it holds them; replies to live flows still go back."""
        if not self._held:
            self._held = True
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(self.listener_fd)

    def release(self) -> None:
        """Read again after `hold`."""
        if self._held:
            self._held = False
            if self._reading is not None and self.listener.fileno() >= 0:
                self.loop.add_reader(self.listener_fd, self._reading)

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
                flow = self._new_flow(peer, peer)
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

    def _on_datagram_headed(self) -> None:
        # proxy_protocol = "v2": every datagram upstream begins with the flow's PROXY header (as
        # go-mmproxy reads them: a UDP receiver has no connection to carry it once).
        flows = self.flows
        receive = self.listener.recvfrom
        tick = self.tick
        for _ in range(BATCH):
            try:
                datagram, peer = receive(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                continue
            flow = flows.get(peer)
            if flow is None:
                flow = self._new_flow(peer, peer)
                if flow is None:
                    continue
            flow.seen = tick
            flow.send(datagram)

    def _on_datagrams(self) -> None:
        # The batched hot path: one recvmmsg, then one sendmmsg per run of datagrams from one client.
        batch = self.batch
        assert batch is not None
        flows = self.flows
        size = self._name_size
        listener = self.listener_fd
        tick = self.tick
        for _ in range(ROUNDS):
            try:
                count = batch.receive(listener)
            except OSError:
                continue  # an ICMP error for a reply we sent; the next datagram is fine
            if not count:
                return
            lengths = batch.lengths(count)
            sources = batch.sources(count)
            start = 0
            while start < count:
                offset = start * NAME_SIZE
                key = sources[offset : offset + size]
                end = start + 1
                while end < count:
                    offset += NAME_SIZE
                    if sources[offset : offset + size] != key:
                        break
                    end += 1
                flow = flows.get(key)
                if flow is None:
                    flow = self._new_flow(libc.sockaddr(key), key, end - start)
                if flow is not None:
                    flow.seen = tick
                    if flow.upstream is None:
                        for index in range(start, end):
                            flow.send(batch.payload(index, lengths[index]))
                    else:
                        run = lengths[start:end]
                        went = batch.send_all(flow.upstream_fd, start, run, None, self.send_failed)
                        flow.session.bytes_up += went
                start = end
            if count < BATCH:
                return

    def reply_dropped(self, exc: OSError) -> None:
        """Count a reply the kernel would not send back to its client."""
        self.stats.count_error("udp_dropped")

    def send_failed(self, exc: OSError) -> None:
        """Count a datagram the kernel would not send upstream (full buffer, ICMP unreachable)."""
        if isinstance(exc, BlockingIOError):
            self.stats.count_error("udp_dropped")
        elif isinstance(exc, ConnectionRefusedError):
            self.stats.count_error("refused")
        else:
            self.stats.count_error("udp_error")

    def _new_flow(self, peer: Any, key: Any, datagrams: int = 1) -> _Flow | None:
        """A flow for a new client, or None (counted per datagram) when it is denied or over the cap."""
        if self.refusing:
            self.stats.count_error("draining", datagrams)
            return None
        client_text = format_peer(peer)
        target = self._default
        preferred: int | None = None
        routed = False
        if not self.policy.is_open:
            address = client_ip(peer[0])
            if not self.policy.permits(address):
                self.stats.denied_total += datagrams
                if client_text not in self._denied_logged:
                    self._denied_logged.add(client_text)
                    log_denied(self.label, client_text, "datagrams dropped")
                return None
            chosen, preferred = route_target(self.policy, address, self.rule, self.port)
            if chosen is not None:
                assert not isinstance(chosen, str)  # config: UDP reaches IP targets only
                target, routed = chosen, True
        source: str | None = None
        if self.limits is not None:
            source = str(client_ip(peer[0]))
            refused = self.limits.admit(source)
            if refused is not None:
                self.stats.count_error(refused, datagrams)
                if client_text not in self._denied_logged:  # once per client, not per datagram
                    self._denied_logged.add(client_text)
                    log_refused(self.label, client_text, refused, limit_text(self.rule, refused))
                return None
        if len(self.flows) >= self.rule.udp_max_flows:
            if self.limits is not None:
                self.limits.done(source)
            self.stats.count_error("udp_flow_limit", datagrams)
            if not self._full_logged:
                self._full_logged = True
                log.warning(
                    "%s: %d UDP flows (udp_max_flows) in use; new clients dropped until some go idle",
                    self.label,
                    len(self.flows),
                    extra=event("udp.flows_full", rule=self.label, flows=len(self.flows)),
                )
            return None
        backend = None
        if self.pool is not None and not routed:
            hashed = str(client_ip(peer[0])) if self.pool.balance == "source-hash" else None
            backend = self.pool.pick(hashed, time.monotonic(), (), preferred)
            assert backend is not None  # a pool has a backend; none was tried yet
            target = resolve_target(self.rule.listen, backend.spec.connect, self.port)
        assert not isinstance(target, str)
        flow_header = b""
        if self._proxied:
            own = self._own
            if self._wildcard:
                v4 = "." in peer[0]  # an IPv4 client, plain or IPv4-mapped
                own = ("0.0.0.0" if v4 else "::", own[1])
            try:
                flow_header = header(2, (peer[0], peer[1]), own, datagram=True)
            except ProxyError:  # not an IP address: cannot happen for a UDP peer; never a leak
                if self.limits is not None:
                    self.limits.done(source)
                return None
        session = self.state.open_session(self.stats, client_text, format_target(target), "udp")
        if backend is not None:
            stats = session.backend = backend.stats
            stats.active += 1
            stats.total += 1
        flow = _Flow(self, peer, key, session)
        session.relay = flow  # what the state ends it through
        flow.header = flow_header
        flow.source = source
        self.flows[key] = flow
        self.stats.udp_flows_active += 1
        log_opened(self.label, session)
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
            self._close_flow(flow, "idle timeout")  # the words a TCP session's idle_timeout uses
        self._full_logged = False
        if len(self._denied_logged) > 4096:
            self._denied_logged.clear()
        self._sweeper = self.loop.call_later(self._sweep_interval, self._sweep)

    def _close_flow(self, flow: _Flow, reason: str) -> None:
        if self.flows.pop(flow.key, None) is None:
            return
        flow.shut()
        if self.limits is not None:
            self.limits.done(flow.source)
        self.stats.udp_flows_active -= 1
        log_closed(self.label, flow.session, reason)
        self.state.close_session(flow.session, reason)

    def close_flows_to(self, backend: object, reason: str) -> None:
        """End the flows pinned to a backend that went down: their next datagram starts a flow
        to a backend that is up (a steady client would otherwise never leave it)."""
        for flow in [flow for flow in self.flows.values() if flow.session.backend is backend]:
            self._close_flow(flow, reason)

    def close(self, reason: str = "shutdown") -> None:
        """Stop reading, close every flow and the listening socket."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(OSError, ValueError):
            self.loop.remove_reader(self.listener_fd)
        for flow in list(self.flows.values()):
            self._close_flow(flow, reason)
        self.listener.close()

    @property
    def active(self) -> int:
        """Live flows."""
        return len(self.flows)
