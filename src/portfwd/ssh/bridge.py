"""Relays one local socket and one SSH channel, with backpressure, half-close and byte counts.

The SSH counterpart of relay/tcp.py: asyncssh delivers channel data to an SSHTCPSession in the
event loop, the socket side is an asyncio Protocol, and each side's `pause_writing` pauses the
other side's reading, so a slow reader never makes the tunnel buffer without bound. Either side
may be attached first: a -L client's socket exists before its channel opens, a -R channel
before its local connection; the first side does not read until the second is there.
"""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Callable

import asyncssh
from asyncssh.channel import SSHChannel

from portfwd.counters import Session

Closed = Callable[["Bridge", str], None]


class _ChannelSide(asyncssh.SSHTCPSession[bytes], asyncssh.SSHUNIXSession[bytes]):
    """The SSH channel end: bytes it receives go down to the local client."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        self.bridge.channel_made(typing.cast("asyncssh.SSHTCPChannel[bytes]", chan))

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.bridge.from_channel(data)

    def eof_received(self) -> bool:
        self.bridge.channel_eof()
        return True

    def pause_writing(self) -> None:
        if self.bridge.transport is not None:
            self.bridge.transport.pause_reading()

    def resume_writing(self) -> None:
        bridge = self.bridge
        if bridge.transport is not None and not bridge.socket_eof:
            bridge.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.channel_lost(exc)


class _SocketSide(asyncio.Protocol):
    """The local socket end: bytes it receives go up the channel."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.bridge.socket_made(typing.cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.bridge.from_socket(data)

    def eof_received(self) -> bool:
        self.bridge.socket_eof_received()
        return True

    def pause_writing(self) -> None:
        if self.bridge.chan is not None:
            self.bridge.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.bridge.chan is not None:
            self.bridge.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.socket_lost(exc)


class Bridge:
    """One tunnelled session: a channel and a socket; calls `closed(bridge, reason)` once at the end."""

    def __init__(self, session: Session, closed: Closed, *, channel_is_client: bool = False) -> None:
        self.session = session
        self.closed = closed
        #: -R: the client is on the server's side, so channel bytes count as "up".
        self.channel_is_client = channel_is_client
        #: While set, channel bytes go here instead of the socket (reverse SOCKS handshake).
        self.intercept: Callable[[bytes], None] | None = None
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.socket_eof = False
        self.channel_eof_seen = False
        self.reason = ""
        self._early: list[bytes] = []  # channel bytes that arrived before the socket side
        self._pending_up: list[bytes] = []  # socket bytes that arrived before the channel
        self._channel_done = False
        self._socket_done = False
        self._ended = False

    @property
    def ended(self) -> bool:
        """True once `closed` has been called: both sides are done."""
        return self._ended

    def upstream_sockname(self) -> object:
        """The local address of the upstream side, read when status asks: the socket's for a
        channel that is the client (-R on a client, -L/-D on the server), else the SSH
        connection's the channel runs in. None once that side is gone."""
        if self._ended:
            return None
        if self.channel_is_client:
            side: typing.Any = self.transport
        else:
            side = self.chan
        return None if side is None else side.get_extra_info("sockname")

    # factories for asyncssh and asyncio
    def channel_session(self) -> asyncssh.SSHTCPSession[bytes]:
        """The SSHTCPSession to hand asyncssh (create_connection, create_server factories)."""
        return _ChannelSide(self)

    def unix_session(self) -> asyncssh.SSHUNIXSession[bytes]:
        """The same, for Unix socket channels (create_unix_connection, create_unix_server)."""
        return _ChannelSide(self)

    def socket_protocol(self) -> asyncio.Protocol:
        """The Protocol to hand asyncio (connect_accepted_socket, create_connection)."""
        return _SocketSide(self)

    def send_up(self, data: bytes) -> None:
        """Bytes for the channel that were read outside the bridge (SOCKS optimistic data)."""
        if data:
            self.from_socket(data)

    # channel side
    def channel_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        if self._ended:  # the open was given up on (timeout) but the server confirmed it late
            chan.close()
            return
        self.chan = chan
        if self.transport is None:
            if self.intercept is None:
                chan.pause_reading()
        else:
            self.transport.resume_reading()
        if self._pending_up:
            for data in self._pending_up:
                chan.write(data)
            self._pending_up.clear()
        if self.socket_eof:  # the client finished before the channel opened
            chan.write_eof()

    def from_channel(self, data: bytes) -> None:
        if self.intercept is not None:
            self.intercept(data)
            return
        if self.channel_is_client:
            self.session.bytes_up += len(data)
        else:
            self.session.bytes_down += len(data)
        if self.transport is None:
            self._early.append(data)
        else:
            self.transport.write(data)

    def channel_eof(self) -> None:
        self.channel_eof_seen = True
        if self.transport is not None:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            if self.socket_eof:
                self.transport.close()

    def channel_lost(self, exc: Exception | None) -> None:
        self._channel_done = True
        if exc is not None and not self.reason:
            self.reason = f"tunnel: {exc}"
        if self.transport is not None:
            self.transport.close()  # flushes what the channel delivered
        self._maybe_end()

    # socket side
    def socket_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if self._early:
            for data in self._early:
                transport.write(data)
            self._early.clear()
        if self.channel_eof_seen and transport.can_write_eof():
            transport.write_eof()
        if self.chan is None:
            transport.pause_reading()
        else:
            self.chan.resume_reading()

    def from_socket(self, data: bytes) -> None:
        if self.channel_is_client:
            self.session.bytes_down += len(data)
        else:
            self.session.bytes_up += len(data)
        if self.chan is None:
            # uvloop may deliver reads despite the pause in connection_made; keep them
            # (bounded: pause again) until the channel exists.
            self._pending_up.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
        else:
            self.chan.write(data)

    def socket_eof_received(self) -> None:
        self.socket_eof = True
        if self.chan is not None:
            self.chan.write_eof()
        if self.channel_eof_seen and self.transport is not None:
            self.transport.close()

    def socket_lost(self, exc: Exception | None) -> None:
        self._socket_done = True
        if exc is not None and not self.reason:
            self.reason = f"client: {exc}"
        if self.chan is not None:
            self.chan.close()
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self._ended:
            return
        if (self._socket_done and (self._channel_done or self.chan is None)) or (
            self._channel_done and self.transport is None
        ):
            self._end()

    def _end(self) -> None:
        self._ended = True
        finished = self.socket_eof and self.channel_eof_seen
        self.closed(self, self.reason or ("done" if finished else "closed"))

    def close(self, reason: str) -> None:
        """End the session now (shutdown, link lost): abort both sides."""
        if not self.reason:
            self.reason = reason
        if self.transport is not None:
            self.transport.abort()
        if self.chan is not None:
            self.chan.abort()
        if self.transport is None and self.chan is None:
            self._socket_done = self._channel_done = True
            self._maybe_end()
