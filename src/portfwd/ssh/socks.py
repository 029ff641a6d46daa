"""The tunnel client's SOCKS front: `-D` (SOCKS on a local socket) and reverse `-R port` (over a channel).

The handshake is proto/socks.py's sans-IO codec; this module feeds it, answers with the reply
the failure's SshError calls for (ssh/errors.py), and guards a SOCKS5 password: a wrong one is
answered late, a source that keeps guessing is locked out for a while, and only a few
handshakes per source run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from portfwd.logevents import event
from portfwd.proto.socks import SocksAuthError, SocksError, SocksServer
from portfwd.relay.forwarder import describe_peer
from portfwd.relay.sessionlog import log_failed
from portfwd.ssh.bridge import Bridge
from portfwd.ssh.errors import SshError, socks_reply, ssh_error
from portfwd.ssh.limits import Failures

if TYPE_CHECKING:
    from portfwd.ssh.client import Forward, Tunnel

log = logging.getLogger("portfwd.ssh.client")

SOCKS_HANDSHAKE_TIMEOUT = 10.0
#: A wrong SOCKS5 password is answered this much later, and this many from one source within
#: a minute lock that source out for the rest of the minute: thousands of guesses a second
#: become a few.
SOCKS_AUTH_DELAY = 1.0
SOCKS_AUTH_LIMIT = 10
SOCKS_AUTH_PARALLEL = 8


class SocksFront:
    """The SOCKS side of one tunnel: its -D clients and its reverse-dynamic -R channels."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.label = tunnel.label
        self.credentials = tunnel.config.socks_credentials
        self._failures = Failures(SOCKS_AUTH_LIMIT)
        self._handshakes: Counter[str] = Counter()  # per source, while a password is asked

    # ------------------------------------------------------------------ -D
    def serve(self, forward: Forward, client: socket.socket, peer: Any) -> None:
        """A -D listener accepted `client`: serve it in a session task."""
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
        self.tunnel.sessions.spawn(
            self._client(forward, client, describe_peer(client, peer), source), client=client
        )

    async def _client(self, forward: Forward, client: socket.socket, text: str, source: str) -> None:
        if self.credentials is None:
            await self._handshake(forward, client, text, source)
            return
        # With a password, at most SOCKS_AUTH_PARALLEL handshakes at once per source: a batch of
        # parallel guesses is small, and the lockout after SOCKS_AUTH_LIMIT stops the next one.
        if self._handshakes[source] >= SOCKS_AUTH_PARALLEL:
            forward.stats.stats.count_error("socks")
            log.warning(
                "%s: %s: refused: too many SOCKS handshakes at once from there",
                self.label,
                text,
                extra=event("socks.refused", tunnel=self.label, client=text, reason="too many handshakes"),
            )
            client.close()
            return
        self._handshakes[source] += 1
        held = True

        def release() -> None:  # the handshake is over (the relay that follows does not count)
            nonlocal held
            if held:
                held = False
                self._handshakes[source] -= 1
                if self._handshakes[source] <= 0:
                    del self._handshakes[source]

        try:
            await self._handshake(forward, client, text, source, release)
        finally:
            release()

    def _locked_out(self, forward: Forward, source: str, text: str) -> bool:
        if not self._failures.blocked(source):
            return False
        forward.stats.stats.count_error("socks")
        log.warning(
            "%s: %s: refused: too many wrong SOCKS5 passwords from this address",
            self.label,
            text,
            extra=event("socks.refused", tunnel=self.label, client=text, reason="too many wrong passwords"),
        )
        return True

    async def _handshake(
        self,
        forward: Forward,
        client: socket.socket,
        text: str,
        source: str,
        handshaken: Callable[[], None] = lambda: None,
    ) -> None:
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        codec = SocksServer(self.credentials)
        if self._locked_out(forward, source, text):
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
            log.info(
                "%s: %s: bad SOCKS request: %s",
                self.label,
                text,
                exc.message,
                extra=event("socks.bad_request", tunnel=self.label, client=text, reason=exc.message),
            )
            if isinstance(exc, SocksAuthError):
                self._failures.note(source)
                await asyncio.sleep(SOCKS_AUTH_DELAY)  # this client's task only; others are served
            with contextlib.suppress(OSError):
                if answer := codec.outgoing() + exc.reply:  # e.g. the method choice, then the refusal
                    await loop.sock_sendall(client, answer)
            client.close()
            return
        except (TimeoutError, OSError) as exc:
            why = ssh_error(exc).message
            log.info(
                "%s: %s: SOCKS handshake failed: %s",
                self.label,
                text,
                why,
                extra=event("socks.failed", tunnel=self.label, client=text, reason=why),
            )
            client.close()
            return
        handshaken()
        tunnel = self.tunnel
        bridge = tunnel.bridge(forward, text, request.target)
        error = await tunnel.open_channel(forward, bridge, client, request.host, request.port, None)
        if error is not None:
            with contextlib.suppress(OSError):
                await loop.sock_sendall(client, codec.refuse(socks_reply(error)))
            tunnel.failed(forward, bridge, client, error)
            return
        try:
            await loop.sock_sendall(client, codec.accept())
        except OSError as exc:
            bridge.close(f"client: {ssh_error(exc).message}")
            client.close()
            return
        bridge.send_up(codec.trailing)
        await tunnel.attach(bridge, client)

    # ------------------------------------------------------------------ reverse -R port (dynamic)
    def reverse(self, forward: Forward, client: str) -> Bridge:
        """Reverse dynamic: SOCKS arrives over the channel; we connect on this side."""
        tunnel = self.tunnel
        bridge = tunnel.bridge(forward, client, "socks")
        codec = SocksServer(self.credentials)
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
                    extra=event(
                        "socks.failed", tunnel=self.label, client=client, reason="no request in time"
                    ),
                )
                refuse(b"")

        deadline = loop.call_later(SOCKS_HANDSHAKE_TIMEOUT, expired)
        if self._locked_out(forward, source, client):
            done = True
            deadline.cancel()
            loop.call_soon(refuse, b"")

        def feed(data: bytes) -> None:
            nonlocal done
            if done:
                return
            if self._failures.blocked(source):  # locked out since this channel opened
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
                log.info(
                    "%s: %s: bad SOCKS request: %s",
                    self.label,
                    client,
                    exc.message,
                    extra=event("socks.bad_request", tunnel=self.label, client=client, reason=exc.message),
                )
                forward.stats.stats.count_error("socks")
                answer = codec.outgoing() + exc.reply
                if isinstance(exc, SocksAuthError):
                    self._failures.note(source)
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
                tunnel.sessions.spawn(
                    self._reverse_connect(forward, bridge, codec, request.host, request.port), bridge=bridge
                )

        bridge.intercept = feed
        return bridge

    async def _reverse_connect(
        self, forward: Forward, bridge: Bridge, codec: SocksServer, host: str, port: int
    ) -> None:
        tunnel = self.tunnel
        bridge.session.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            sock = await tunnel.forwarded.connect_local((host, port))
        except SshError as error:
            forward.stats.stats.count_error(error.reason)
            session = bridge.session
            log_failed(self.label, session.client, session.target, error.message, log, rule=session.rule.name)
            if bridge.chan is not None:
                bridge.chan.write(codec.refuse(socks_reply(error)))
                bridge.chan.close()
            return
        address, bound = sock.getsockname()[:2]
        bridge.intercept = None
        if bridge.chan is not None:
            bridge.chan.write(codec.accept(address, bound))
        trailing = codec.trailing
        await tunnel.attach(bridge, sock)
        if trailing:
            bridge.from_channel(trailing)
