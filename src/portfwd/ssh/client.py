"""One SSH tunnel: its local listeners, its connection (via jump hosts), its forwards, its retries.

Local listeners (-L, -D) are bound once at start and stay bound while the link is down: a client
that arrives then waits up to `connect_timeout` for the link and is served or closed, never
refused. The connection task loops: connect, verify the host key, ask for the remote forwards
(-R), wait until the link dies (keepalive finds a dead peer), back off with jitter, again.
A first connect that fails for good (errors.py's `permanent`: unknown host name, keys refused,
no algorithm in common) is not retried, as with ssh, unless `retry_first_connect`:
`portfwd ssh` exits 1, a [[tunnel]] stays failed; only a link that once worked is retried. A
host key that does not verify is never retried.

The connection is ssh/connection.py, the SOCKS front ssh/socks.py, the -R side ssh/forwarded.py,
and every session lives in the layer the server shares (ssh/sessions.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh

from portfwd.counters import RuleStats, TunnelForwardStats, TunnelStats
from portfwd.errors import BindError, PortfwdError, RuntimeFailure
from portfwd.logevents import event
from portfwd.relay.forwarder import describe_peer, format_peer
from portfwd.relay.listener import TcpListener, bind_ip, bind_unix
from portfwd.relay.sessionlog import log_failed, log_opened
from portfwd.relay.upstream import stream_options
from portfwd.specs import TunnelSpec
from portfwd.ssh import connection
from portfwd.ssh.bridge import Bridge
from portfwd.ssh.errors import Reason, SshError, ssh_error
from portfwd.ssh.forwarded import RemoteForwards
from portfwd.ssh.hostkeys import HostKeyError
from portfwd.ssh.sessions import PACKET, WINDOW, Sessions
from portfwd.ssh.socks import SocksFront
from portfwd.state import State
from portfwd.tunnelspec import TunnelForward

__all__ = ["Fatal", "Forward", "Tunnel"]

log = logging.getLogger(__name__)

Fatal = Callable[[PortfwdError], None]


class Forward:
    """One configured forward and what runs for it now."""

    def __init__(self, spec: TunnelForward, stats: TunnelForwardStats) -> None:
        self.spec = spec
        self.stats = stats
        self.listeners: list[TcpListener] = []
        self.remote: asyncssh.SSHListener | None = None


def _bind_sockets(what: str, spec: TunnelForward, keep: bool, family: int = 0) -> list[socket.socket]:
    """The listening sockets for a -L or -D: its path, its address, or (like ssh) 127.0.0.1 and ::1
    (only one of them with -4/-6; "" then means every address of that family)."""
    if spec.path is not None:
        return [bind_unix(what, spec.path, backlog=1024)]

    def bind(host: str, port: int) -> socket.socket:
        return bind_ip(
            what, host, port, socket.SOCK_STREAM, backlog=1024, dual_stack=False, tcp_keepalive=keep
        )

    if family == socket.AF_INET6:
        return [bind("::1" if spec.bind is None else spec.bind or "::", spec.port)]
    if spec.bind is not None:
        return [bind(spec.bind or ("0.0.0.0" if family == socket.AF_INET else ""), spec.port)]
    sockets = [bind("127.0.0.1", spec.port)]
    if family == socket.AF_INET:
        return sockets
    with contextlib.suppress(BindError):  # like ssh: ::1 too, when the machine has IPv6
        sockets.append(bind("::1", sockets[0].getsockname()[1]))
    return sockets


def _listen_text(bind: str | None, port: int) -> str:
    """How a bound -L/-D port shows in status: `127.0.0.1:8080`, `[::1]:8080`, `*:8080`."""
    bind = "127.0.0.1" if bind is None else bind
    return f"{bind or '*'}:{port}" if ":" not in bind else f"[{bind}]:{port}"


class Tunnel:
    """Runs one [[tunnel]]: start() binds and launches the link task, stop() ends everything."""

    def __init__(
        self,
        config: TunnelSpec,
        state: State,
        fatal: Fatal,
        *,
        exit_on_auth: bool = False,
        fast_path: bool = True,
    ) -> None:
        self.config = config
        self.fast_path = fast_path
        self.state = state
        self.fatal = fatal
        self.exit_on_auth = exit_on_auth
        self.label = config.label
        user, host, port = config.user, config.host, config.port
        self.stats = TunnelStats(
            self.label, f"{user + '@' if user else ''}{host}{':' + str(port) if port else ''}"
        )
        self.forwards = [
            Forward(
                spec,
                TunnelForwardStats(
                    str(spec),
                    spec.kind,
                    spec.listen_text,
                    spec.target_text,
                    stats=RuleStats("", idle_timeout=config.idle_timeout or 0.0),
                ),
            )
            for spec in config.forwards
        ]
        self.stats.forwards = [forward.stats for forward in self.forwards]
        for forward in self.forwards:
            forward.stats.stats.name = f"{self.label} {forward.stats.spec}"
        self.conn: asyncssh.SSHClientConnection | None = None
        self.sessions = Sessions(state, "ssh", label=self.label, logger=log)
        self.socks = SocksFront(self)
        self.forwarded = RemoteForwards(self)
        self._jumps: list[asyncssh.SSHClientConnection] = []
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._connected_once = False
        self._lost_reason = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> list[BindError]:
        """Bind every local listener (-L, -D) and start the link task; returns bind failures."""
        failures: list[BindError] = []
        for forward in self.forwards:
            if forward.spec.kind == "remote":
                continue
            try:
                self._bind(forward)
            except BindError as exc:
                forward.stats.state = "failed"
                forward.stats.error = exc.message
                failures.append(exc)
                if not self.config.exit_on_forward_failure:
                    log.error(
                        "%s: %s",
                        self.label,
                        exc.line(),
                        extra=event(
                            "forward.failed", tunnel=self.label, forward=str(forward.spec), reason=exc.message
                        ),
                    )
                else:
                    self.fatal(
                        RuntimeFailure(f"{self.label}: {forward.spec}: {exc.message} (ExitOnForwardFailure)")
                    )
        self.state.tunnels.append(self.stats)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return failures

    def socket_paths(self) -> list[str]:
        """The Unix socket files this tunnel listens on (made at start; removed at exit)."""
        return [
            forward.spec.path
            for forward in self.forwards
            if forward.spec.kind != "remote" and forward.spec.path is not None
        ]

    def _bind(self, forward: Forward) -> None:
        spec = forward.spec
        what = f"{self.label} {'-L' if spec.kind == 'local' else '-D'} {spec.listen_text}"
        sockets = _bind_sockets(what, spec, self.config.tcp_keepalive, self.config.family)
        serve = self.socks.serve if spec.is_socks else self._serve_local
        for sock in sockets:
            listener = TcpListener(sock, functools.partial(serve, forward), self.label)
            listener.start()
            forward.listeners.append(listener)
        if spec.path is None:
            forward.stats.listen = _listen_text(spec.bind, sockets[0].getsockname()[1])
        forward.stats.state = "listening"
        log.info(
            "%s: %s listening on %s -> %s",
            self.label,
            forward.stats.spec.split()[0],
            forward.stats.listen,
            spec.target_text,
            extra=event(
                "forward.listening",
                tunnel=self.label,
                forward=forward.stats.spec,
                listen=forward.stats.listen,
                target=spec.target_text,
            ),
        )

    def stop_accepting(self) -> None:
        """Close the local listeners (shutdown begins: live sessions may still drain)."""
        for forward in self.forwards:
            for listener in forward.listeners:
                listener.close()
            forward.listeners.clear()

    async def stop(self) -> None:
        """Close listeners, end sessions (awaiting their tasks), cancel the -R forwards and the link."""
        self._stopping = True
        self.stop_accepting()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sessions.stop("shutdown")
        await self._disconnect()
        self.stats.enter("stopped")

    async def _disconnect(self) -> None:
        self._up.clear()
        conns = [conn for conn in [self.conn, *reversed(self._jumps)] if conn is not None]
        self.conn, self._jumps = None, []
        await connection.close(conns)

    # ------------------------------------------------------------------ the link
    def _note_lost(self, reason: str) -> None:
        self._lost_reason = reason

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            self.stats.enter("connecting")
            try:
                conn = await connection.connect(self.config, self.fast_path, self._jumps, self._note_lost)
            except HostKeyError as exc:
                # Never retried: a changed key may be an attack, an unknown one needs a person.
                await self._disconnect()
                self.stats.enter("failed", exc.message)
                if self.exit_on_auth:
                    self.fatal(exc)
                else:
                    log.error(
                        "%s: %s; this tunnel stays down until reload",
                        self.label,
                        exc.line(),
                        extra=event(
                            "tunnel.failed", tunnel=self.label, server=self.stats.server, reason=exc.message
                        ),
                    )
                return
            except (OSError, asyncssh.Error, PortfwdError, asyncssh.KeyImportError) as exc:
                # TimeoutError is an OSError; KeyImportError (a ValueError) is a key from ssh_config
                await self._disconnect()
                error = ssh_error(exc)
                auth = isinstance(exc, asyncssh.PermissionDenied)
                text = f"authentication failed: {error.message}" if auth else error.message
                if isinstance(exc, asyncssh.KeyExchangeFailed):
                    text = f"no algorithm in common with the server: {error.message}"
                if error.permanent and not self._connected_once and not self.config.retry_first_connect:
                    # As ssh: what a retry cannot mend ends it at once; only a link that worked is retried.
                    self._give_up(text, "check -i KEY, the agent and the user" if auth else None)
                    return
                await self._backoff(attempt, text)
                attempt += 1
                if error.reason == Reason.AUTH:
                    continue  # a server that refuses keys backs off, but is not counted (as before)
                if self.config.reconnect_attempts and attempt >= self.config.reconnect_attempts:
                    self._give_up(f"gave up after {attempt} attempts: {text}", None, retried=True)
                    return
                continue
            await self._serve_link(conn)
            attempt = 0  # the link worked: a later outage backs off and counts from the start
            if self._stopping:
                return
            reason = self._lost_reason or "connection lost"
            log.warning(
                "%s: link to %s lost (%s)",
                self.label,
                self.stats.server,
                reason,
                extra=event("tunnel.lost", tunnel=self.label, server=self.stats.server, reason=reason),
            )
            self.sessions.close_all("tunnel down")
            await self._disconnect()
            await self._backoff(0, f"link lost: {reason}")

    def _give_up(self, text: str, hint: str | None, *, retried: bool = False) -> None:
        """A first connect failed for good, or `reconnect_attempts` ran out (`retried`): end
        `portfwd ssh` (exit 1), or leave this [[tunnel]] failed; the instance's other tunnels
        and rules go on."""
        self.stats.enter("failed", text)
        if self.exit_on_auth:
            self.fatal(RuntimeFailure(f"{self.label}: {text}", hint=hint))
            return
        after = "" if retried else " (retry_first_connect = true retries it)"
        log.error(
            "%s: %s; this tunnel stays down until reload%s",
            self.label,
            f"{text}; {hint}" if hint else text,
            after,
            extra=event("tunnel.failed", tunnel=self.label, server=self.stats.server, reason=text),
        )

    async def _serve_link(self, conn: asyncssh.SSHClientConnection) -> None:
        """The link is up: ask for the -R forwards, and wait until it ends."""
        self.conn = conn
        self._lost_reason = ""
        if self._connected_once:
            self.stats.reconnects += 1
        self._connected_once = True
        self.stats.enter("up")
        self._up.set()
        peer = conn.get_extra_info("peername")
        where = format_peer(peer) if isinstance(peer, tuple) and len(peer) >= 2 else "through the jump host"
        log.info(
            "%s: connected to %s (%s)",
            self.label,
            self.stats.server,
            where,
            extra=event("tunnel.connected", tunnel=self.label, server=self.stats.server, address=where),
        )
        requests = asyncio.get_running_loop().create_task(self.forwarded.request(conn))
        try:
            await conn.wait_closed()
        finally:
            requests.cancel()
            (outcome,) = await asyncio.gather(requests, return_exceptions=True)
            if isinstance(outcome, Exception):
                message = ssh_error(outcome).message
                log.error(
                    "%s: asking for the -R forwards failed: %s",
                    self.label,
                    message,
                    exc_info=outcome,
                    extra=event("forward.failed", tunnel=self.label, forward="-R", reason=message),
                )
        self._up.clear()
        for forward in self.forwards:
            forward.remote = None
            if forward.spec.kind == "remote":
                forward.stats.state = "waiting"

    async def _backoff(self, attempt: int, error: str) -> None:
        delay = connection.backoff(self.config, attempt)
        self.stats.enter("backoff", error)
        log.warning(
            "%s: %s; reconnecting in %.1fs",
            self.label,
            error,
            delay,
            extra=event(
                "tunnel.retry", tunnel=self.label, server=self.stats.server, reason=error, delay_s=delay
            ),
        )
        await asyncio.sleep(delay)

    async def link(self) -> asyncssh.SSHClientConnection | None:
        """The connection, waiting up to connect_timeout while it is down; None if it stays down."""
        if self.conn is not None and self._up.is_set():
            return self.conn
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.connect_timeout):
                await self._up.wait()
        return self.conn if self._up.is_set() else None

    # ------------------------------------------------------------------ -L (and -D's channel)
    def _serve_local(self, forward: Forward, client: socket.socket, peer: Any) -> None:
        self.sessions.spawn(self._local_client(forward, client, describe_peer(client, peer)), client=client)

    async def _local_client(self, forward: Forward, client: socket.socket, text: str) -> None:
        spec = forward.spec
        client.setblocking(False)
        with contextlib.suppress(OSError):
            stream_options(client, client.family)
        bridge = self.bridge(forward, text, spec.target_text)
        error = await self.open_channel(forward, bridge, client, spec.host, spec.host_port, spec.target_path)
        if error is not None:
            self.failed(forward, bridge, client, error)
            return
        await self.attach(bridge, client)

    async def open_channel(
        self,
        forward: Forward,
        bridge: Bridge,
        client: socket.socket,
        host: str | None,
        port: int,
        path: str | None,
    ) -> SshError | None:
        """Open the channel for a local client's bridge; None when open, else why not.

        A shutdown meanwhile ends the session (`failed`) and passes the cancellation on.
        """
        try:
            conn = await self.link()
            if conn is None:
                raise SshError(
                    f"tunnel down (no link within {self.config.connect_timeout:g}s)", reason=Reason.DOWN
                )
            opened: Awaitable[object]
            if path is not None:
                opened = conn.create_unix_connection(
                    bridge.unix_session, path, encoding=None, window=WINDOW, max_pktsize=PACKET
                )
            else:
                assert host is not None
                opened = conn.create_connection(
                    bridge.channel_session, host, port, window=WINDOW, max_pktsize=PACKET
                )
            await self.sessions.deadlines.within(self.config.connect_timeout, opened)
        except (OSError, asyncssh.Error, SshError) as exc:  # TimeoutError is an OSError
            return ssh_error(exc)
        except asyncio.CancelledError:  # shutdown while the channel was opening
            self.failed(forward, bridge, client, SshError("shutdown", reason=Reason.CLOSED))
            raise
        return None

    def failed(self, forward: Forward, bridge: Bridge, client: socket.socket, error: SshError) -> None:
        """A local client's channel did not open: count it (the server's refusal, a timeout, the
        link down), log it, close the client and end its session."""
        counter = "refused" if error.peer else "timeout" if error.reason == Reason.TIMEOUT else "down"
        if not self._stopping:
            forward.stats.stats.count_error(counter)
        session = bridge.session
        log_failed(self.label, session.client, session.target, error.message, log, rule=session.rule.name)
        client.close()
        bridge.close(error.message)

    # ------------------------------------------------------------------ sessions
    def bridge(self, forward: Forward, client: str, target: str) -> Bridge:
        """A new session of `forward` (a -R one counts channel bytes as "up")."""
        return self.sessions.bridge(
            forward.stats.stats, client, target, channel_is_client=forward.spec.kind == "remote"
        )

    async def attach(self, bridge: Bridge, sock: socket.socket) -> None:
        """Give a connected socket to the bridge, and log the session open."""
        if await self.sessions.attach(bridge, sock):
            log_opened(self.label, bridge.session, log)
