"""Portable TCP relay: a pair of asyncio Protocols with backpressure and half-close.

Used where splice is not possible (non-Linux, later TLS) or when a rule says
`relay = "protocol"`. `pause_writing` on one side pauses reading on its peer, so a slow reader
never makes us buffer without bound; `eof_received` passes the half-close on with `write_eof`
and keeps the other direction open.
"""

from __future__ import annotations

import asyncio
import socket
import typing

from portfwd.relay.bandwidth import Shaper
from portfwd.state import Session, SessionOwner


class _Side(asyncio.Protocol):
    """One socket of the pair; `upward` is True for the client side (bytes it reads go up)."""

    __slots__ = ("early", "eof", "lost", "peer", "relay", "transport", "upward")

    def __init__(self, relay: ProtocolRelay, upward: bool) -> None:
        self.relay = relay
        self.upward = upward
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.lost = False
        #: Bytes read before the peer's transport existed (uvloop may deliver one read after pause).
        self.early: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = typing.cast(asyncio.Transport, transport)
        peer = self.peer
        # The first side made must not read until its peer can take the bytes.
        if peer is None or peer.transport is None:
            self.transport.pause_reading()
        else:
            if peer.early:
                for data in peer.early:
                    self.transport.write(data)
                peer.early = None
            peer.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        assert peer is not None
        if self.upward:
            self.relay.session.bytes_up += len(data)
        else:
            self.relay.session.bytes_down += len(data)
        if peer.transport is None:
            if self.early is None:
                self.early = []
            self.early.append(data)
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.relay.half_closed(self)
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.eof:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.side_lost(self, exc)


class ProtocolRelay:
    """Relays two connected sockets through asyncio transports until both sides finish.

    `owner.relay_closed(session, reason)` is called exactly once, after both transports are
    closed. The reason is the first thing that happened: `client closed`, `upstream reset`, or
    what `close()` was told.
    """

    __slots__ = ("_client", "_finished", "_owner", "_reason", "_upstream", "session")

    def __init__(self, session: Session, owner: SessionOwner, shaper: Shaper | None = None) -> None:
        self.session = session
        self._owner = owner
        self._reason: str | None = None
        self._finished = False
        self._client = _Side(self, upward=True)
        self._upstream = _Side(self, upward=False)
        self._client.peer = self._upstream
        self._upstream.peer = self._client

    def upstream_sockname(self) -> object:
        """The local address of the upstream socket, read when status asks (None once closed)."""
        transport = self._upstream.transport
        if transport is None or self._finished or self._upstream.lost:
            return None
        return transport.get_extra_info("sockname")

    async def start(
        self, client: socket.socket, upstream: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Wrap both sockets in transports (on `loop`, the running one); relaying starts when
        both exist."""
        try:
            await loop.connect_accepted_socket(lambda: self._upstream, upstream)
        except BaseException:
            upstream.close()
            client.close()
            if not self._finished:  # no transport will report the end: report it here, once
                self._finished = True
                self._owner.relay_closed(self.session, "internal error")
            raise
        try:
            await loop.connect_accepted_socket(lambda: self._client, client)
        except BaseException:
            client.close()
            self.close("client error")
            raise

    def _note(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason

    def half_closed(self, side: _Side) -> None:
        """One side sent EOF: pass it on; close both once both directions are done."""
        peer = side.peer
        assert peer is not None
        self._note(f"{'client' if side.upward else 'upstream'} closed")
        if peer.transport is not None and not peer.lost and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer.eof:
            self._close_transports(abort=False)

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        """A transport is gone: the other one goes too; report when both are."""
        name = "client" if side.upward else "upstream"
        self._note(f"{name} reset" if exc is not None else f"{name} closed")
        self._close_transports(abort=exc is not None)
        other = self._upstream if side.upward else self._client
        if (other.lost or other.transport is None) and not self._finished:
            self._finished = True
            self._owner.relay_closed(self.session, self._reason or "closed")

    def _close_transports(self, abort: bool) -> None:
        for side in (self._client, self._upstream):
            if side.transport is not None and not side.lost:
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()

    def close(self, reason: str) -> None:
        """Close both sides at once (shutdown, rule removal)."""
        self._note(reason)
        self._close_transports(abort=True)
