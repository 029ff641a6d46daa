"""Per-connection trims of asyncssh's packet path: no needless IGNOREs, ciphers that keep state.

Three costs asyncssh (2.24) pays on every packet, removed here on the connection instance
only (asyncssh's classes stay untouched, and other connections in the process are unaffected):

- **An empty SSH_MSG_IGNORE before each packet** after key exchange (`send_packet`): RFC 4251
  §9.3.1's countermeasure against chosen-plaintext attacks on CBC's chained IVs. Under the
  modes negotiated in practice — AES-GCM, ChaCha20-Poly1305, AES-CTR — there is no chained IV
  to protect, and OpenSSH sends no such packets. In a tunnel the extra packet doubled the
  packets asyncssh builds, pads and encrypts. Under a `-cbc` cipher every packet keeps it.
- **A new cipher object per packet** for AES-GCM and ChaCha20-Poly1305: the connection's
  encryption objects are swapped for `tunnel/aead.py`'s, which produce the same bytes from
  state made once per key (see there for the numbers).
- **Log lines rendered for nobody**: each packet sent or received is described (type name,
  byte count) before asyncssh's packet logger checks its debug level, and its INFO lines
  (three per channel) convert their arguments before the logging level is checked. Unless
  packet logging is on (`asyncssh.set_debug_level(3)` and DEBUG enabled), the connection and
  each channel it makes skip the description, and the connection's logger (which its
  channels' loggers copy) checks the level first. Profiled under `wrk`, these were 5 to 7 % of
  the tunnel's CPU.

Both hook into the one method asyncssh sends every packet through, `send_packet`: asyncssh
calls it as `self.send_packet`, so the instance attribute wins. New keys (the first key
exchange and every rekey) show up there as a new `_send_encryption` object; it and the
receive side's pending or current object are swapped at once, carrying over the GCM
invocation counter, before the first packet under the new keys. An object of any other
type (another cipher, or a future asyncssh whose internals moved) is left as it is.
"""

from __future__ import annotations

import logging
from typing import Any

from asyncssh.constants import MSG_IGNORE
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.logging import SSHLogger

from portfwd.tunnel.aead import FastChacha, FastGcm, chacha_available


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


def tune(conn: Any) -> None:
    """Install the trims on one asyncssh connection (client or server side)."""
    send = conn.send_packet
    seen: list[Any] = [None]  # the send encryption object last looked at
    cbc: list[bool] = []  # filled at the first IGNORE; get_extra_info costs too much per packet
    if not all(
        hasattr(conn, name) for name in ("_send_encryption", "_recv_encryption", "_next_recv_encryption")
    ):
        seen = []  # not the asyncssh this was written for: only the IGNORE trim

    unlogged = _quiet(conn)

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if seen and conn._send_encryption is not seen[0]:
            _swap_ciphers(conn)
            seen[0] = conn._send_encryption
        if pkttype == MSG_IGNORE:
            if not cbc:
                cbc.append(str(conn.get_extra_info("send_cipher", "")).endswith("-cbc"))
            if not cbc[0]:
                return
        send(pkttype, *args, handler=_UNLOGGED if unlogged else handler)

    conn.send_packet = send_packet
    if seen:
        _swap_ciphers(conn)  # a client tunes after connect: keys are already in place
        seen[0] = conn._send_encryption
