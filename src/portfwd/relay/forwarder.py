"""One TCP forward on one listening port: admit or refuse a client, connect upstream, relay, log.

This is the per-session boundary: whatever goes wrong with one client is logged and counted
here and never reaches the listener, so one bad client or dead target never stops a rule.

The path from accept to relay is callback-driven for IP-literal and Unix targets (no Task,
no Future), because it runs once per connection and its cost sets the connection rate. Host
names take a Task for the resolver, then join the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Literal

from portfwd.acl import AccessPolicy, IPAddress, Route, client_ip
from portfwd.addr import Endpoint, HostPorts, PortRange, UnixPath, target_port
from portfwd.counters import RuleStats, Session
from portfwd.errors import UpstreamError
from portfwd.proto.proxy import ProxyError
from portfwd.relay.balance import Backend, Pool
from portfwd.relay.bandwidth import Shaper
from portfwd.relay.latekeepalive import LateKeepalive
from portfwd.relay.limits import Limits
from portfwd.relay.poller import Poller
from portfwd.relay.proxyin import read_header
from portfwd.relay.proxyout import first_bytes, listening_address, proxy_header, send_header
from portfwd.relay.sessionlog import log_closed, log_denied, log_failed, log_opened, log_refused
from portfwd.relay.splice import PipePool, SpliceRelay
from portfwd.relay.tcp import ProtocolRelay
from portfwd.relay.upstream import Addresses, Connect, literal_addresses, resolve
from portfwd.specs import RuleSpec
from portfwd.state import State

log = logging.getLogger(__name__)

RelayPath = Literal["splice", "protocol"]
#: Connect failures that say nothing of the backend's health (this host's descriptors, a
#: transparent client of the other address family): never a passive health failure.
_NOT_THE_BACKENDS = frozenset({"resources", "transparent"})
Target = tuple[str, int] | str


#: SO_LINGER on, 0 seconds: close() sends a reset, not a FIN.
_RESET = struct.pack("ii", 1, 0)


def format_peer(peer: tuple[Any, ...]) -> str:
    """`1.2.3.4:5678` or `[::1]:5678`; an IPv4 client of a dual-stack socket shows as IPv4."""
    host: str = peer[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"


def describe_peer(client: socket.socket | int, peer: Any) -> str:
    """Text for a client (a socket or a bare descriptor): `1.2.3.4:5678`, `[::1]:5678`, or a
    Unix peer's pid and uid."""
    if isinstance(peer, tuple):
        return format_peer(peer)
    borrowed: socket.socket | None = None
    try:
        if isinstance(client, int):
            client = borrowed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=client)
        creds = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        return f"unix(pid={pid},uid={uid})"
    except OSError:
        return "unix"
    finally:
        if borrowed is not None:
            borrowed.detach()  # the descriptor stays the caller's


def compile_policy(rule: RuleSpec) -> AccessPolicy:
    """The rule's allow/deny/route lists as an AccessPolicy."""
    return AccessPolicy(
        allow=rule.allow,
        deny=rule.deny,
        routes=tuple(Route(route.source, route.connect, route.backend) for route in rule.route),
    )


def resolve_target(listen: Endpoint, target: Endpoint, port: int | None) -> Target:
    """Where a client of listen port `port` goes: (host, port) keeping the range offset, or a path."""
    if isinstance(target, UnixPath):
        return target.path
    listen_ports = listen.ports if isinstance(listen, HostPorts) else PortRange(1, 1)
    chosen = target_port(listen_ports, target.ports, port if port is not None else listen_ports.first)
    return (target.host, chosen)


def route_target(
    policy: AccessPolicy, address: IPAddress | None, rule: RuleSpec, port: int | None
) -> tuple[Target | None, int | None]:
    """Where a client's route sends it: (its target, None), or (None, the backend it prefers
    while that backend is up), or (None, None) with no route: the rule's own choice."""
    route = policy.route_for(address)
    if route is None:
        return None, None
    if route.backend is not None:
        return None, route.backend
    return resolve_target(rule.listen, route.target, port), None


def format_target(target: Target) -> str:
    """Print a resolved target for logs."""
    if isinstance(target, str):
        return f"unix:{target}"
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def limit_text(rule: RuleSpec, refused: str) -> str:
    """The limit that refused a client, as the config sets it (for the log line)."""
    if refused == "max_connections":
        return f"max_connections = {rule.max_connections}"
    if refused == "max_connections_per_source":
        return f"max_connections_per_source = {rule.max_connections_per_source}"
    count, seconds = rule.rate or (0, 0.0)
    return f"rate = {count} per {seconds:g}s"


class _Pending:
    """A client waiting for its upstream connection."""

    __slots__ = (
        "backend",
        "began",
        "client",
        "client_text",
        "connect",
        "forwarder",
        "header",
        "origin",
        "preferred",
        "source",
        "target_text",
        "task",
        "tried",
    )

    def __init__(self, forwarder: TcpForwarder, client: int, client_text: str, target_text: str) -> None:
        self.forwarder = forwarder
        self.client = client
        self.client_text = client_text
        self.target_text = target_text
        self.connect: Connect | None = None
        self.task: asyncio.Task[None] | None = None
        self.began = time.monotonic()
        self.header = b""  #: the PROXY header the upstream is sent first (proxy_protocol), if any
        self.source: str | None = None  #: the client address its rule's Limits counted it under
        self.origin: str | None = None  #: the client's IP, the upstream's source (transparent)
        self.backend: Backend | None = None  #: the backend being tried (a rule with several)
        self.tried: tuple[Backend, ...] = ()  #: the backends that failed it before
        self.preferred: int | None = None  #: its route's backend

    def done(self, upstream: socket.socket | None, error: UpstreamError | None) -> None:
        self.forwarder.connected(self, upstream, error)

    def cancel(self) -> None:
        if self.connect is not None:
            self.connect.cancel()
        if self.task is not None:
            self.task.cancel()
        os.close(self.client)


class TcpForwarder:
    """Serves the clients of one listening port of one rule."""

    def __init__(
        self,
        rule: RuleSpec,
        port: int | None,
        state: State,
        path: RelayPath,
        pipes: PipePool,
        poller: Poller,
        limits: Limits | None = None,
        shaper: Shaper | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.rule = rule
        #: The rule's bandwidth limits, shared by its ports (None: none; the protocol relay paces).
        self.shaper = shaper
        #: The rule's connection limits, shared by its ports (None: it has none, and pays nothing).
        self.limits = limits
        self._limited: dict[int, str | None] = {}  # session id -> its source, while it lives
        self.port = port
        self.state = state
        self.path = path
        self.pipes = pipes
        self.poller = poller
        self.label = rule.label
        self.stats: RuleStats = state.rule(rule.label)
        self.policy = compile_policy(rule)
        self._open = self.policy.is_open
        self._default = resolve_target(rule.listen, rule.connect, port)
        #: Per target: its log text and, for IP literals and Unix paths, its addresses (computed once).
        self._targets: dict[Target, tuple[str, Addresses | None]] = {}
        #: The rule's backends (None: one target, `_default`), and each one's target from this port.
        self.pool = pool
        self._backend_targets: list[Target] = (
            [resolve_target(rule.listen, backend.spec.connect, port) for backend in pool.backends]
            if pool is not None
            else []
        )
        self._hash = pool is not None and pool.balance == "source-hash"
        #: Each backend's share of connect_timeout: up to three are tried within it (haproxy's
        #: per-attempt `timeout connect` with `retries`), so a host that drops SYNs does not
        #: take all the time the next one needs.
        self._attempt = rule.connect_timeout / min(3, len(pool.backends)) if pool is not None else 0.0
        self._transparent = rule.transparent
        #: Upstream keepalive, for the sessions that outlive a second (relay/latekeepalive.py);
        #: none when every target is a Unix socket.
        tcp_targets = any(
            not isinstance(target, UnixPath)
            for target in (
                rule.connect,
                *(b.connect for b in rule.backends),
                *(r.connect for r in rule.route),
            )
        )
        self._late = LateKeepalive(state.sessions) if rule.tcp_keepalive and tcp_targets else None
        #: The address the PROXY header names as the one clients reached, when known without asking.
        self._local = listening_address(rule.listen, port) if rule.proxy_protocol else None
        self._pending: set[_Pending] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: The loop, asked for once (on Python 3.11 each get_running_loop() is a getpid() system
        #: call: bench/RESULTS.md, D17).
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Set by the runtime to the listener's pause(): running out of descriptors while
        #: connecting upstream is the same exhaustion as failing to accept.
        self.exhausted: Callable[[str], None] | None = None
        #: A draining rule: new clients are reset at once (counted `draining`); live sessions go on.
        self.refusing = False

    def serve(self, clients: list[tuple[int, Any]]) -> None:
        """Admit or refuse the clients of one accept burst (non-blocking descriptors from
        DescriptorListener, TCP_NODELAY on); never raises.

        Every client's upstream connect begins before any is asked how it went (Connect's
        `held`). Why: to a local target each connect() wakes the target's accept loop, and a
        sleeping target costs a cross-CPU wakeup each time; connects that follow each other
        closely find it awake (bench/RESULTS.md, design measurement D2).
        """
        if self.refusing:
            self._refuse(clients)
            return
        held: list[Connect] = []
        try:
            for client, peer in clients:
                if self.rule.accept_proxy:
                    self._from_proxy(client, peer)
                else:
                    self._admit(client, peer, held)
        finally:  # the connects begun go on whatever happened to a later client
            for connect in held:
                connect.confirm()

    def _refuse(self, clients: list[tuple[int, Any]]) -> None:
        """A draining rule's new clients: reset (SO_LINGER 0), so each learns at once that this
        listener takes nobody now and a client or balancer in front tries elsewhere."""
        for client, _ in clients:
            refused = socket.socket(fileno=client)
            with contextlib.suppress(OSError):
                refused.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            refused.close()
            self.stats.count_error("draining")

    def _from_proxy(self, client: int, peer: Any) -> None:
        """A client behind a load balancer (`accept_proxy_protocol`): only from trusted_proxies;
        its PROXY header is read (in a task of its own), then it is admitted as the client the
        header names, for allow/deny, routes, logs and status alike."""
        address = client_ip(peer[0]) if isinstance(peer, tuple) else None
        if address is None or not any(address in network for network in self.rule.trusted_proxies):
            self.stats.count_error("proxy_untrusted")
            log_denied(self.label, describe_peer(client, peer), "closed", by="trusted_proxies")
            os.close(client)
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(self._after_header(loop, client, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_header(self, loop: asyncio.AbstractEventLoop, client: int, peer: Any) -> None:
        try:
            async with asyncio.timeout(self.rule.connect_timeout):
                found = await read_header(loop, client)
        except (ProxyError, OSError) as exc:  # TimeoutError is an OSError
            why = (
                f"no PROXY header within {self.rule.connect_timeout:g}s"
                if isinstance(exc, TimeoutError)
                else f"bad PROXY header: {exc}"
            )
            self.stats.count_error("proxy_header")
            log_failed(self.label, describe_peer(client, peer), "-", why)
            os.close(client)
            return
        except asyncio.CancelledError:
            os.close(client)
            raise
        real = peer if found.source is None else found.source  # LOCAL/UNKNOWN: the proxy itself
        held: list[Connect] = []
        try:
            self._admit(client, real, held)
        finally:
            for connect in held:
                connect.confirm()

    def _admit(self, client: int, peer: Any, held: list[Connect]) -> None:
        target = self._default
        preferred: int | None = None
        routed = False
        if not self._open:
            address = client_ip(peer[0]) if isinstance(peer, tuple) else None
            if not self.policy.permits(address):
                self.stats.denied_total += 1
                log_denied(self.label, describe_peer(client, peer), "closed")
                os.close(client)
                return
            chosen, preferred = route_target(self.policy, address, self.rule, self.port)
            if chosen is not None:
                target, routed = chosen, True
        source: str | None = None
        if self.limits is not None or self._hash:
            address = client_ip(peer[0]) if isinstance(peer, tuple) else None
            source = None if address is None else str(address)
        if self.limits is not None:
            refused = self.limits.admit(source)
            if refused is not None:
                self.stats.count_error(refused)
                log_refused(self.label, describe_peer(client, peer), refused, self._limit_of(refused))
                os.close(client)
                return
        pending = _Pending(self, client, describe_peer(client, peer), "")
        pending.source = source
        if self._transparent and isinstance(peer, tuple):
            pending.origin = str(peer[0])
        if self.rule.proxy_protocol:
            pending.header = proxy_header(self.rule.proxy_protocol, client, peer, self._local)
        self._pending.add(pending)
        pool = self.pool
        if pool is not None and not routed:
            pending.preferred = preferred
            backend = pool.pick(source, pending.began, (), preferred)
            assert backend is not None  # a pool has a backend; none was tried yet
            pending.backend = backend
            backend.stats.active += 1  # a connect under way counts (least-connections)
            target = self._backend_targets[backend.index]
            self._connect(pending, target, held, self._attempt)
            return
        self._connect(pending, target, held, self.rule.connect_timeout)

    def _connect(self, pending: _Pending, target: Target, held: list[Connect] | None, timeout: float) -> None:
        """Begin the upstream connect of `pending` to `target` (through the resolver for a name)."""
        known = self._targets.get(target)
        if known is None:
            known = self._targets[target] = (format_target(target), literal_addresses(target))
        pending.target_text, addresses = known
        if addresses is not None:
            attempt = pending.tried
            connect = Connect(
                addresses,
                timeout,
                pending.done,
                held,
                tcp_keepalive=False,  # turned on later, for sessions that last (`_late`)
                source=pending.origin,
            )
            if pending.tried is attempt:  # else it failed at once and the next backend's began
                pending.connect = connect
        else:
            assert not isinstance(target, str)
            pending.task = asyncio.get_running_loop().create_task(self._resolve(pending, target, timeout))

    def _limit_of(self, refused: str) -> str:
        return limit_text(self.rule, refused)

    def _release(self, pending: _Pending) -> None:
        if self.limits is not None:
            self.limits.done(pending.source)

    async def _resolve(self, pending: _Pending, target: tuple[str, int], seconds: float) -> None:
        """Resolve a host name for one client, then connect on the callback path."""
        began = time.monotonic()
        try:
            async with asyncio.timeout(seconds):
                addresses = await resolve(target[0], target[1], socket.SOCK_STREAM)
        except UpstreamError as exc:
            pending.task = None
            self.connected(pending, None, exc)
            return
        except TimeoutError:
            pending.task = None
            error = UpstreamError(f"no answer within {self.rule.connect_timeout:g}s", reason="timeout")
            self.connected(pending, None, error)
            return
        pending.task = None
        if pending in self._pending:
            attempt = pending.tried
            connect = Connect(
                addresses,
                max(0.001, seconds - (time.monotonic() - began)),
                pending.done,
                tcp_keepalive=False,  # turned on later, for sessions that last (`_late`)
                source=pending.origin,
            )
            if pending.tried is attempt:  # else it failed at once and the next backend's began
                pending.connect = connect

    def connected(
        self, pending: _Pending, upstream: socket.socket | None, error: UpstreamError | None
    ) -> None:
        """The upstream connect finished: start the relay, or close the client with a reason
        (on a rule with several backends, first try the next one while time is left)."""
        backend = pending.backend
        if backend is not None and self._failover(pending, backend, upstream, error):
            return
        self._pending.discard(pending)
        client = pending.client
        if upstream is None:
            assert error is not None
            self.stats.count_error(error.reason)
            if error.reason == "resources" and self.exhausted is not None:
                self.exhausted(error.message)
            log_failed(self.label, pending.client_text, pending.target_text, error.message)
            self._release(pending)
            self.state.connect_failed(
                self.stats, pending.client_text, pending.target_text, self.path, f"upstream: {error.message}"
            )
            os.close(client)
            return
        first = b""
        if pending.header:
            first = first_bytes(client)
        if pending.header and not send_header(upstream, pending.header + first):
            self.stats.count_error("proxy_protocol")
            log_failed(
                self.label,
                pending.client_text,
                pending.target_text,
                "upstream: the PROXY header did not go out",
            )
            self._release(pending)
            if backend is not None:
                backend.stats.active -= 1
            upstream.close()
            os.close(client)
            return
        self.stats.observe_connect(time.monotonic() - pending.began)
        session = self.state.open_session(self.stats, pending.client_text, pending.target_text, self.path)
        session.bytes_up = len(first)  # what went with the PROXY header
        if backend is not None:
            stats = session.backend = backend.stats  # `active` was counted at the pick
            stats.total += 1
        if self.limits is not None:
            self._limited[session.id] = pending.source
        wrapped: socket.socket | None = None
        try:
            if self.path == "splice":
                splice = SpliceRelay(client, upstream.detach(), session, self, self.pipes, self.poller)
                session.relay = splice
                splice.start()
                if self._late is not None:
                    self._late.add((session.id, splice.upstream))
            else:
                relay = ProtocolRelay(session, self, self.shaper)
                session.relay = relay
                wrapped = socket.socket(fileno=client)
                loop = self._loop
                if loop is None:
                    loop = self._loop = asyncio.get_running_loop()
                task = loop.create_task(relay.start(wrapped, upstream, loop))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                if self._late is not None:
                    self._late.add(upstream.fileno)  # -1 once its transport closed it
        except Exception:  # per-session boundary: log, count, keep serving others
            self.stats.count_error("internal")
            log.exception("%s: %s -> %s: relay failed to start", self.label, session.client, session.target)
            if isinstance(session.relay, SpliceRelay):
                session.relay.close("internal error")  # it owns both descriptors; it ends the session
                return
            if wrapped is not None:
                wrapped.close()
            else:
                with contextlib.suppress(OSError):
                    os.close(client)
            upstream.close()
            if self.limits is not None and session.id in self._limited:
                self.limits.done(self._limited.pop(session.id))
            self.state.close_session(session, "internal error")
            return
        log_opened(self.label, session)

    def _failover(
        self, pending: _Pending, backend: Backend, upstream: socket.socket | None, error: UpstreamError | None
    ) -> bool:
        """Tell the pool how the connect to `backend` went; after a failure, begin a connect to
        the next backend if there is one and time left (True: the client waits on)."""
        pool = self.pool
        assert pool is not None
        if upstream is not None:
            pool.connected(backend)
            return False
        assert error is not None
        backend.stats.active -= 1  # counted at the pick (least-connections sees connects under way)
        if error.reason not in _NOT_THE_BACKENDS:
            now = time.monotonic()
            pool.failed(backend, now, error.message)
        else:
            now = time.monotonic()
        left = self.rule.connect_timeout - (now - pending.began)
        if left <= 0 or pending not in self._pending or error.reason in _NOT_THE_BACKENDS:
            return False
        pending.tried += (backend,)
        following = pool.pick(pending.source, now, pending.tried, pending.preferred)
        if following is None:
            return False
        log.debug(
            "%s: %s -> %s: %s; trying %s",
            self.label,
            pending.client_text,
            pending.target_text,
            error.message,
            following.spec.name,
        )
        pending.backend = following
        following.stats.active += 1
        pending.connect = None
        last = len(pending.tried) + 1 >= min(3, len(pool.backends))  # no share kept for a next one
        self._connect(
            pending, self._backend_targets[following.index], None, left if last else min(left, self._attempt)
        )
        return True

    def relay_closed(self, session: Session, reason: str) -> None:
        """Called once by a relay when it has ended: log the session and fold its counters."""
        if self.limits is not None and session.id in self._limited:
            self.limits.done(self._limited.pop(session.id))
        log_closed(self.label, session, reason)
        session.relay = None
        self.state.close_session(session, reason)

    def close_pending(self) -> None:
        """Abandon clients still waiting for their upstream (shutdown)."""
        for pending in list(self._pending):
            pending.cancel()
            self._release(pending)
            if pending.backend is not None:
                pending.backend.stats.active -= 1
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()
