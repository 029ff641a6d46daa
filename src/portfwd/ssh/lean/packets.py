"""Per-connection trims of asyncssh's packet path: no needless IGNOREs, ciphers that keep state.

Costs asyncssh (2.24) pays on every packet, removed here on the connection instance only
(asyncssh's classes stay untouched, and other connections in the process are unaffected):

- **An empty SSH_MSG_IGNORE before each packet** after key exchange (`send_packet`): RFC 4251
  §9.3.1's countermeasure against chosen-plaintext attacks on CBC's chained IVs. Under the
  modes negotiated in practice — AES-GCM, ChaCha20-Poly1305, AES-CTR — there is no chained IV
  to protect, and OpenSSH sends no such packets. In a tunnel the extra packet doubled the
  packets asyncssh builds, pads and encrypts. Under a `-cbc` cipher every packet keeps it.
- **A new cipher object per packet** for AES-GCM and ChaCha20-Poly1305: the connection's
  encryption objects are swapped for `ssh/lean/aead.py`'s, which produce the same bytes from
  state made once per key (see there for the numbers).
- **Log lines rendered for nobody**: each packet sent or received is described (type name,
  byte count) before asyncssh's packet logger checks its debug level, and its INFO lines
  (three per channel) convert their arguments before the logging level is checked. Unless
  packet logging is on (`asyncssh.set_debug_level(3)` and DEBUG enabled), the connection and
  each channel it makes skip the description, and the connection's logger (which its
  channels' loggers copy) checks the level first (bench/RESULTS.md, D11).
- **The general send path** for the common packet: `_PacketPath` sends channel traffic in the
  steady state itself, with one join and pooled padding (see there).
- **The general receive path**, and a new keepalive timer for every read: see
  `ssh/lean/receive.py`, which `tune` installs as the connection's `_recv_data`.

Both hook into the one method asyncssh sends every packet through, `send_packet`: asyncssh
calls it as `self.send_packet`, so the instance attribute wins. New keys (the first key
exchange and every rekey) show up there as a new `_send_encryption` object; it and the
receive side's pending or current object are swapped at once, carrying over the GCM
invocation counter, before the first packet under the new keys. An object of any other
type (another cipher, or a future asyncssh whose internals moved) is left as it is.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from asyncssh.constants import MSG_IGNORE, MSG_USERAUTH_LAST
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.logging import SSHLogger

from portfwd.ssh.lean.aead import FastChacha, FastGcm, chacha_available
from portfwd.ssh.lean.receive import Receiver


def _faster(enc: Any) -> Any:
    """The stateful equivalent of an asyncssh encryption object, or the object itself."""
    kind = type(enc)
    try:
        if kind is GCMEncryption:
            return FastGcm(enc._cipher._key, enc._cipher._iv)
        if kind is ChachaEncryption and chacha_available():
            cipher = enc._cipher
            return FastChacha(cipher._key + cipher._adkey)
    except (AttributeError, TypeError, ValueError, OSError, MemoryError):
        pass  # asyncssh's own object still works; keep it
    return enc


def _swap_ciphers(conn: Any) -> None:
    conn._send_encryption = _faster(conn._send_encryption)
    if conn._next_recv_encryption is not None:
        conn._next_recv_encryption = _faster(conn._next_recv_encryption)
    if conn._recv_encryption is not None:
        conn._recv_encryption = _faster(conn._recv_encryption)


class QuietLogger(SSHLogger):
    """asyncssh's logger, asking whether a record would be emitted before rendering its arguments."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.logger.isEnabledFor(level):
            super().log(level, msg, *args, **kwargs)


def _unlogged(pkttype: int, pktid: int | None, packet: Any, note: str = "") -> None:
    """Stands in for `log_sent_packet` / `log_received_packet` while packet logging is off."""


class _Unlogged:
    """The `handler=` asyncssh's send_packet logs a sent packet through."""

    log_sent_packet = staticmethod(_unlogged)


_UNLOGGED = _Unlogged()


def _quiet(conn: Any) -> bool:
    """Skip log work on this connection and its channels; False when packet logging is on."""
    logger = getattr(conn, "_logger", None)
    if type(logger) is SSHLogger:
        quiet = QuietLogger(logger.logger)
        quiet._context = logger._context
        conn._logger = quiet
    if SSHLogger._debug_level >= 3 and logging.getLogger("asyncssh").isEnabledFor(logging.DEBUG):
        return False
    conn.log_sent_packet = conn.log_received_packet = _unlogged
    for name in ("create_tcp_channel", "create_unix_channel"):
        make = getattr(conn, name, None)
        if make is not None:
            setattr(conn, name, _unlogged_channels(make))
    return True


def _unlogged_channels(make: Any) -> Any:
    def create(*args: Any, **kwargs: Any) -> Any:
        chan = make(*args, **kwargs)
        chan.log_sent_packet = chan.log_received_packet = _unlogged
        return chan

    return create


#: What the lean path reads and writes on the connection; without all of them it stays off.
_LEAN_STATE = (
    "_auth_complete", "_compressor", "_deferred_packets", "_kex_complete", "_rekey_bytes",
    "_rekey_bytes_sent", "_rekey_seconds", "_rekey_time", "_send", "_send_blocksize",
    "_send_enchdrlen", "_send_seq",
)  # fmt: skip
_BYTE = [bytes((value,)) for value in range(256)]
_PADDING_POOL = 4096


class _PacketPath:
    """The connection's `send_packet`: the trims above, then asyncssh's own method or the lean path.

    The lean path sends a connection-protocol packet (channel data, EOF, close, window adjust,
    global requests) in the steady state — keys in place and authenticated, no key exchange
    due or running, nothing deferred, no compression, a stateful AEAD cipher, no packet
    logging — the way asyncssh's `send_packet` does in that state, with one join instead of
    three concatenations and padding cut from a pool of random bytes instead of a getrandom()
    call a packet (the padding is encrypted and authenticated; RFC 4253 §6 asks only that it be
    arbitrary). Any other packet, or any packet outside that state, goes to asyncssh's method.
    """

    __slots__ = (
        "cbc", "conn", "lean", "lean_cipher", "padding", "padding_at", "seen", "send", "swaps", "unlogged",
    )  # fmt: skip

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.send = conn.send_packet
        self.cbc: bool | None = None  # read at the first IGNORE; get_extra_info costs too much per packet
        self.seen: Any = None  # the send encryption object last looked at
        self.unlogged = _quiet(conn)
        swaps = all(
            hasattr(conn, name) for name in ("_send_encryption", "_recv_encryption", "_next_recv_encryption")
        )
        self.lean = swaps and self.unlogged and all(hasattr(conn, name) for name in _LEAN_STATE)
        self.lean_cipher = False
        self.padding = b""
        self.padding_at = _PADDING_POOL
        self.swaps = swaps  # false: not the asyncssh this was written for, so only the IGNORE trim
        if swaps:
            self.new_keys()  # a client tunes after connect: keys are already in place

    def new_keys(self) -> None:
        conn = self.conn
        _swap_ciphers(conn)
        enc = self.seen = conn._send_encryption
        # AEAD: the length is authenticated, not encrypted, so padding aligns what follows it
        # (asyncssh's `_send_enchdrlen` is 1 there: just the padding length byte).
        self.lean_cipher = self.lean and type(enc) in (FastGcm, FastChacha) and conn._send_enchdrlen == 1

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        conn = self.conn
        if self.swaps and conn._send_encryption is not self.seen:
            self.new_keys()
        if (
            self.lean_cipher
            and pkttype > MSG_USERAUTH_LAST
            and conn._kex_complete
            and conn._auth_complete
            and not conn._deferred_packets
            and conn._compressor is None
            and conn._rekey_bytes_sent < conn._rekey_bytes
            and not (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)
        ):
            self._send_lean(pkttype, args)
            return
        if pkttype == MSG_IGNORE:
            if self.cbc is None:
                self.cbc = str(conn.get_extra_info("send_cipher", "")).endswith("-cbc")
            if not self.cbc:
                return
        self.send(pkttype, *args, handler=_UNLOGGED if self.unlogged else handler)

    def _send_lean(self, pkttype: int, args: tuple[bytes, ...]) -> None:
        conn = self.conn
        size = 1 + sum(map(len, args))  # the payload: type byte, then the fields
        blocksize = conn._send_blocksize
        padlen = -(1 + size) % blocksize  # padding length (1) + payload + padding: whole blocks
        if padlen < 4:
            padlen += blocksize
        at = self.padding_at
        if at + padlen > _PADDING_POOL:
            self.padding, at = os.urandom(_PADDING_POOL), 0
        self.padding_at = at + padlen
        body = b"".join((_BYTE[padlen], _BYTE[pkttype], *args, self.padding[at : at + padlen]))
        length = len(body)
        seq = conn._send_seq
        packet, mac = conn._send_encryption.encrypt_packet(seq, length.to_bytes(4, "big"), body)
        conn._send(packet + mac)  # mac is empty for the stateful ciphers: no copy
        conn._send_seq = (seq + 1) & 0xFFFFFFFF
        conn._rekey_bytes_sent += length


def tune(conn: Any) -> None:
    """Install the trims on one asyncssh connection (client or server side)."""
    path = _PacketPath(conn)
    conn.send_packet = path.send_packet
    conn._recv_data = Receiver(conn, unlogged=path.unlogged).recv_data
