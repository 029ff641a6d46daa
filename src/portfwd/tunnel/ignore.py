"""Leave out asyncssh's empty SSH_MSG_IGNORE before each packet, except under a CBC cipher.

asyncssh (2.24, `SSHConnection.send_packet`) precedes every packet after key exchange with an
empty SSH_MSG_IGNORE: RFC 4251 §9.3.1's countermeasure against chosen-plaintext attacks on
CBC's chained IVs. Under the modes negotiated in practice — AES-GCM, ChaCha20-Poly1305,
AES-CTR — there is no chained IV to protect, and OpenSSH sends no such packets. In a tunnel
the extra packet doubles the packets asyncssh builds, pads and encrypts: with ChaCha20 that
is four more OpenSSL calls a packet.

It is done per connection, on the instance: asyncssh sends the IGNORE through
`self.send_packet`, so wrapping that one bound method drops exactly those packets and
nothing else, and asyncssh's classes stay untouched. Under a `-cbc` cipher every packet
still gets its IGNORE. The cipher is read once, at the first IGNORE (just after the first key
exchange): a rekey negotiates from the same lists, so it picks the same cipher.
"""

from __future__ import annotations

from typing import Any

from asyncssh.constants import MSG_IGNORE


def skip_needless_ignores(conn: Any) -> None:
    """Wrap `conn.send_packet` so it sends no SSH_MSG_IGNORE unless the send cipher is CBC."""
    send = conn.send_packet
    cbc: list[bool] = []  # filled at the first IGNORE; get_extra_info costs too much per packet

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE:
            if not cbc:
                cbc.append(str(conn.get_extra_info("send_cipher", "")).endswith("-cbc"))
            if not cbc[0]:
                return
        send(pkttype, *args, handler=handler)

    conn.send_packet = send_packet
