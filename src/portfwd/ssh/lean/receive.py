"""The receive half of the lean packet path: whole channel packets handled straight from the buffer.

asyncssh (2.24) receives a packet in two steps (`_recv_pkthdr`, then `_recv_packet`), each
re-slicing its whole input buffer, and then runs every packet through a general dispatch: an
`SSHPacket`, a chain of state checks for key exchange and auth, a packet-log call, a handler
lookup, `inspect.isawaitable`, and `_finish_recv_packet`. Profiled under `wrk` through
`portfwd server`, that framing was a large share of the server's CPU per connection
(bench/RESULTS.md, D12). It also
re-arms the keepalive timer (a cancel and a new `call_later`) on every read.

`Receiver.recv_data` stands in for the connection's `_recv_data` (asyncssh calls it as
`self._recv_data`, so the instance attribute wins). In the steady state — keys in place and
authenticated, a stateful AEAD cipher from `aead.py`, no decompression, no packet logging, at a
packet boundary — it walks the buffer by offset, opens each whole packet, and hands channel
traffic (window adjust, data, EOF, close, requests and their replies) to the channel's own
handler, as asyncssh's dispatch does in that state. Any other packet (key exchange, global
requests, channel opens, disconnect, anything malformed) is handed, already opened, to
asyncssh's `_recv_packet`, so every rule and every error stays asyncssh's. Outside the steady
state every step is asyncssh's own.

The keepalive timer is armed once and moved lazily: a read only notes the time, and the timer,
when it fires early, re-arms for what is left instead of counting a missed keepalive.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_FAILURE, MSG_CHANNEL_WINDOW_ADJUST
from asyncssh.misc import DisconnectError, MACError, ProtocolError
from asyncssh.packet import PacketDecodeError, SSHPacket

from portfwd.ssh.lean.aead import FastChacha, FastGcm

#: What the lean path reads and writes on the connection; without all of them it stays off.
_STATE = (
    "_auth_complete", "_auth_final", "_channels", "_decompressor", "_finish_recv_packet", "_force_close",
    "_inpbuf", "_keepalive_interval", "_keepalive_timer", "_loop", "_max_recv_pktlen", "_packet", "_pktlen",
    "_recv_blocksize", "_recv_encryption", "_recv_handler", "_recv_macsize", "_recv_packet", "_recv_seq",
    "_send_disconnect", "_transport", "create_task", "internal_error",
)  # fmt: skip
_PKTHDR = getattr(SSHConnection, "_recv_pkthdr", None)
_FAST = (FastGcm, FastChacha)
_FIRST, _LAST = MSG_CHANNEL_WINDOW_ADJUST, MSG_CHANNEL_FAILURE  # channel traffic: 93 to 100


class _Opened:
    """A one-packet stand-in for the receive cipher: hands asyncssh a packet opened already."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def decrypt_packet(self, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes) -> bytes:
        return self.data


def _waiting() -> bool:
    """The receive handler while an async packet handler runs: buffer, do not parse."""
    return False


class Receiver:
    """The connection's `_recv_data` (see the module docstring)."""

    __slots__ = ("conn", "general", "heard", "keepalive_fired", "on")

    def __init__(self, conn: Any, *, unlogged: bool) -> None:
        self.conn = conn
        self.general = conn._recv_data
        self.on = (
            unlogged
            and _PKTHDR is not None
            and isinstance(conn, SSHConnection)
            and all(hasattr(conn, name) for name in _STATE)
        )
        self.heard = 0.0
        self.keepalive_fired: Any = getattr(conn, "_keepalive_timer_callback", None)
        if self.on and self.keepalive_fired is not None:
            conn._reset_keepalive_timer = self.reset_keepalive
            conn._keepalive_timer_callback = self.keepalive_due

    # ---------------------------------------------------------------- keepalive
    def reset_keepalive(self) -> None:
        """Data arrived: the next keepalive is due an interval from now (no new timer per read)."""
        conn = self.conn
        if conn._auth_complete:
            self.heard = conn._loop.time()
            if conn._keepalive_timer is None:
                conn._set_keepalive_timer()

    def keepalive_due(self) -> None:
        conn = self.conn
        interval = conn._keepalive_interval
        if not interval:
            conn._keepalive_timer = None
            return
        due = self.heard + interval
        if conn._loop.time() < due:
            conn._keepalive_timer = conn._loop.call_at(due, self.keepalive_due)
            return
        self.keepalive_fired()

    # ---------------------------------------------------------------- packets
    def recv_data(self) -> None:
        conn = self.conn
        if not self.on:
            self.general()
            return
        conn._reset_keepalive_timer()
        try:
            while conn._inpbuf:
                handler = conn._recv_handler
                if (
                    getattr(handler, "__func__", None) is _PKTHDR
                    and type(conn._recv_encryption) in _FAST
                    and conn._auth_complete
                    and conn._decompressor is None
                ):
                    if not self._packets():
                        break
                elif not handler():
                    break
        except DisconnectError as exc:
            conn._send_disconnect(exc.code, exc.reason, exc.lang)
            conn._force_close(exc)
        except Exception:  # noqa: BLE001 - asyncssh's own rule: any other error closes the connection
            conn.internal_error()

    def _packets(self) -> bool:
        """Handle the whole packets in the buffer; False when more data (or a task) is awaited.

        The buffer is walked by offset and cut once at the end. Where asyncssh takes over (a
        packet for its general dispatch, a handler that returns a task), `_inpbuf` is set to
        what follows first, as asyncssh's own steps would have left it.
        """
        conn = self.conn
        buf = conn._inpbuf
        end = len(buf)
        enc = conn._recv_encryption
        blocksize = conn._recv_blocksize
        macsize = conn._recv_macsize
        channels = conn._channels
        pos = 0
        try:
            while end - pos >= blocksize:
                seq = conn._recv_seq
                first, length = enc.decrypt_header(seq, buf[pos : pos + blocksize], 4)
                pktlen = int.from_bytes(length, "big")
                if pktlen > conn._max_recv_pktlen:
                    raise ProtocolError("Max packet size exceeded")
                size = 4 + pktlen + macsize
                if end - pos < size:  # the rest is on its way: asyncssh's state after a header
                    pos += blocksize
                    conn._packet, conn._pktlen, conn._recv_handler = first, pktlen, conn._recv_packet
                    break
                tag = pos + size - macsize
                data = enc.decrypt_packet(seq, first, buf[pos + blocksize : tag], 4, buf[tag : pos + size])
                if not data:
                    raise MACError("MAC verification failed")
                payload = data[1 : -data[0]]
                pkttype = payload[0] if payload else 0
                handle = None
                if _FIRST <= pkttype <= _LAST and len(payload) >= 5:
                    chan = channels.get(int.from_bytes(payload[1:5], "big"))
                    if chan is not None:
                        handle = chan._packet_handlers.get(pkttype)
                if handle is None:  # asyncssh's own dispatch, with the packet opened already
                    conn._inpbuf = buf[pos + blocksize :]
                    conn._packet, conn._pktlen = first, pktlen
                    conn._recv_encryption = _Opened(data)
                    try:
                        conn._recv_packet()
                    finally:
                        if type(conn._recv_encryption) is _Opened:  # NEWKEYS installs its own
                            conn._recv_encryption = enc
                    return True
                pos += size
                packet = SSHPacket(payload)
                packet._idx = 5  # past the type byte and the channel number
                try:
                    result = handle(chan, pkttype, seq, packet)
                except PacketDecodeError as exc:
                    raise ProtocolError(str(exc)) from None
                if conn._inpbuf is not buf:  # the handler closed the connection (buffer dropped)
                    return False
                if result is not None and inspect.isawaitable(result):
                    conn._inpbuf = buf[pos:]
                    conn._recv_handler = _waiting
                    task = conn.create_task(result)
                    task.add_done_callback(
                        functools.partial(conn._finish_recv_packet, pkttype, seq, is_async=True)
                    )
                    return False
                conn._auth_final = True
                if conn._transport is None:  # closing: nothing more is read
                    conn._inpbuf = b""
                    return False
                conn._recv_seq = (seq + 1) & 0xFFFFFFFF
        except BaseException:
            if conn._inpbuf is buf:
                conn._inpbuf = buf[pos:]
            raise
        conn._inpbuf = buf[pos:]
        return False
