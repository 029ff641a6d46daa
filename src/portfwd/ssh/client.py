"""One SSH tunnel: its local listeners, its connection (via jump hosts), its forwards, its retries.

Local listeners (-L, -D) are bound once at start and stay bound while the link is down: a client
that arrives then waits up to `connect_timeout` for the link and is served or closed, never
refused. The connection task loops: connect, verify the host key, ask for the remote forwards
(-R), wait until the link dies (keepalive finds a dead peer), back off with jitter, again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh

from portfwd import sshalgorithms
from portfwd.errors import BindError, PortfwdError, RuntimeFailure, UpstreamError
from portfwd.proto.socks import Reply, SocksAuthError, SocksError, SocksServer
from portfwd.relay.deadline import Deadlines
from portfwd.relay.forwarder import describe_peer, log_closed
from portfwd.relay.listener import TcpListener, bind_ip, bind_unix
from portfwd.relay.upstream import Connect, literal_addresses, resolve, stream_options
from portfwd.specs import TunnelSpec
from portfwd.ssh.bridge import Bridge
from portfwd.ssh.cork import CorkedConnector
from portfwd.ssh.hostkeys import HostKeyCheck, HostKeyError
from portfwd.ssh.lean import fix, tune
from portfwd.ssh.limits import Failures
from portfwd.state import RuleStats, Session, State, TunnelForwardStats, TunnelStats
from portfwd.tunnelspec import TunnelForward, parse_destination

log = logging.getLogger(__name__)

#: SSH channel window and packet size. asyncssh's defaults (2 MiB, 32 KiB) cap one channel's
#: throughput at window/RTT; 8 MiB windows with 256 KiB packets measured faster here (bench/).
WINDOW = 8 * 1024 * 1024
PACKET = 256 * 1024
SOCKS_HANDSHAKE_TIMEOUT = 10.0
#: A wrong SOCKS5 password is answered this much later, and this many from one source within
#: a minute lock that source out for the rest of the minute: thousands of guesses a second
#: become a few.
SOCKS_AUTH_DELAY = 1.0
SOCKS_AUTH_LIMIT = 10
SOCKS_AUTH_PARALLEL = 8

Fatal = Callable[[PortfwdError], None]


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.DisconnectError | asyncssh.ChannelOpenError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def socks_reply_for(exc: BaseException) -> Reply:
    """The SOCKS reply code for why an upstream (a channel, a local connect) did not open."""
    if isinstance(exc, asyncssh.ChannelOpenError):
        if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
            return Reply.NOT_ALLOWED
        text = exc.reason.lower()
    elif isinstance(exc, UpstreamError):
        return {
            "refused": Reply.CONNECTION_REFUSED,
            "unreachable": Reply.HOST_UNREACHABLE,
            "timeout": Reply.TTL_EXPIRED,
            "resolve": Reply.HOST_UNREACHABLE,
        }.get(exc.reason, Reply.GENERAL_FAILURE)
    elif isinstance(exc, TimeoutError):
        return Reply.TTL_EXPIRED
    else:
        text = str(exc).lower()
    for words, code in (
        ("refused", Reply.CONNECTION_REFUSED),
        ("network is unreachable", Reply.NETWORK_UNREACHABLE),
        ("no route", Reply.HOST_UNREACHABLE),
        ("unreachable", Reply.HOST_UNREACHABLE),
        ("name or service", Reply.HOST_UNREACHABLE),
        ("resolve", Reply.HOST_UNREACHABLE),
        ("getaddrinfo", Reply.HOST_UNREACHABLE),
        ("timed out", Reply.TTL_EXPIRED),
        ("prohibited", Reply.NOT_ALLOWED),
    ):
        if words in text:
            return code
    return Reply.GENERAL_FAILURE


async def connect_local(
    target: tuple[str, int] | str, within: float, *, tcp_keepalive: bool = True
) -> socket.socket:
    """Connect to a local target (host:port or Unix path) for a -R channel. Raises UpstreamError."""
    addresses = literal_addresses(target)
    if addresses is None:
        assert not isinstance(target, str)
        async with asyncio.timeout(within):
            addresses = await resolve(target[0], target[1], socket.SOCK_STREAM)
    done: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()

    def finished(sock: socket.socket | None, error: UpstreamError | None) -> None:
        if done.done():
            if sock is not None:
                sock.close()
        elif sock is not None:
            done.set_result(sock)
        else:
            done.set_exception(error or UpstreamError("connect failed", reason="error"))

    connect = Connect(addresses, within, finished, tcp_keepalive=tcp_keepalive)
    try:
        return await done
    finally:
        connect.cancel()


class _Client(asyncssh.SSHClient):
    """Hands asyncssh's host-key question to our check, and notes why the link ended."""

    def __init__(self, check: HostKeyCheck, lost: Callable[[str], None]) -> None:
        self.check = check
        self.lost = lost

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        fix(conn)  # before the key exchange, fast path or not: a server's guessed packet (lean/kex.py)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost(_error_text(exc) if exc is not None else "closed by the server")

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        return self.check.validate(host, addr, port, key)


class _Forward:
    """One configured forward and what runs for it now."""

    def __init__(self, spec: TunnelForward, stats: TunnelForwardStats) -> None:
        self.spec = spec
        self.stats = stats
        self.listeners: list[TcpListener] = []
        self.remote: asyncssh.SSHListener | None = None


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
        self.user, self.host, self.port = config.user, config.host, config.port
        server = (
            f"{self.user + '@' if self.user else ''}{self.host}{':' + str(self.port) if self.port else ''}"
        )
        self.stats = TunnelStats(self.label, server)
        self.forwards = [
            _Forward(
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
        self._jumps: list[asyncssh.SSHClientConnection] = []
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bridges: set[Bridge] = set()
        self._deadlines = Deadlines()  # channel opens: one timer for all
        self._socks_failures = Failures(SOCKS_AUTH_LIMIT)
        self._socks_handshakes: Counter[str] = Counter()  # per source, while a password is asked
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
                    log.error("%s: %s", self.label, exc.line())
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

    def _bind(self, forward: _Forward) -> None:
        spec = forward.spec
        what = f"{self.label} {'-L' if spec.kind == 'local' else '-D'} {spec.listen_text}"
        keep = self.config.tcp_keepalive
        if spec.path is not None:
            sockets = [bind_unix(what, spec.path, backlog=1024)]
        elif spec.bind is None:
            sockets = [
                bind_ip(
                    what,
                    "127.0.0.1",
                    spec.port,
                    socket.SOCK_STREAM,
                    backlog=1024,
                    dual_stack=False,
                    tcp_keepalive=keep,
                )
            ]
            with contextlib.suppress(BindError):  # like ssh: ::1 too, when the machine has IPv6
                port = sockets[0].getsockname()[1]
                sockets.append(
                    bind_ip(
                        what,
                        "::1",
                        port,
                        socket.SOCK_STREAM,
                        backlog=1024,
                        dual_stack=False,
                        tcp_keepalive=keep,
                    )
                )
        else:
            sockets = [
                bind_ip(
                    what,
                    spec.bind,
                    spec.port,
                    socket.SOCK_STREAM,
                    backlog=1024,
                    dual_stack=False,
                    tcp_keepalive=keep,
                )
            ]
        serve = self._serve_socks if spec.is_socks else self._serve_local
        for sock in sockets:
            listener = TcpListener(sock, functools.partial(serve, forward), self.label)
            listener.start()
            forward.listeners.append(listener)
        if spec.path is None:
            port = sockets[0].getsockname()[1]
            bind = "127.0.0.1" if spec.bind is None else spec.bind
            forward.stats.listen = f"{bind or '*'}:{port}" if ":" not in bind else f"[{bind}]:{port}"
        forward.stats.state = "listening"
        log.info(
            "%s: %s listening on %s -> %s",
            self.label,
            forward.stats.spec.split()[0],
            forward.stats.listen,
            spec.target_text,
        )

    def stop_accepting(self) -> None:
        """Close the local listeners (shutdown begins: live sessions may still drain)."""
        for forward in self.forwards:
            for listener in forward.listeners:
                listener.close()
            forward.listeners.clear()

    async def stop(self) -> None:
        """Close listeners, end sessions, cancel the remote forwards and the connection."""
        self._stopping = True
        self.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for bridge in list(self._bridges):
            bridge.close("shutdown")
        self._deadlines.close()
        await self._disconnect()
        self.stats.enter("stopped")

    async def _disconnect(self) -> None:
        self._up.clear()
        conns = [conn for conn in [self.conn, *reversed(self._jumps)] if conn is not None]
        self.conn = None
        self._jumps = []
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await conn.wait_closed()

    # ------------------------------------------------------------------ the link
    def _options(self, check: HostKeyCheck, host: str, port: int | None, user: str | None) -> dict[str, Any]:
        config = self.config
        known = check.known_hosts()
        options: dict[str, Any] = {
            "known_hosts": known,
            "client_factory": lambda: _Client(check, self._note_lost),
            "connect_timeout": config.connect_timeout,
            "keepalive_interval": config.keepalive_interval,
            "keepalive_count_max": config.keepalive_count,
            "password_auth": False,
            "kbdint_auth": False,
        }
        if port is not None:
            options["port"] = port
        if user is not None:
            options["username"] = user
        if config.identity:
            options["client_keys"] = [os.path.expanduser(item) for item in config.identity]
        if not config.agent:
            options["agent_path"] = None
        if config.ssh_config is not None:
            options["config"] = [os.path.expanduser(item) for item in config.ssh_config]
        options["compression_algs"] = ["zlib@openssh.com", "zlib", "none"] if config.compression else ["none"]
        # OpenSSH's algorithm sets or stricter (sshalgorithms.py), as narrowed by the config; they
        # override ssh_config's. Host keys: what known_hosts holds for this host first.
        options.update(sshalgorithms.client_options(config.kex, config.ciphers, config.macs))
        ssh_config = options.get("config", ())  # () is asyncssh's default: ~/.ssh/config
        options["server_host_key_algs"] = check.host_key_algorithms(known, host, port, ssh_config)
        return options

    async def _connect(self) -> asyncssh.SSHClientConnection:
        """Connect through the jump hosts (each verified the same way) to the server."""
        accept_new = self.config.strict_host_key_checking == "accept-new"
        tunnel: asyncssh.SSHClientConnection | None = None
        for jump in self.config.jump:
            user, host, port = parse_destination(jump)
            check = HostKeyCheck(list(self.config.known_hosts), accept_new, self.config.host_key_algorithms)
            options = self._options(check, host, port, user)
            try:
                tunnel = await asyncssh.connect(host, tunnel=tunnel, **options)
            except asyncssh.HostKeyNotVerifiable as exc:
                raise check.problem or HostKeyError(f"jump host {host}: {exc.reason}") from exc
            tune(tunnel, self.fast_path)
            self._jumps.append(tunnel)
        check = HostKeyCheck(list(self.config.known_hosts), accept_new, self.config.host_key_algorithms)
        options = self._options(check, self.host, self.port, self.user)
        try:
            conn = await asyncssh.connect(self.host, tunnel=tunnel or CorkedConnector(), **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise check.problem or HostKeyError(f"{self.host}: {exc.reason}") from exc
        tune(conn, self.fast_path)
        return conn

    def _note_lost(self, reason: str) -> None:
        self._lost_reason = reason

    def _delay(self, attempt: int) -> float:
        base = min(self.config.reconnect_max, self.config.reconnect_min * (2 ** min(attempt, 30)))
        return random.uniform(base / 2, base)

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            self.stats.enter("connecting")
            try:
                conn = await self._connect()
            except HostKeyError as exc:
                # Never retried: a changed key may be an attack, an unknown one needs a person.
                await self._disconnect()
                self.stats.enter("failed", exc.message)
                if self.exit_on_auth:
                    self.fatal(exc)
                else:
                    log.error("%s: %s; this tunnel stays down until reload", self.label, exc.line())
                return
            except asyncssh.PermissionDenied as exc:
                await self._disconnect()
                error = f"authentication failed: {exc.reason}"
                if self.exit_on_auth and not self._connected_once:
                    self.stats.enter("failed", error)
                    self.fatal(
                        RuntimeFailure(f"{self.label}: {error}", hint="check -i KEY, the agent and the user")
                    )
                    return
                await self._backoff(attempt, error)
                attempt += 1
                continue
            except (OSError, TimeoutError, asyncssh.Error, RuntimeFailure) as exc:
                await self._disconnect()
                await self._backoff(attempt, _error_text(exc))
                attempt += 1
                if self.config.reconnect_attempts and attempt >= self.config.reconnect_attempts:
                    self.fatal(
                        RuntimeFailure(f"{self.label}: gave up after {attempt} attempts: {_error_text(exc)}")
                    )
                    return
                continue
            self.conn = conn
            self._lost_reason = ""
            if self._connected_once:
                self.stats.reconnects += 1
            self._connected_once = True
            attempt = 0
            self.stats.enter("up")
            self._up.set()
            log.info(
                "%s: connected to %s (%s)", self.label, self.stats.server, conn.get_extra_info("peername")
            )
            requests = asyncio.get_running_loop().create_task(self._remote_forwards(conn))
            try:
                await conn.wait_closed()
            finally:
                requests.cancel()
            self._up.clear()
            for forward in self.forwards:
                forward.remote = None
                if forward.spec.kind == "remote":
                    forward.stats.state = "waiting"
            if self._stopping:
                return
            reason = self._lost_reason or "connection lost"
            log.warning("%s: link to %s lost (%s)", self.label, self.stats.server, reason)
            for bridge in list(self._bridges):
                bridge.close("tunnel down")
            await self._disconnect()
            await self._backoff(0, f"link lost: {reason}")

    async def _backoff(self, attempt: int, error: str) -> None:
        delay = self._delay(attempt)
        self.stats.enter("backoff", error)
        log.warning("%s: %s; reconnecting in %.1fs", self.label, error, delay)
        await asyncio.sleep(delay)

    async def link(self) -> asyncssh.SSHClientConnection | None:
        """The connection, waiting up to connect_timeout while it is down; None if it stays down."""
        if self.conn is not None and self._up.is_set():
            return self.conn
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.connect_timeout):
                await self._up.wait()
        return self.conn if self._up.is_set() else None

    # ------------------------------------------------------------------ -R
    async def _remote_forwards(self, conn: asyncssh.SSHClientConnection) -> None:
        """Ask for every -R; a refused one is reported and asked again with backoff."""
        pending = [forward for forward in self.forwards if forward.spec.kind == "remote"]
        attempt = 0
        while pending:
            refused = []
            for forward in pending:
                try:
                    await self._listen_remote(conn, forward)
                except (asyncssh.Error, asyncssh.ChannelListenError, OSError) as exc:
                    text = _error_text(exc) if not isinstance(exc, asyncssh.ChannelListenError) else str(exc)
                    forward.stats.state = "refused"
                    forward.stats.error = text
                    if not self.config.exit_on_forward_failure:
                        log.error("%s: server refused %s: %s; asking again", self.label, forward.spec, text)
                    else:
                        self.fatal(
                            RuntimeFailure(
                                f"{self.label}: remote forward {forward.spec} refused: {text}"
                                " (ExitOnForwardFailure)"
                            )
                        )
                        return
                    refused.append(forward)
            pending = refused
            if pending:
                await asyncio.sleep(self._delay(attempt))
                attempt += 1

    async def _listen_remote(self, conn: asyncssh.SSHClientConnection, forward: _Forward) -> None:
        spec = forward.spec
        if spec.path is not None:
            listener = await conn.create_unix_server(
                lambda: self._remote_session(forward, "unix"),
                spec.path,
                window=WINDOW,
                max_pktsize=PACKET,
            )
            where = f"unix:{spec.path}"
        else:
            bind = "localhost" if spec.bind is None else spec.bind
            listener = await conn.create_server(
                lambda host, port: self._remote_session(forward, f"{host}:{port}"),
                bind,
                spec.port,
                window=WINDOW,
                max_pktsize=PACKET,
            )
            if listener is None:
                raise asyncssh.ChannelListenError("Failed to create remote TCP listener")
            port = listener.get_port()
            where = f"{bind or '*'}:{port}"
            if spec.port == 0:
                # The words OpenSSH prints, so scripts that grep ssh's output find ours; at warning
                # level so that -q still shows it, as ssh shows it without -v.
                log.warning("Allocated port %d for remote forward to %s", port, spec.target_text)
        forward.remote = listener
        forward.stats.listen = where
        forward.stats.state = "listening"
        forward.stats.error = ""
        log.info("%s: -R listening on %s (server side) -> %s", self.label, where, spec.target_text)

    def _remote_session(self, forward: _Forward, client: str) -> Any:
        """A channel for a -R listener: connect the local target first, then accept the channel."""
        spec = forward.spec
        if spec.is_socks:
            return self._reverse_socks(forward, client).channel_session()
        target: tuple[str, int] | str = (
            spec.target_path if spec.target_path is not None else (spec.host or "localhost", spec.host_port)
        )
        return self._open_remote(forward, client, target)

    async def _open_remote(
        self, forward: _Forward, client: str, target: tuple[str, int] | str
    ) -> asyncssh.SSHTCPSession[bytes]:
        stats = forward.stats.stats
        try:
            sock = await connect_local(
                target, self.config.connect_timeout, tcp_keepalive=self.config.tcp_keepalive
            )
        except (UpstreamError, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, UpstreamError) else "timeout"
            stats.count_error(reason)
            log.info(
                "%s: %s -> %s failed: %s", self.label, client, forward.spec.target_text, _error_text(exc)
            )
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, _error_text(exc)) from None
        bridge = self._bridge(forward, client, forward.spec.target_text)
        await self._attach(bridge, sock)
        return bridge.channel_session()

    def _reverse_socks(self, forward: _Forward, client: str) -> Bridge:
        """Reverse dynamic: SOCKS arrives over the channel; we connect on this side."""
        bridge = self._bridge(forward, client, "socks")
        codec = SocksServer(self._credentials())
        done = False
        loop = asyncio.get_running_loop()
        source = client.rpartition(":")[0] or client  # the -R client's address, as the server gave it

        def refuse(answer: bytes) -> None:
            if bridge.chan is not None and not bridge.ended:
                with contextlib.suppress(OSError, asyncssh.Error):  # it may have gone meanwhile
                    if answer:
                        bridge.chan.write(answer)
                    bridge.chan.close()

        def expired() -> None:
            nonlocal done
            if not done and not bridge.ended:
                done = True
                forward.stats.stats.count_error("socks")
                log.info(
                    "%s: %s: SOCKS handshake failed: no request within %gs",
                    self.label,
                    client,
                    SOCKS_HANDSHAKE_TIMEOUT,
                )
                refuse(b"")

        deadline = loop.call_later(SOCKS_HANDSHAKE_TIMEOUT, expired)
        if self._socks_failures.blocked(source):
            done = True
            deadline.cancel()
            forward.stats.stats.count_error("socks")
            log.warning(
                "%s: %s: refused: too many wrong SOCKS5 passwords from this address", self.label, client
            )
            loop.call_soon(refuse, b"")

        def feed(data: bytes) -> None:
            nonlocal done
            if done:
                return
            if self._socks_failures.blocked(source):  # locked out since this channel opened
                done = True
                deadline.cancel()
                forward.stats.stats.count_error("socks")
                refuse(b"")
                return
            try:
                request = codec.feed(data)
            except SocksError as exc:
                done = True
                deadline.cancel()
                log.info("%s: %s: bad SOCKS request: %s", self.label, client, exc.message)
                forward.stats.stats.count_error("socks")
                answer = codec.outgoing() + exc.reply
                if isinstance(exc, SocksAuthError):
                    self._socks_failures.note(source)
                    loop.call_later(SOCKS_AUTH_DELAY, refuse, answer)
                else:
                    refuse(answer)
                return
            if bridge.chan is not None and (out := codec.outgoing()):
                bridge.chan.write(out)
            if request is not None:
                done = True
                deadline.cancel()
                if bridge.chan is not None:
                    bridge.chan.pause_reading()
                self._spawn(self._reverse_connect(forward, bridge, codec, request.host, request.port))

        bridge.intercept = feed
        return bridge

    async def _reverse_connect(
        self, forward: _Forward, bridge: Bridge, codec: SocksServer, host: str, port: int
    ) -> None:
        bridge.session.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            sock = await connect_local(
                (host, port), self.config.connect_timeout, tcp_keepalive=self.config.tcp_keepalive
            )
        except (UpstreamError, TimeoutError) as exc:
            forward.stats.stats.count_error(exc.reason if isinstance(exc, UpstreamError) else "timeout")
            log.info(
                "%s: %s -> %s failed: %s",
                self.label,
                bridge.session.client,
                bridge.session.target,
                _error_text(exc),
            )
            if bridge.chan is not None:
                bridge.chan.write(codec.refuse(socks_reply_for(exc)))
                bridge.chan.close()
            return
        address, bound = sock.getsockname()[:2]
        bridge.intercept = None
        if bridge.chan is not None:
            bridge.chan.write(codec.accept(address, bound))
        trailing = codec.trailing
        await self._attach(bridge, sock)
        if trailing:
            bridge.from_channel(trailing)

    # ------------------------------------------------------------------ -L and -D
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _serve_local(self, forward: _Forward, client: socket.socket, peer: Any) -> None:
        self._spawn(self._local_client(forward, client, describe_peer(client, peer)))

    def _serve_socks(self, forward: _Forward, client: socket.socket, peer: Any) -> None:
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
        self._spawn(self._socks_client(forward, client, describe_peer(client, peer), source))

    async def _open_channel(
        self, forward: _Forward, bridge: Bridge, host: str | None, port: int, path: str | None
    ) -> None:
        """Open the channel for a local client; raises ChannelOpenError, TimeoutError or RuntimeFailure."""
        conn = await self.link()
        if conn is None:
            raise RuntimeFailure(f"tunnel down (no link within {self.config.connect_timeout:g}s)")
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
        await self._deadlines.within(self.config.connect_timeout, opened)

    async def _local_client(self, forward: _Forward, client: socket.socket, text: str) -> None:
        spec = forward.spec
        client.setblocking(False)
        with contextlib.suppress(OSError):
            stream_options(client, client.family)
        bridge = self._bridge(forward, text, spec.target_text)
        try:
            await self._open_channel(forward, bridge, spec.host, spec.host_port, spec.target_path)
        except (asyncssh.ChannelOpenError, TimeoutError, RuntimeFailure, OSError, asyncssh.Error) as exc:
            self._failed(forward, bridge, client, exc)
            return
        except asyncio.CancelledError:  # shutdown while the channel was opening
            self._failed(forward, bridge, client, RuntimeFailure("shutdown"))
            raise
        await self._attach(bridge, client)

    async def _socks_client(self, forward: _Forward, client: socket.socket, text: str, source: str) -> None:
        if self._credentials() is None:
            await self._socks_handshake(forward, client, text, source)
            return
        # With a password, at most SOCKS_AUTH_PARALLEL handshakes at once per source: a batch of
        # parallel guesses is small, and the lockout after SOCKS_AUTH_LIMIT stops the next one.
        if self._socks_handshakes[source] >= SOCKS_AUTH_PARALLEL:
            forward.stats.stats.count_error("socks")
            log.warning("%s: %s: refused: too many SOCKS handshakes at once from there", self.label, text)
            client.close()
            return
        self._socks_handshakes[source] += 1
        held = True

        def release() -> None:  # the handshake is over (the relay that follows does not count)
            nonlocal held
            if held:
                held = False
                self._socks_handshakes[source] -= 1
                if self._socks_handshakes[source] <= 0:
                    del self._socks_handshakes[source]

        try:
            await self._socks_handshake(forward, client, text, source, release)
        finally:
            release()

    async def _socks_handshake(
        self,
        forward: _Forward,
        client: socket.socket,
        text: str,
        source: str,
        handshaken: Callable[[], None] = lambda: None,
    ) -> None:
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        codec = SocksServer(self._credentials())
        if self._socks_failures.blocked(source):
            forward.stats.stats.count_error("socks")
            log.warning(
                "%s: %s: refused: too many wrong SOCKS5 passwords from this address", self.label, text
            )
            client.close()
            return
        try:
            async with asyncio.timeout(SOCKS_HANDSHAKE_TIMEOUT):
                request = None
                while request is None:
                    data = await loop.sock_recv(client, 4096)
                    if not data:
                        client.close()
                        return
                    request = codec.feed(data)
                    if out := codec.outgoing():
                        await loop.sock_sendall(client, out)
        except SocksError as exc:
            forward.stats.stats.count_error("socks")
            log.info("%s: %s: bad SOCKS request: %s", self.label, text, exc.message)
            if isinstance(exc, SocksAuthError):
                self._socks_failures.note(source)
                await asyncio.sleep(SOCKS_AUTH_DELAY)  # this client's task only; others are served
            with contextlib.suppress(OSError):
                if answer := codec.outgoing() + exc.reply:  # e.g. the method choice, then the refusal
                    await loop.sock_sendall(client, answer)
            client.close()
            return
        except (TimeoutError, OSError) as exc:
            log.info("%s: %s: SOCKS handshake failed: %s", self.label, text, _error_text(exc))
            client.close()
            return
        except asyncio.CancelledError:
            client.close()
            raise
        handshaken()
        bridge = self._bridge(forward, text, request.target)
        try:
            await self._open_channel(forward, bridge, request.host, request.port, None)
        except (asyncssh.ChannelOpenError, TimeoutError, RuntimeFailure, OSError, asyncssh.Error) as exc:
            code = Reply.NETWORK_UNREACHABLE if isinstance(exc, RuntimeFailure) else socks_reply_for(exc)
            with contextlib.suppress(OSError):
                await loop.sock_sendall(client, codec.refuse(code))
            self._failed(forward, bridge, client, exc)
            return
        except asyncio.CancelledError:
            self._failed(forward, bridge, client, RuntimeFailure("shutdown"))
            raise
        try:
            await loop.sock_sendall(client, codec.accept())
        except OSError as exc:
            bridge.close(f"client: {_error_text(exc)}")
            client.close()
            return
        bridge.send_up(codec.trailing)
        await self._attach(bridge, client)

    def _failed(self, forward: _Forward, bridge: Bridge, client: socket.socket, exc: BaseException) -> None:
        reason = (
            "refused"
            if isinstance(exc, asyncssh.ChannelOpenError)
            else "timeout"
            if isinstance(exc, TimeoutError)
            else "down"
        )
        if not self._stopping:
            forward.stats.stats.count_error(reason)
        log.info(
            "%s: %s -> %s failed: %s; client closed",
            self.label,
            bridge.session.client,
            bridge.session.target,
            _error_text(exc),
        )
        client.close()
        bridge.close(_error_text(exc))

    # ------------------------------------------------------------------ sessions
    def _bridge(self, forward: _Forward, client: str, target: str) -> Bridge:
        session = self.state.open_session(forward.stats.stats, client, target, "ssh")
        bridge = Bridge(session, self._closed, channel_is_client=forward.spec.kind == "remote")
        session.relay = bridge
        self._bridges.add(bridge)
        return bridge

    async def _attach(self, bridge: Bridge, sock: socket.socket) -> None:
        """Give a connected socket to the bridge (asyncio wraps it in a transport)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(bridge.socket_protocol, sock)
        except OSError as exc:
            sock.close()
            bridge.close(f"client: {_error_text(exc)}")
            return
        log.info("%s: %s -> %s open (ssh)", self.label, bridge.session.client, bridge.session.target)

    def _closed(self, bridge: Bridge, reason: str) -> None:
        self._bridges.discard(bridge)
        session: Session = bridge.session
        session.relay = None
        if session.id in self.state.sessions:
            log_closed(self.label, session, reason, log)
        self.state.close_session(session)

    def _credentials(self) -> tuple[str, str] | None:
        return self.config.socks_credentials
