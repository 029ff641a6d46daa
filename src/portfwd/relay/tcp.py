"""Portable TCP relay: a pair of asyncio Protocols with backpressure and half-close.

Used where splice is not possible (non-Linux, later TLS) or when a rule says
`relay = "protocol"`. `pause_writing` on one side pauses reading on its peer, so a slow reader
never makes us buffer without bound; `eof_received` passes the half-close on with `write_eof`
and keeps the other direction open.

A rule with a bandwidth limit gets `_PacedSide`s instead (chosen once, when the relay is made,
so an unlimited relay runs the plain sides and pays nothing): each holds the bytes it reads and
writes them to its peer a slice at a time as its `Meter` allows (relay/bandwidth.py), with
reading paused while any are held.
"""

from __future__ import annotations

import asyncio
import socket
import typing

from portfwd.counters import Session, SessionOwner
from portfwd.relay.bandwidth import Meter, Shaper


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


#: Why a paced side is not reading, a bit each; it reads again only when no bit is left, so the
#: peer draining its write buffer never resumes a side that waits for tokens, nor the reverse.
_NO_PEER = 1  # the peer's transport is not made yet
_PEER_FULL = 2  # the peer's write buffer is over its high-water mark
_HELD = 4  # bytes read are held until the bandwidth limit lets them go


class _PacedSide(_Side):
    """A side of a relay under a bandwidth limit: what it reads goes to its peer as `meter` allows.

    Bytes read are written at once while the meter admits them; the rest are held, reading
    pauses, and a timer writes the reserved slice when its reservation comes due, then reserves
    the next. An EOF read is passed on only once the held bytes are written. The timer is
    cancelled when the transport is lost, and a timer that finds the peer closing drops the
    bytes (the relay is ending).
    """

    __slots__ = ("blocked", "due", "ended", "held", "loop", "meter", "timer", "twin")

    def __init__(self, relay: ProtocolRelay, upward: bool, meter: Meter) -> None:
        super().__init__(relay, upward)
        self.meter = meter
        self.twin: _PacedSide | None = None  #: the peer, typed as what it is
        self.loop: asyncio.AbstractEventLoop | None = None
        self.blocked = 0  #: the reasons reading is paused (_NO_PEER, _PEER_FULL, _HELD)
        self.held: bytes | memoryview = b""  #: read, not yet written to the peer
        self.due = 0  #: bytes at the front of `held` whose reservation the timer waits for
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False  #: EOF read; `eof` (EOF passed on) waits until `held` is written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        if self.loop is None:  # (a test may have set a loop whose clock it turns by hand)
            self.loop = asyncio.get_running_loop()
        twin = self.twin
        if twin is None or twin.transport is None:
            self._pause(_NO_PEER)
        else:
            twin._unblock(_NO_PEER)

    def data_received(self, data: bytes) -> None:
        # Bytes count when they are written on (`_count`): a slow limit holds a read for
        # longer than idle_timeout, and a session whose bytes still move is not idle.
        held = self.held
        # More while bytes are held only comes from a read already under way when reading paused.
        self.held = bytes(held) + data if held else data
        self._send()

    def eof_received(self) -> bool:
        self.ended = True
        self._send()
        return True

    def pause_writing(self) -> None:
        if self.twin is not None:
            self.twin._pause(_PEER_FULL)

    def resume_writing(self) -> None:
        if self.twin is not None:
            self.twin._unblock(_PEER_FULL)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.held = b""
        super().connection_lost(exc)

    def _pause(self, reason: int) -> None:
        if not self.blocked and self.transport is not None:
            self.transport.pause_reading()
        self.blocked |= reason

    def _resume(self, reason: int) -> None:
        if self.blocked & reason:
            self.blocked &= ~reason
            if not self.blocked and not self.ended and not self.lost and self.transport is not None:
                self.transport.resume_reading()

    def _unblock(self, reason: int) -> None:
        """One reason to wait is gone: send what is held (and a pending EOF) if nothing else waits."""
        self._resume(reason)
        self._send()

    def _send(self) -> None:
        """Write the held bytes the meter admits now; hold the rest and wait; pass a read EOF on
        once nothing is held."""
        if self.blocked & (_NO_PEER | _PEER_FULL) or self.timer is not None:
            if self.held:
                self._pause(_HELD)
            return
        if self.held:
            self.held = held = self._write_admitted(self.held)
            if held:
                self._pause(_HELD)
                return
        self._resume(_HELD)  # also after the timer wrote the last held bytes
        if self.ended and not self.eof:
            self.eof = True
            self.relay.half_closed(self)

    def _write_admitted(self, held: bytes | memoryview) -> bytes | memoryview:
        """Write `held` slice by slice while the meter admits it at once; at the first slice that
        must wait, set the timer for it. Returns what is still held."""
        twin, loop = self.twin, self.loop
        assert twin is not None  # _send writes only once the peer's transport is made (no _NO_PEER)
        assert twin.transport is not None
        assert loop is not None
        transport, meter = twin.transport, self.meter
        now = loop.time()
        while held:
            size = min(len(held), meter.slice)
            delay = meter.reserve(size, now)
            if delay > 0.0:
                self.due = size
                self.timer = loop.call_later(delay, self._reserved_due)
                return held
            self._count(size)
            if size == len(held):
                transport.write(held)
                return b""
            if isinstance(held, bytes):
                held = memoryview(held)  # slices without copies
            transport.write(held[:size])
            held = held[size:]
            if self.blocked & _PEER_FULL:  # that write filled the peer's buffer
                return held
        return held

    def _count(self, size: int) -> None:
        if self.upward:
            self.relay.session.bytes_up += size
        else:
            self.relay.session.bytes_down += size

    def _reserved_due(self) -> None:
        """The timer: the reserved slice may go; then on to the next."""
        self.timer = None
        twin = self.twin
        transport = twin.transport if twin is not None else None
        if self.lost or transport is None or transport.is_closing():
            self.held = b""  # the relay is ending: nobody to deliver to
            return
        held, size = self.held, self.due
        self.due = 0
        self._count(size)
        if size == len(held):
            transport.write(held)
            self.held = b""
        else:
            if isinstance(held, bytes):
                held = memoryview(held)
            transport.write(held[:size])
            self.held = held[size:]
        self._send()


class ProtocolRelay:
    """Relays two connected sockets through asyncio transports until both sides finish.

    `owner.relay_closed(session, reason)` is called exactly once, after both transports are
    closed. The reason is the first thing that happened: `client closed`, `upstream reset`, or
    what `close()` was told. With a `shaper` (the rule's bandwidth limits) each direction is
    paced by the session's meters; without one the relay is exactly the unlimited one.
    """

    __slots__ = ("_client", "_finished", "_owner", "_reason", "_upstream", "session")

    def __init__(self, session: Session, owner: SessionOwner, shaper: Shaper | None = None) -> None:
        self.session = session
        self._owner = owner
        self._reason: str | None = None
        self._finished = False
        if shaper is None:
            self._client = _Side(self, upward=True)
            self._upstream = _Side(self, upward=False)
        else:
            meters = shaper.session()
            client, upstream = _PacedSide(self, True, meters.up), _PacedSide(self, False, meters.down)
            client.twin, upstream.twin = upstream, client
            self._client, self._upstream = client, upstream
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
