"""Per-connection trims of asyncssh's packet path: no needless IGNOREs, ciphers that keep state.

Two costs asyncssh (2.24) pays on every packet, removed here on the connection instance only
(asyncssh's classes stay untouched, and other connections in the process are unaffected):

- **An empty SSH_MSG_IGNORE before each packet** after key exchange (`send_packet`): RFC 4251
  §9.3.1's countermeasure against chosen-plaintext attacks on CBC's chained IVs. Under the
  modes negotiated in practice — AES-GCM, ChaCha20-Poly1305, AES-CTR — there is no chained IV
  to protect, and OpenSSH sends no such packets. In a tunnel the extra packet doubled the
  packets asyncssh builds, pads and encrypts. Under a `-cbc` cipher every packet keeps it.
- **A new cipher object per packet** for AES-GCM and ChaCha20-Poly1305: the connection's
  encryption objects are swapped for `tunnel/aead.py`'s, which produce the same bytes from
  state made once per key (see there for the numbers).

Both hook into the one method asyncssh sends every packet through, `send_packet`: asyncssh
calls it as `self.send_packet`, so the instance attribute wins. New keys (the first key
exchange and every rekey) show up there as a new `_send_encryption` object; it and the
receive side's pending or current object are swapped at once, carrying over the GCM
invocation counter, before the first packet under the new keys. An object of any other
type (another cipher, or a future asyncssh whose internals moved) is left as it is.
"""

from __future__ import annotations

from typing import Any

from asyncssh.constants import MSG_IGNORE
from asyncssh.encryption import ChachaEncryption, GCMEncryption

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


def tune(conn: Any) -> None:
    """Install both trims on one asyncssh connection (client or server side)."""
    send = conn.send_packet
    seen: list[Any] = [None]  # the send encryption object last looked at
    cbc: list[bool] = []  # filled at the first IGNORE; get_extra_info costs too much per packet
    if not all(
        hasattr(conn, name) for name in ("_send_encryption", "_recv_encryption", "_next_recv_encryption")
    ):
        seen = []  # not the asyncssh this was written for: only the IGNORE trim

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if seen and conn._send_encryption is not seen[0]:
            _swap_ciphers(conn)
            seen[0] = conn._send_encryption
        if pkttype == MSG_IGNORE:
            if not cbc:
                cbc.append(str(conn.get_extra_info("send_cipher", "")).endswith("-cbc"))
            if not cbc[0]:
                return
        send(pkttype, *args, handler=handler)

    conn.send_packet = send_packet
    if seen:
        _swap_ciphers(conn)  # a client tunes after connect: keys are already in place
        seen[0] = conn._send_encryption
