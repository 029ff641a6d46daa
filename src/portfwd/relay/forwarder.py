"""One TCP forward on one listening port: admit or refuse a client, connect upstream, relay, log.

This is the per-session boundary: whatever goes wrong with one client is logged and counted
here and never reaches the listener, so one bad client or dead target never stops a rule.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Any, Literal, Protocol

from portfwd.acl import AccessPolicy, Route, client_ip
from portfwd.addr import Endpoint, HostPorts, PortRange, UnixPath, target_port
from portfwd.config import ForwardConfig
from portfwd.errors import UpstreamError
from portfwd.relay.splice import SpliceRelay
from portfwd.relay.tcp import ProtocolRelay
from portfwd.relay.upstream import connect_within, stream_options
from portfwd.state import RuleStats, Session, State

log = logging.getLogger(__name__)

RelayPath = Literal["splice", "protocol"]


class Relay(Protocol):
    """What the forwarder needs of a running relay."""

    def close(self, reason: str) -> None: ...


def describe_peer(client: socket.socket, peer: Any) -> str:
    """Text for a client: `1.2.3.4:5678`, `[::1]:5678`, or a Unix peer's pid and uid."""
    if client.family == socket.AF_UNIX:
        try:
            creds = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", creds)
            return f"unix(pid={pid},uid={uid})"
        except OSError:
            return "unix"
    host, port = peer[0], peer[1]
    mapped = client_ip(host)
    if mapped is not None and mapped.version == 4:
        host = str(mapped)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def compile_policy(rule: ForwardConfig) -> AccessPolicy:
    """The rule's allow/deny/route lists as an AccessPolicy."""
    return AccessPolicy(
        allow=rule.allow,
        deny=rule.deny,
        routes=tuple(Route(route.source, route.connect) for route in rule.route),
    )


def resolve_target(listen: Endpoint, target: Endpoint, port: int | None) -> tuple[str, int] | str:
    """Where a client of listen port `port` goes: (host, port) keeping the range offset, or a path."""
    if isinstance(target, UnixPath):
        return target.path
    listen_ports = listen.ports if isinstance(listen, HostPorts) else PortRange(1, 1)
    chosen = target_port(listen_ports, target.ports, port if port is not None else listen_ports.first)
    return (target.host, chosen)


def format_target(target: tuple[str, int] | str) -> str:
    """Print a resolved target for logs."""
    if isinstance(target, str):
        return f"unix:{target}"
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TcpForwarder:
    """Serves the clients of one listening port of one rule."""

    def __init__(self, rule: ForwardConfig, port: int | None, state: State, path: RelayPath) -> None:
        self.rule = rule
        self.port = port
        self.state = state
        self.path = path
        self.stats: RuleStats = state.rule(rule.label)
        self.policy = compile_policy(rule)
        self._default = resolve_target(rule.listen, rule.connect, port)
        self._relays: dict[int, Relay] = {}
        self._connecting: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    @property
    def label(self) -> str:
        """The rule's name, for logs."""
        return self.rule.label

    def serve(self, client: socket.socket, peer: Any) -> None:
        """Admit or refuse a freshly accepted client; never raises."""
        try:
            client.setblocking(False)
            target = self._default
            if not self.policy.is_open:
                address = client_ip(peer[0]) if isinstance(peer, tuple) else None
                if not self.policy.permits(address):
                    self.stats.denied_total += 1
                    log.info(
                        "%s: %s denied by allow/deny; closed",
                        self.label,
                        describe_peer(client, peer),
                    )
                    client.close()
                    return
                chosen = self.policy.target_for(address, self.rule.connect)
                if chosen is not self.rule.connect:
                    target = resolve_target(self.rule.listen, chosen, self.port)
            stream_options(client)
        except OSError as exc:  # the client vanished between accept and here
            log.debug("%s: client gone before it was served: %s", self.label, exc)
            client.close()
            return
        task = self._loop.create_task(self._connect(client, peer, target))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, client: socket.socket, peer: Any, target: tuple[str, int] | str) -> None:
        client_text = describe_peer(client, peer)
        target_text = format_target(target)
        started = time.monotonic()
        try:
            upstream = await connect_within(target, self.rule.connect_timeout)
        except UpstreamError as exc:
            self.stats.count_error(exc.reason)
            log.info(
                "%s: %s -> %s failed: %s; client closed",
                self.label,
                client_text,
                target_text,
                exc.message,
            )
            client.close()
            return
        except asyncio.CancelledError:
            client.close()
            raise
        except Exception:  # per-session boundary: log, count, keep serving others
            self.stats.count_error("internal")
            log.exception(
                "%s: %s -> %s: unexpected error while connecting",
                self.label,
                client_text,
                target_text,
            )
            client.close()
            return
        session = self.state.open_session(self.stats, client_text, target_text, self.path)
        log.info("%s: %s -> %s open (%s)", self.label, client_text, target_text, self.path)

        def closed(reason: str) -> None:
            self._relays.pop(session.id, None)
            self._log_close(session, reason, started)
            self.state.close_session(session)

        try:
            if self.path == "splice":
                splice = SpliceRelay(client, upstream, session, closed)
                self._relays[session.id] = splice
                splice.start()
            else:
                relay = ProtocolRelay(session, closed)
                self._relays[session.id] = relay
                await relay.start(client, upstream)
        except Exception:  # per-session boundary
            self.stats.count_error("internal")
            log.exception("%s: %s -> %s: relay failed to start", self.label, client_text, target_text)
            client.close()
            upstream.close()
            if self._relays.pop(session.id, None) is not None:
                self.state.close_session(session)

    def _log_close(self, session: Session, reason: str, started: float) -> None:
        log.info(
            "%s: %s -> %s closed (%s): %d B up, %d B down, %.3fs",
            self.label,
            session.client,
            session.target,
            reason,
            session.bytes_up,
            session.bytes_down,
            time.monotonic() - started,
        )

    def close_sessions(self, reason: str) -> None:
        """Close every live session of this forwarder and cancel pending connects."""
        for task in list(self._connecting):
            task.cancel()
        for relay in list(self._relays.values()):
            relay.close(reason)

    @property
    def active(self) -> int:
        """Live sessions plus clients still connecting."""
        return len(self._relays) + len(self._connecting)
