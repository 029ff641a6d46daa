"""The tunnel server's `-R` listeners: a TCP port or a Unix socket bound for one client.

Each connection that arrives becomes a channel back to the client that asked for the forward
(`forwarded-tcpip` for a port, `forwarded-streamlocal` for a socket path), bridged like every
other session. One class serves both kinds: they differ only in how the channel is opened and
how the listener is named (`127.0.0.1:8022` or `unix:/run/app.sock`), which is also the key
under which the server remembers who holds it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import asyncssh

from portfwd.relay.forwarder import format_peer
from portfwd.relay.listener import TcpListener
from portfwd.ssh.bridge import Bridge
from portfwd.ssh.client import PACKET, WINDOW

if TYPE_CHECKING:
    from portfwd.ssh.server import TunnelServer, _Session

log = logging.getLogger(__name__)

#: How long an `-R` client has to take a connection (open the channel back) before it is closed.
HAND_BACK_TIMEOUT = 10.0


class RemoteListener(asyncssh.SSHListener):
    """A `-R` port (`path` None) or Unix socket (`path` set) bound for one client."""

    def __init__(
        self,
        server: TunnelServer,
        owner: _Session,
        sock: socket.socket,
        *,
        requested_host: str = "",
        path: str | None = None,
    ) -> None:
        super().__init__()
        self.server = server
        self.owner = owner
        self.requested_host = requested_host
        self.path = path
        if path is None:
            host, port = sock.getsockname()[:2]
            self.port = int(port)
            #: How the listener is named in logs and status, and keyed in the server's registry.
            self.key = f"{host}:{self.port}"
        else:
            self.port = 0
            self.key = f"unix:{path}"
        self.listener = TcpListener(sock, self._accept, f"server {owner.user_name}")
        self.listener.start()

    def get_port(self) -> int:
        return self.port

    def _accept(self, client: socket.socket, peer: Any) -> None:
        text = format_peer(peer) if isinstance(peer, tuple) else self.key
        self.server.spawn(self._serve(client, text, peer))

    async def _serve(self, client: socket.socket, text: str, peer: Any) -> None:
        owner = self.owner
        if self.server.no_room(owner, client, f"-R {self.key}"):
            return
        client.setblocking(False)
        bridge = owner.bridge(text, f"client {owner.source}", channel_is_client=False)
        channel: Awaitable[object]
        if self.path is None:
            channel = owner.conn.create_connection(
                bridge.channel_session,
                self.requested_host,
                self.port,
                str(peer[0]),
                int(peer[1]),
                window=WINDOW,
                max_pktsize=PACKET,
            )
        else:
            channel = owner.conn.create_unix_connection(
                bridge.unix_session, self.path, window=WINDOW, max_pktsize=PACKET
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
            await self.server.deadlines.within(HAND_BACK_TIMEOUT, channel)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            owner.stats.stats.count_error("refused")
            log.info("server: %s -> %s: the client did not take it: %s", source, owner.label, exc)
            client.close()
            bridge.close("refused")
            return
        await self.server.attach(bridge, client)

    def close(self) -> None:
        self.listener.close()
        self.server.released(self)

    async def wait_closed(self) -> None:
        """Closing is immediate."""
