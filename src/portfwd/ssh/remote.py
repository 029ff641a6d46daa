"""The tunnel server's `-R` listeners: a TCP port or a Unix socket bound for one client.

Each connection that arrives becomes a channel back to the client that asked for the forward
(`forwarded-tcpip` for a port, `forwarded-streamlocal` for a socket path), bridged like every
other session. One code path serves both kinds: a RemoteAddress says where to bind and how the
listener is named (`127.0.0.1:8022` or `unix:/run/app.sock`), which is also the key under which
`Remotes` remembers who holds it. A client whose link died may take its own `-R` back at once
(same user, same key); nobody else can.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncssh

from portfwd.errors import BindError
from portfwd.logevents import event
from portfwd.relay.forwarder import format_peer
from portfwd.relay.listener import TcpListener, bind_ip, bind_unix
from portfwd.specs import ServerSpec
from portfwd.ssh.bridge import Bridge
from portfwd.ssh.errors import SshError, ssh_error
from portfwd.ssh.lean import probe
from portfwd.ssh.sessions import PACKET, WINDOW
from portfwd.state import bound_text

if TYPE_CHECKING:
    from portfwd.ssh.server import TunnelServer
    from portfwd.ssh.serverconn import ServerConnection

log = logging.getLogger("portfwd.ssh.server")

#: How long an `-R` client has to take a connection (open the channel back) before it is closed.
HAND_BACK_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class RemoteAddress:
    """Where a `-R` listens: a TCP port (`path` None) or a Unix socket path.

    `host` is what the client asked for (the channels back name it), `bind` where the server
    really binds (see Remotes.bind_address).
    """

    host: str = ""
    bind: str = ""
    port: int = 0
    path: str | None = None

    @property
    def key(self) -> str | None:
        """The registry key before binding; None for port 0 (a new port is never held)."""
        if self.path is not None:
            return f"unix:{self.path}"
        return f"{self.bind}:{self.port}" if self.port else None

    def open(self, what: str, tcp_keepalive: bool) -> socket.socket:
        """The listening socket. Raises BindError."""
        if self.path is not None:
            return bind_unix(what, self.path, backlog=1024)
        return bind_ip(
            what,
            self.bind,
            self.port,
            socket.SOCK_STREAM,
            backlog=1024,
            dual_stack=False,
            tcp_keepalive=tcp_keepalive,
        )


class RemoteListener(asyncssh.SSHListener):
    """A `-R` port or Unix socket bound for one client (`owner`)."""

    def __init__(
        self, server: TunnelServer, owner: ServerConnection, sock: socket.socket, address: RemoteAddress
    ) -> None:
        super().__init__()
        self.server = server
        self.owner = owner
        self.address = address
        if address.path is None:
            host, port = sock.getsockname()[:2]
            self.port = int(port)
            #: How the listener is named in logs and status, and keyed in the server's registry.
            self.key = f"{host}:{self.port}"
        else:
            self.port = 0
            self.key = f"unix:{address.path}"
        self.listener = TcpListener(sock, self._accept, f"server {owner.user_name}")
        self.listener.start()
        #: Its row among the listening sockets status shows, until it closes.
        self.row = (f"server {owner.label}", bound_text(sock))
        server.state.add_listening(self.row[0], "-R", [sock], "server")

    def get_port(self) -> int:
        return self.port

    def _accept(self, client: socket.socket, peer: Any) -> None:
        text = format_peer(peer) if isinstance(peer, tuple) else self.key
        self.server.sessions.spawn(self._serve(client, text, peer), client=client)

    async def _serve(self, client: socket.socket, text: str, peer: Any) -> None:
        owner, server = self.owner, self.server
        if server.no_room(owner, client, f"-R {self.key}"):
            return
        client.setblocking(False)
        bridge = server.bridge(owner, text, f"client {owner.source}", channel_is_client=False)
        channel: Awaitable[object]
        if self.address.path is None:
            channel = owner.conn.create_connection(
                bridge.channel_session,
                self.address.host,
                self.port,
                str(peer[0]),
                int(peer[1]),
                window=WINDOW,
                max_pktsize=PACKET,
            )
        else:
            channel = owner.conn.create_unix_connection(
                bridge.unix_session, self.address.path, window=WINDOW, max_pktsize=PACKET
            )
        await self._hand_back(client, bridge, text, channel)

    async def _hand_back(
        self, client: socket.socket, bridge: Bridge, source: str, channel: Awaitable[object]
    ) -> None:
        """Wait (bounded) for the channel back to the `-R` client, then relay.

        A client that refuses or does not answer closes only this connection, counted and logged.
        """
        owner = self.owner
        try:
            await self.server.sessions.deadlines.within(HAND_BACK_TIMEOUT, channel)
        except (asyncssh.Error, OSError, SshError) as exc:  # TimeoutError is an OSError
            owner.stats.stats.count_error("refused")
            why = ssh_error(exc).message
            log.info(
                "server: %s -> %s: the client did not take it: %s",
                source,
                owner.label,
                why,
                extra=event(
                    "session.failed",
                    rule=owner.stats.stats.name,
                    client=source,
                    target=owner.label,
                    reason=why,
                ),
            )
            client.close()
            bridge.close("refused")
            return
        await self.server.sessions.attach(bridge, client, side="socket")

    def close(self) -> None:
        self.server.state.remove_listening_socket(*self.row, "server")
        self.listener.close()
        self.server.remotes.released(self)

    async def wait_closed(self) -> None:
        """Closing is immediate."""


class Remotes:
    """The server's `-R` ports and sockets in use, by key, and who may take one over."""

    def __init__(self, server: TunnelServer, config: ServerSpec) -> None:
        self.server = server
        self.config = config
        self.held: dict[str, RemoteListener] = {}

    def bind_address(self, requested: str) -> str:
        """Where a -R really binds: loopback unless gateway_ports (sshd's GatewayPorts no/clientspecified)."""
        if not self.config.gateway_ports or requested in ("localhost", "127.0.0.1"):
            return "127.0.0.1"
        if requested in ("", "*", "0.0.0.0"):
            return "0.0.0.0"
        return requested

    async def listen(self, owner: ServerConnection, address: RemoteAddress) -> RemoteListener | bool:
        """`ssh -R [bind:]port:...` or `ssh -R /path.sock:...`: bind it for `owner` (taking it
        from its own dead session); False when refused or the bind fails (logged)."""
        key = address.key
        held = self.held.get(key) if key is not None else None
        if held is not None:
            if not await self._may_take(owner, held.owner, key or "") or owner.gone:
                return False
            if self.held.get(held.key) is held:  # still there after the probe
                held.close()
            held.owner.conn.close()
        try:
            sock = address.open(f"server {owner.label} -R", self.config.tcp_keepalive)
        except BindError as exc:
            log.warning(
                "server: %s: %s",
                owner.label,
                exc.line(),
                extra=event(
                    "server.forward_failed", user=owner.user_name, client=owner.source, reason=exc.message
                ),
            )
            return False
        listener = RemoteListener(self.server, owner, sock, address)
        self.held[listener.key] = listener
        owner.listeners.append(listener)
        owner.stats.forwards.append(f"-R {listener.key}")
        log.info(
            "server: %s: listening on %s for the client",
            owner.label,
            listener.key,
            extra=event(
                "server.forward_listening", user=owner.user_name, client=owner.source, listen=listener.key
            ),
        )
        return listener

    async def _may_take(self, owner: ServerConnection, holder: ServerConnection, what: str) -> bool:
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

    def released(self, listener: RemoteListener) -> None:
        """`listener` closed: forget it (unless another took its key meanwhile)."""
        if self.held.get(listener.key) is listener:
            del self.held[listener.key]
        with contextlib.suppress(ValueError):
            listener.owner.listeners.remove(listener)
        with contextlib.suppress(ValueError):
            listener.owner.stats.forwards.remove(f"-R {listener.key}")

    def close(self) -> None:
        """Close every -R listener (server stop)."""
        for listener in list(self.held.values()):
            listener.close()
