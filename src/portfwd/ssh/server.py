"""`portfwd server`: an SSH server that only forwards, for stock `ssh -N -L/-R/-D` clients.

Public-key authentication only, for configured users only. Each user gets the targets
(`permit_open`) and listen addresses (`permit_listen`) the admin allowed, from the source
networks allowed (`from`), narrowed further by OpenSSH authorized_keys options (`permitopen`,
`permitlisten`, `from`, `restrict`, `no-port-forwarding`). Relayed connections go through the
same Bridge as the client side and are counted in the one state model. A client whose link
died may take its own `-R` port back at once (same user, same key); nobody else can.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh

from portfwd import sshalgorithms
from portfwd.errors import BindError, RuntimeFailure, UpstreamError
from portfwd.relay.deadline import Deadlines
from portfwd.relay.forwarder import format_peer
from portfwd.relay.listener import bind_ip, bind_unix, keepalive
from portfwd.relay.upstream import describe_error
from portfwd.specs import ServerSpec, ServerUserSpec
from portfwd.ssh.bridge import Bridge
from portfwd.ssh.cork import CorkedConnector
from portfwd.ssh.lean import fix, probe, tune
from portfwd.ssh.limits import Channels, Failures, Startups
from portfwd.ssh.remote import RemoteListener
from portfwd.state import ServerSessionStats, State

log = logging.getLogger(__name__)

#: How long failed logins from one address are remembered (and it is refused once over the limit).
PENALTY_WINDOW = 60.0
UPSTREAM_TIMEOUT = 10.0
NOT_PLAIN = "not a plain absolute path ('..', '.' and empty components are refused)"
LINKED = "the path goes through a symbolic link; use the real path (a link could lead anywhere)"


def load_host_key(path: str) -> asyncssh.SSHKey:
    """The server's ed25519 host key: read it, or create it (mode 0600) on first start."""
    key_path = Path(os.path.expanduser(path))
    try:
        return asyncssh.read_private_key(str(key_path))
    except FileNotFoundError:
        pass
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise RuntimeFailure(f"cannot read host key {key_path}: {exc}", field="server.host_key") from exc
    key = asyncssh.generate_private_key("ssh-ed25519")
    try:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.export_private_key())
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot create host key {key_path}: {exc.strerror}",
            field="server.host_key",
            hint="pick a writable path",
        ) from exc
    log.warning("server: created host key %s (%s)", key_path, key.get_fingerprint())
    return key


def _permits(rules: tuple[str, ...] | list[str], host: str, port: int) -> bool:
    """Does `host:port` match one of `host:port`, `*:port`, `host:*`, `any`?"""
    for rule in rules:
        if rule == "any":
            return True
        rule_host, _, rule_port = rule.rpartition(":")
        rule_host = rule_host.strip("[]")
        if rule_port not in ("*", str(port)):
            continue
        if rule_host in ("*", host):
            return True
    return False


def plain_path(path: str) -> bool:
    """Is `path` absolute and already normal: no `..` or `.` component, no `//`, no NUL?

    The server may run as root and binds or connects whatever path the client names; a path
    that only looks like it is under a permitted directory (`/srv/pub/../secret/x.sock`) must
    never match, so anything but the one plain spelling of a path is refused outright.
    """
    if not path.startswith("/") or "\0" in path:
        return False
    parts = path[1:].split("/")
    return all(part not in ("", ".", "..") for part in parts)


def linked(path: str) -> bool:
    """Does `path` (plain) pass through a symbolic link, the last component included?

    connect(2) and bind(2) follow links, so `/srv/pub/x.sock -> /var/run/docker.sock`, made by
    anyone who may write in /srv/pub, would otherwise match `unix:/srv/pub/*.sock`.
    """
    return os.path.realpath(path) != path


def _path_permitted(rules: tuple[str, ...], path: str) -> bool:
    """Does a Unix socket path match a `unix:/path` entry (shell wildcards within one component)?

    Matched component by component, so a `*` never crosses a `/` (`/srv/pub/*.sock` does not
    admit `/srv/pub/sub/x.sock`), and only plain paths (see `plain_path`) match at all.
    "any" does not cover paths: the server may run as root, and a socket path reaches local
    services (a container runtime's socket, say) that host:port rules were never meant to open.
    """
    if not plain_path(path):
        return False
    parts = path.split("/")
    for rule in rules:
        if not rule.startswith("unix:"):
            continue
        pattern = rule[5:].split("/")
        if len(pattern) == len(parts) and all(map(fnmatch.fnmatchcase, parts, pattern)):
            return True
    return False


def _forwarding_allowed(options: dict[str, Any]) -> bool:
    """authorized_keys: `no-port-forwarding`, or `restrict` without `port-forwarding`, forbid it."""
    if options.get("no-port-forwarding"):
        return False
    return not (options.get("restrict") and not options.get("port-forwarding"))


class _Session(asyncssh.SSHServer):
    """One SSH connection to the server: authentication, then the policy for every request."""

    def __init__(self, server: TunnelServer) -> None:
        self.server = server
        self.conn: asyncssh.SSHServerConnection = None  # type: ignore[assignment]
        self.source = "?"
        self.source_ip = ""
        self.user: ServerUserSpec | None = None
        self.user_name = ""
        self.keys: asyncssh.SSHAuthorizedKeys | None = None
        self.options: dict[str, Any] = {}
        self.fingerprint = ""
        self.authenticated = False
        self.waiting = False  # counted in the server's max_startups until logged in or gone
        self.auth_failures = 0
        self.began = 0.0
        self.gone = False  # the SSH connection has ended (checked after every await)
        self.stats = ServerSessionStats("", "", "")
        self.listeners: list[RemoteListener] = []

    @property
    def label(self) -> str:
        return f"{self.user_name}@{self.source}"

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.began = asyncio.get_running_loop().time()
        fix(conn)  # before the key exchange, fast path or not: dropbear's guessed packet (lean/kex.py)
        tune(conn, self.server.fast_path)
        peer = conn.get_extra_info("peername")
        self.source = format_peer(peer) if isinstance(peer, tuple) else "?"
        self.source_ip = str(peer[0]) if isinstance(peer, tuple) else ""
        if self.server.penalized(self.source_ip):
            log.warning("server: %s refused: too many failed logins from this address", self.source)
            asyncio.get_running_loop().call_soon(conn.close)
            return
        if not self.server.startups.admit():
            log.warning(
                "server: %s dropped before authentication: %d connections wait to log in (max_startups)",
                self.source,
                self.server.startups.pending,
            )
            asyncio.get_running_loop().call_soon(conn.abort)
            return
        self.waiting = True

    def _logged_in_or_gone(self) -> None:
        if self.waiting:
            self.waiting = False
            self.server.startups.done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._logged_in_or_gone()
        self.server.orphans(self)
        if not self.authenticated:
            # asyncssh's login timer starts a moment before connection_made: allow for it
            if asyncio.get_running_loop().time() - self.began >= self.server.config.login_grace_time - 0.25:
                log.warning("server: %s did not log in within login_grace_time; closed", self.source)
            if self.user_name:
                # A connection that never logged in costs its address each failed attempt (at
                # least one); keys tried before a login that succeeds cost nothing (an agent
                # offering several keys, many users behind one NAT).
                self.server.failed_login(self.source_ip, max(1, self.auth_failures))
            elif exc is not None:  # before any login attempt: the key exchange did not get through
                self._kex_failed(exc)
            return
        for listener in list(self.listeners):
            listener.close()
        with contextlib.suppress(ValueError):
            self.server.state.server_sessions.remove(self.stats)
        log.info("server: %s logged out (%s)", self.label, exc or "closed")

    def _kex_failed(self, exc: Exception) -> None:
        # The reason and the version string may be the peer's own text: repr keeps them on one line.
        reason = exc.reason if isinstance(exc, asyncssh.Error) else str(exc) or type(exc).__name__
        version = self.conn.get_extra_info("client_version")
        peer = f"{self.source} ({repr(version) if version else 'no version line'})"
        if isinstance(exc, asyncssh.ConnectionLost):  # it hung up, or never asked to log in: a probe, a scan
            log.debug("server: %s: closed before logging in: %r", peer, reason)
        else:
            log.info("server: %s: key exchange failed: %r", peer, reason)

    def begin_auth(self, username: str) -> bool:
        self.user_name = username
        self.user = self.server.users.get(username)
        if self.user is None:
            log.warning("server: %s: unknown user %r; refused", self.source, username)
            return True
        try:
            self.keys = asyncssh.read_authorized_keys(os.path.expanduser(self.user.authorized_keys))
        except (OSError, ValueError, asyncssh.KeyImportError) as exc:
            log.error(
                "server: user %s: cannot read %s: %s; refused", username, self.user.authorized_keys, exc
            )
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        sshalgorithms.accept_only_safe_signatures(key)  # asyncssh would verify an ssh-rsa (SHA-1) one
        if self._accepts(username, key):
            return True
        self.auth_failures += 1
        if self.auth_failures >= self.server.config.max_auth_tries:
            log.warning(
                "server: %s: %d failed authentication attempts for %r (max_auth_tries); disconnected",
                self.source,
                self.auth_failures,
                username,
            )
            asyncio.get_running_loop().call_soon(
                self.conn.disconnect,
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                "Too many authentication failures",
            )
        return False

    def _accepts(self, username: str, key: asyncssh.SSHKey) -> bool:
        user, keys = self.user, self.keys
        if user is None or keys is None:
            return False
        address = ipaddress.ip_address(self.source_ip) if self.source_ip else None
        if user.source and (address is None or not any(address in net for net in user.source)):
            log.warning(
                "server: %s: user %s is not allowed from this address (from = ...)", self.source, username
            )
            return False
        options = keys.validate(key, self.source_ip, self.source_ip)
        if options is None:
            return False
        self.options = dict(options)
        self.fingerprint = key.get_fingerprint()
        return True

    def auth_completed(self) -> None:
        self._logged_in_or_gone()
        self.authenticated = True
        self.stats = ServerSessionStats(self.user_name, self.source, self.fingerprint)
        self.stats.stats.idle_timeout = self.server.config.idle_timeout or 0.0
        self.stats.stats.name = f"server {self.label}"
        self.server.state.server_sessions.append(self.stats)
        log.info("server: %s logged in with key %s", self.label, self.fingerprint)

    def session_requested(self) -> bool:
        log.info("server: %s asked for a shell or command; refused (use ssh -N)", self.label)
        return False

    # -------------------------------------------------------------- -L and -D (direct-tcpip)
    def _room_for_a_channel(self, what: str) -> None:
        """Raise the channel-open refusal when this connection or user is at its channel cap."""
        refusal = self.server.channels.refusal(id(self), self.user_name)
        if refusal is not None:
            log.warning("server: %s: %s refused: %s", self.label, what, refusal)
            self.stats.stats.count_error("limit")
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, f"{what}: {refusal}")

    def _deny_open(self, what: str, why: str) -> None:
        log.warning("server: %s: %s denied: %s", self.label, what, why)
        self.stats.stats.count_error("denied")
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"{what}: {why}")

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        assert self.user is not None
        what = f"connect to {dest_host}:{dest_port}"
        if not 0 < dest_port <= 0xFFFF or not 0 <= orig_port <= 0xFFFF:
            # SSH carries ports as uint32; sshd refuses these too (serverloop.c, "invalid ... port").
            self._deny_open(what, "port out of range (1-65535)")
        if not _forwarding_allowed(self.options):
            self._deny_open(what, "port forwarding is off for this key (authorized_keys restrict)")
        if not _permits(self.user.permit_open, dest_host, dest_port):
            self._deny_open(what, "not in permit_open")
        allowed = self.options.get("permitopen")
        if allowed and (dest_host, dest_port) not in allowed and (dest_host, None) not in allowed:
            self._deny_open(what, "not in the key's permitopen")
        self._room_for_a_channel(what)
        client = f"{orig_host}:{orig_port} via {self.label}"
        return self.server.open_upstream(self, client, (dest_host, dest_port))

    def unix_connection_requested(self, dest_path: str) -> Any:
        assert self.user is not None
        what = f"connect to unix:{dest_path}"
        if not _forwarding_allowed(self.options):
            self._deny_open(what, "port forwarding is off for this key (authorized_keys restrict)")
        if not plain_path(dest_path):
            self._deny_open(what, NOT_PLAIN)
        if linked(dest_path):
            self._deny_open(what, LINKED)
        if not _path_permitted(self.user.permit_open, dest_path):
            self._deny_open(what, 'not in permit_open (a Unix socket needs its own "unix:/path" entry)')
        self._room_for_a_channel(what)
        return self.server.open_upstream(self, f"unix via {self.label}", dest_path)

    def bridge(self, client: str, target: str, *, channel_is_client: bool) -> Bridge:
        return self.server.bridge(self, client, target, channel_is_client=channel_is_client)

    # -------------------------------------------------------------- -R (tcpip-forward)
    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        assert self.user is not None
        what = f"listen on {listen_host or '*'}:{listen_port}"

        def deny(why: str) -> bool:
            log.warning("server: %s: %s denied: %s", self.label, what, why)
            self.stats.stats.count_error("denied")
            return False

        if not 0 <= listen_port <= 0xFFFF:
            return deny("port out of range (0-65535)")
        if not _forwarding_allowed(self.options):
            return deny("port forwarding is off for this key (authorized_keys restrict)")
        bind = self.server.bind_address(listen_host)
        if not _permits(self.user.permit_listen, bind, listen_port) and not _permits(
            self.user.permit_listen, listen_host, listen_port
        ):
            return deny("not in permit_listen")
        key_listens = self.options.get("permitlisten")
        if key_listens and not any(
            _permits([item if ":" in item else f"*:{item}"], bind, listen_port) for item in key_listens
        ):
            return deny("not in the key's permitlisten")
        return self.server.listen_remote(self, listen_host, bind, listen_port)

    def unix_server_requested(self, listen_path: str) -> Any:
        assert self.user is not None
        what = f"listen on unix:{listen_path}"
        allowed = self.user.permit_listen
        if not _forwarding_allowed(self.options):
            reason = "port forwarding is off for this key (authorized_keys restrict)"
        elif not plain_path(listen_path):
            reason = NOT_PLAIN
        elif linked(listen_path):
            reason = LINKED
        elif not _path_permitted(allowed, listen_path):
            reason = 'not in permit_listen (a Unix socket needs its own "unix:/path" entry)'
        else:
            return self.server.listen_remote_path(self, listen_path)
        log.warning("server: %s: %s denied: %s", self.label, what, reason)
        self.stats.stats.count_error("denied")
        return False


class TunnelServer:
    """Owns the SSH listener, the users, the -R ports in use and the failed-login memory."""

    def __init__(self, config: ServerSpec, state: State, *, fast_path: bool = True) -> None:
        self.config = config
        self.fast_path = fast_path
        self.state = state
        self.users = {user.name: user for user in config.users}
        self.remotes: dict[str, RemoteListener] = {}  # -R ports and sockets by key (remote.py)
        self._failures = Failures(config.max_auth_failures, PENALTY_WINDOW)
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bridges: set[Bridge] = set()
        self.deadlines = Deadlines()  # upstream connects and -R hand-backs: one timer for all
        self.startups = Startups(config.max_startups)
        self.channels = Channels(config.max_channels, config.max_channels_per_user)
        self._channel_owner: dict[Bridge, _Session] = {}
        self.fingerprint = ""

    async def start(self) -> None:
        """Load (or create) the host key and listen. Raises RuntimeFailure or BindError."""
        key = load_host_key(self.config.host_key)
        self.fingerprint = key.get_fingerprint()
        listen = self.config.listen
        host, port = listen.host, listen.port
        try:
            self._acceptor = await asyncssh.listen(
                host or "",
                port,
                server_host_keys=sshalgorithms.host_keypairs(key, self.config.host_key_algorithms),
                server_factory=lambda: _Session(self),
                password_auth=False,
                kbdint_auth=False,
                allow_pty=False,
                agent_forwarding=False,
                x11_forwarding=False,
                login_timeout=self.config.login_grace_time,
                keepalive_interval=self.config.client_alive_interval,
                keepalive_count_max=self.config.client_alive_count,
                tunnel=CorkedConnector(),
                # OpenSSH's algorithm sets or stricter, SHA-2 RSA signatures only, no library banner.
                **sshalgorithms.server_options(self.config.kex, self.config.ciphers, self.config.macs),
            )
        except OSError as exc:
            raise BindError(
                f"cannot listen on {listen}: {(exc.strerror or str(exc)).lower()}",
                field="server.listen",
                hint="pick another port",
            ) from exc
        log.info(
            "server: listening on %s for %d user(s); host key %s",
            listen,
            len(self.users),
            self.fingerprint,
        )

    async def stop_accepting(self) -> None:
        """Stop taking new SSH connections (shutdown begins; live sessions may drain)."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None

    async def stop(self) -> None:
        """Close everything: the listener, the -R ports, the relays."""
        await self.stop_accepting()
        for listener in list(self.remotes.values()):
            listener.close()
        for task in list(self._tasks):
            task.cancel()
        for bridge in list(self._bridges):
            bridge.close("shutdown")
        self.deadlines.close()

    # ------------------------------------------------------------------ failed logins
    def penalized(self, address: str) -> bool:
        return self._failures.blocked(address)

    def failed_login(self, address: str, times: int = 1) -> None:
        self.state.server_auth_failures += times
        for _ in range(times):
            self._failures.note(address)

    # ------------------------------------------------------------------ relays
    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def bridge(self, owner: _Session, client: str, target: str, *, channel_is_client: bool) -> Bridge:
        session = self.state.open_session(owner.stats.stats, client, target, "ssh-server")
        bridge = Bridge(session, self._closed, channel_is_client=channel_is_client)
        session.relay = bridge
        self._bridges.add(bridge)
        self.channels.opened(id(owner), owner.user_name)
        self._channel_owner[bridge] = owner
        return bridge

    def orphans(self, owner: _Session) -> None:
        """Close `owner`'s bridges whose channel never opened: with the connection gone, asyncssh
        will not attach them, and their upstream sockets would otherwise wait for ever."""
        for bridge, held_by in list(self._channel_owner.items()):
            if held_by is owner and bridge.chan is None:
                bridge.close("the client went away")

    def no_room(self, owner: _Session, client: socket.socket, what: str) -> bool:
        """True (and the -R client closed, logged) when `owner` is at its channel cap."""
        refusal = self.channels.refusal(id(owner), owner.user_name)
        if refusal is None:
            return False
        owner.stats.stats.count_error("limit")
        log.warning("server: %s: connection to %s refused: %s", owner.label, what, refusal)
        client.close()
        return True

    async def attach(self, bridge: Bridge, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(bridge.socket_protocol, sock)
        except OSError as exc:
            sock.close()
            bridge.close(f"socket: {exc.strerror}")

    def _closed(self, bridge: Bridge, reason: str) -> None:
        self._bridges.discard(bridge)
        owner = self._channel_owner.pop(bridge, None)
        if owner is not None:
            self.channels.closed(id(owner), owner.user_name)
        bridge.session.relay = None
        self.state.close_session(bridge.session)

    async def open_upstream(
        self, owner: _Session, client: str, target: tuple[str, int] | str
    ) -> asyncssh.SSHTCPSession[bytes]:
        """A -L/-D channel: connect the target first, then accept the channel with a bridge."""
        text = f"unix:{target}" if isinstance(target, str) else f"{target[0]}:{target[1]}"
        bridge = self.bridge(owner, client, text, channel_is_client=True)
        try:
            return await self._connect_upstream(owner, client, text, target, bridge)
        except BaseException:
            bridge.close("not opened")  # idempotent: every way out frees the session and its count
            raise

    async def _connect_upstream(
        self, owner: _Session, client: str, text: str, target: tuple[str, int] | str, bridge: Bridge
    ) -> asyncssh.SSHTCPSession[bytes]:
        loop = asyncio.get_running_loop()
        error: UpstreamError | None = None
        try:
            # One native call connects and builds the transport (measured faster than connecting
            # with relay.upstream.Connect and wrapping the socket, or a transport of our own).
            if isinstance(target, str):
                await self.deadlines.within(
                    UPSTREAM_TIMEOUT, loop.create_unix_connection(bridge.socket_protocol, target)
                )
            else:
                transport, _ = await self.deadlines.within(
                    UPSTREAM_TIMEOUT, loop.create_connection(bridge.socket_protocol, target[0], target[1])
                )
                upstream = transport.get_extra_info("socket")
                if self.config.tcp_keepalive and upstream is not None:
                    keepalive(upstream)
        except TimeoutError:
            error = UpstreamError(f"no answer within {UPSTREAM_TIMEOUT:g}s", reason="timeout")
        except OSError as exc:
            error = describe_error(exc)
        except ValueError:  # a name the resolver will not take (a label over 63 bytes, a NUL)
            error = UpstreamError("cannot resolve: not a valid host name", reason="resolve")
        if error is None and owner.gone:  # the SSH connection ended while we connected
            error = UpstreamError("the client went away", reason="closed")
        if error is not None:
            owner.stats.stats.count_error(error.reason)
            log.info("server: %s -> %s failed: %s", client, text, error.message)
            bridge.close(error.message)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, error.message.capitalize())
        return bridge.channel_session()

    # ------------------------------------------------------------------ -R ports
    def bind_address(self, requested: str) -> str:
        """Where a -R really binds: loopback unless gateway_ports (sshd's GatewayPorts no/clientspecified)."""
        if not self.config.gateway_ports or requested in ("localhost", "127.0.0.1"):
            return "127.0.0.1"
        if requested in ("", "*", "0.0.0.0"):
            return "0.0.0.0"
        return requested

    async def _may_take(self, owner: _Session, holder: _Session, what: str) -> bool:
        """May `owner` take the -R `what` that `holder` has bound? Only its own dead session's.

        Same user and same key, and the holder does not answer a keepalive within
        `takeover_probe`: the client reconnected before its old link was noticed dead (autossh
        after a network change). A holder that answers is alive (two clients with one key, say):
        the newcomer is refused, as sshd refuses it, and told who holds the port.
        """
        if holder is owner:
            log.warning("server: %s: %s is already forwarded by this session", owner.label, what)
            return False
        if holder.user_name != owner.user_name or holder.fingerprint != owner.fingerprint:
            log.warning("server: %s: %s is held by %s; refused", owner.label, what, holder.label)
            owner.stats.stats.count_error("denied")
            return False
        within = self.config.takeover_probe
        alive = await probe(holder.conn, within)
        if alive is not False:
            log.warning(
                "server: %s: %s is held by %s, which is alive (%s); refused",
                owner.label,
                what,
                holder.label,
                "it answered a keepalive" if alive else "it cannot be probed on this asyncssh",
            )
            owner.stats.stats.count_error("denied")
            return False
        log.warning(
            "server: %s takes over %s from its stale session %s (no keepalive answer within %gs)",
            owner.label,
            what,
            holder.label,
            within,
        )
        return True

    async def listen_remote(
        self, owner: _Session, requested: str, bind: str, port: int
    ) -> RemoteListener | bool:
        """`ssh -R [bind:]port:...`: bind the port for `owner` (taking it from its dead self)."""

        def make() -> socket.socket:
            return bind_ip(
                f"server {owner.label} -R",
                bind,
                port,
                socket.SOCK_STREAM,
                backlog=1024,
                dual_stack=False,
                tcp_keepalive=self.config.tcp_keepalive,
            )

        key = f"{bind}:{port}" if port else None  # port 0: a new port, never held
        return await self._listen(owner, key, make, requested_host=requested)

    async def listen_remote_path(self, owner: _Session, path: str) -> RemoteListener | bool:
        """`ssh -R /path.sock:...`: bind the socket file for `owner`."""
        key = f"unix:{path}"
        return await self._listen(
            owner, key, lambda: bind_unix(f"server {owner.label} -R", path, backlog=1024), path=path
        )

    async def _listen(
        self,
        owner: _Session,
        key: str | None,
        make: Callable[[], socket.socket],
        *,
        requested_host: str = "",
        path: str | None = None,
    ) -> RemoteListener | bool:
        held = self.remotes.get(key) if key is not None else None
        if held is not None:
            if not await self._may_take(owner, held.owner, key or "") or owner.gone:
                return False
            if self.remotes.get(held.key) is held:  # still there after the probe
                held.close()
            held.owner.conn.close()
        try:
            sock = make()
        except BindError as exc:
            log.warning("server: %s: %s", owner.label, exc.line())
            return False
        listener = RemoteListener(self, owner, sock, requested_host=requested_host, path=path)
        self.remotes[listener.key] = listener
        owner.listeners.append(listener)
        owner.stats.forwards.append(f"-R {listener.key}")
        log.info("server: %s: listening on %s for the client", owner.label, listener.key)
        return listener

    def released(self, listener: RemoteListener) -> None:
        if self.remotes.get(listener.key) is listener:
            del self.remotes[listener.key]
        with contextlib.suppress(ValueError):
            listener.owner.listeners.remove(listener)
        with contextlib.suppress(ValueError):
            listener.owner.stats.forwards.remove(f"-R {listener.key}")
