"""A tiny RFC 5389/5780 STUN responder for the lab's wan namespace (stdlib only).

miniupnpd refuses to forward on a reserved WAN address such as 203.0.113.1 unless a STUN server
tells it that address is public and unfiltered (TESTBED §3, obstacle 2). This answers every
Binding request with MAPPED-ADDRESS and XOR-MAPPED-ADDRESS, from the other address and/or port
when CHANGE-REQUEST asks for it. Usage: python stun.py PRIMARY ALTERNATE PORT ALTPORT
"""

from __future__ import annotations

import selectors
import socket
import struct
import sys

COOKIE = 0x2112A442


def answer(request: bytes, peer: tuple[str, int]) -> tuple[bytes, int] | None:
    """The Binding response for `request` and the CHANGE-REQUEST flags, or None if not one."""
    if len(request) < 20 or request[0:2] != b"\x00\x01":
        return None
    flags = 0
    offset = 20
    while offset + 4 <= len(request):
        kind, length = struct.unpack_from("!HH", request, offset)
        if kind == 0x0003 and length == 4:
            (flags,) = struct.unpack_from("!I", request, offset + 4)
        offset += 4 + (length + 3) // 4 * 4
    address = socket.inet_aton(peer[0])
    mapped = struct.pack("!HHBBH", 0x0001, 8, 0, 1, peer[1]) + address
    xor_address = bytes(a ^ b for a, b in zip(address, struct.pack("!I", COOKIE), strict=True))
    xored = struct.pack("!HHBBH", 0x0020, 8, 0, 1, peer[1] ^ (COOKIE >> 16)) + xor_address
    body = mapped + xored
    return struct.pack("!HH", 0x0101, len(body)) + request[4:20] + body, flags


def main() -> None:
    primary, alternate, port, alt_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    socks: dict[tuple[bool, bool], socket.socket] = {}
    for change_ip in (False, True):
        for change_port in (False, True):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((alternate if change_ip else primary, alt_port if change_port else port))
            socks[change_ip, change_port] = sock
    selector = selectors.DefaultSelector()
    for sock in socks.values():
        selector.register(sock, selectors.EVENT_READ)
    print("stun ready", flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data, peer = sock.recvfrom(2048)
            reply = answer(data, peer)
            if reply is not None:
                response, flags = reply
                socks[bool(flags & 4), bool(flags & 2)].sendto(response, peer)


if __name__ == "__main__":
    main()
