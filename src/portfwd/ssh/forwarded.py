"""The tunnel client's `-R` forwards: asked of the server on every link, served on this side.

Each `-R` is requested again after every reconnect, ready for its channels before the request
(lean/forwards.py: none is refused while it comes up); a refused one is reported and asked again
with backoff (or ends portfwd with ExitOnForwardFailure). A connection the server forwards back
(`forwarded-tcpip`, `forwarded-streamlocal`) is connected to its local target first, and only
then is the channel accepted; a failure becomes the channel-open refusal the server sees.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

import asyncssh

from portfwd.errors import RuntimeFailure, UpstreamError
from portfwd.logevents import event
from portfwd.relay.sessionlog import log_failed
from portfwd.relay.upstream import Connect, literal_addresses, resolve
from portfwd.ssh.connection import backoff
from portfwd.ssh.errors import SshError, channel_refusal, ssh_error
from portfwd.ssh.lean import expect_forwarded
from portfwd.ssh.sessions import PACKET, WINDOW

if TYPE_CHECKING:
    from portfwd.ssh.client import Forward, Tunnel

log = logging.getLogger("portfwd.ssh.client")


async def connect_local(
    target: tuple[str, int] | str, within: float, *, tcp_keepalive: bool = True
) -> socket.socket:
    """Connect to a local target (host:port or Unix path) for a -R channel. Raises SshError."""
    try:
        addresses = literal_addresses(target)
        if addresses is None:
            assert not isinstance(target, str)
            async with asyncio.timeout(within):
                addresses = await resolve(target[0], target[1], socket.SOCK_STREAM)
    except (UpstreamError, TimeoutError) as exc:
        raise ssh_error(exc) from exc
    done: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()

    def finished(sock: socket.socket | None, error: UpstreamError | None) -> None:
        if done.done():
            if sock is not None:
                sock.close()
        elif sock is not None:
            done.set_result(sock)
        else:
            done.set_exception(ssh_error(error or UpstreamError("connect failed", reason="error")))

    connect = Connect(addresses, within, finished, tcp_keepalive=tcp_keepalive)
    try:
        return await done
    finally:
        connect.cancel()


class RemoteForwards:
    """The -R forwards of one tunnel: requests on each link, and the channels they bring."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.label = tunnel.label
        self.config = tunnel.config

    async def connect_local(self, target: tuple[str, int] | str) -> socket.socket:
        """`connect_local` with this tunnel's connect_timeout and keepalive. Raises SshError."""
        return await connect_local(
            target, self.config.connect_timeout, tcp_keepalive=self.config.tcp_keepalive
        )

    async def request(self, conn: asyncssh.SSHClientConnection) -> None:
        """Ask for every -R; a refused one is reported and asked again with backoff."""
        pending = [forward for forward in self.tunnel.forwards if forward.spec.kind == "remote"]
        attempt = 0
        while pending:
            refused = []
            for forward in pending:
                try:
                    await self._listen(conn, forward)
                except (asyncssh.Error, asyncssh.ChannelListenError, OSError) as exc:
                    text = ssh_error(exc).message
                    forward.stats.state = "refused"
                    forward.stats.error = text
                    if not self.config.exit_on_forward_failure:
                        log.error(
                            "%s: server refused %s: %s; asking again",
                            self.label,
                            forward.spec,
                            text,
                            extra=event(
                                "forward.failed", tunnel=self.label, forward=str(forward.spec), reason=text
                            ),
                        )
                    else:
                        self.tunnel.fatal(
                            RuntimeFailure(
                                f"{self.label}: remote forward {forward.spec} refused: {text}"
                                " (ExitOnForwardFailure)"
                            )
                        )
                        return
                    refused.append(forward)
            pending = refused
            if pending:
                await asyncio.sleep(backoff(self.config, attempt))
                attempt += 1

    async def _listen(self, conn: asyncssh.SSHClientConnection, forward: Forward) -> None:
        spec = forward.spec
        bind = "localhost" if spec.bind is None else spec.bind

        def unix() -> Any:
            return self._session(forward, "unix")

        def tcp(host: str, port: int) -> Any:
            return self._session(forward, f"{host}:{port}")

        # Ready for the forward's channels before asking for it: the server may send the first
        # ones with its answer, before create_server's own listener exists (lean/forwards.py).
        undo = expect_forwarded(
            conn, unix if spec.path is not None else tcp, bind, spec.port, spec.path, WINDOW, PACKET
        )
        try:
            if spec.path is not None:
                listener = await conn.create_unix_server(unix, spec.path, window=WINDOW, max_pktsize=PACKET)
                where = f"unix:{spec.path}"
            else:
                listener = await conn.create_server(tcp, bind, spec.port, window=WINDOW, max_pktsize=PACKET)
                if listener is None:
                    raise asyncssh.ChannelListenError("Failed to create remote TCP listener")
        except BaseException:
            undo()
            raise
        if spec.path is None:
            port = listener.get_port()
            where = f"{bind or '*'}:{port}"
            if spec.port == 0:
                # The words OpenSSH prints, so scripts that grep ssh's output find ours; at INFO,
                # as ssh logs it: shown by default, hidden by -q.
                log.info(
                    "Allocated port %d for remote forward to %s",
                    port,
                    spec.target_text,
                    extra=event("forward.allocated", tunnel=self.label, port=port, target=spec.target_text),
                )
        forward.remote = listener
        forward.stats.listen = where
        forward.stats.state = "listening"
        forward.stats.error = ""
        log.info(
            "%s: -R listening on %s (server side) -> %s",
            self.label,
            where,
            spec.target_text,
            extra=event(
                "forward.listening",
                tunnel=self.label,
                forward=str(forward.spec),
                listen=where,
                target=spec.target_text,
            ),
        )

    def _session(self, forward: Forward, client: str) -> Any:
        """A channel for a -R listener: connect the local target first, then accept the channel."""
        spec = forward.spec
        if spec.is_socks:
            return self.tunnel.socks.reverse(forward, client).channel_session()
        target: tuple[str, int] | str = (
            spec.target_path if spec.target_path is not None else (spec.host or "localhost", spec.host_port)
        )
        return self._open(forward, client, target)

    async def _open(
        self, forward: Forward, client: str, target: tuple[str, int] | str
    ) -> asyncssh.SSHTCPSession[bytes]:
        try:
            sock = await self.connect_local(target)
        except SshError as error:
            forward.stats.stats.count_error(error.reason)
            log_failed(
                self.label,
                client,
                forward.spec.target_text,
                error.message,
                log,
                rule=forward.stats.stats.name,
            )
            raise channel_refusal(error) from None
        bridge = self.tunnel.bridge(forward, client, forward.spec.target_text)
        await self.tunnel.attach(bridge, sock)
        return bridge.channel_session()
