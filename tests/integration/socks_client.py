"""A minimal SOCKS client written from the RFCs, independent of portfwd's codec, for tests."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

from tests.integration.peers import Address, open_client


def socks5_request(host: str, port: int, command: int = 1) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        encoded = host.encode()
        return bytes((5, command, 0, 3, len(encoded))) + encoded + struct.pack("!H", port)
    kind = 1 if address.version == 4 else 4
    return bytes((5, command, 0, kind)) + address.packed + struct.pack("!H", port)


async def socks5(
    entry: Address, host: str, port: int, credentials: tuple[str, str] | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """Open a SOCKS5 CONNECT; returns the streams and the reply code (0 = succeeded)."""
    reader, writer = await open_client(entry)
    method = 2 if credentials else 0
    writer.write(bytes((5, 1, method)))
    chosen = await reader.readexactly(2)
    if chosen != bytes((5, method)):
        return reader, writer, -1
    if credentials:
        user, password = (part.encode() for part in credentials)
        writer.write(bytes((1, len(user))) + user + bytes((len(password),)) + password)
        status = await reader.readexactly(2)
        if status != b"\x01\x00":
            return reader, writer, -2
    writer.write(socks5_request(host, port))
    head = await reader.readexactly(4)
    size = {1: 4, 4: 16}.get(head[3], 0)
    if head[3] == 3:
        size = (await reader.readexactly(1))[0]
    await reader.readexactly(size + 2)
    return reader, writer, head[1]


async def socks4(
    entry: Address, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """Open a SOCKS4 (IP) or SOCKS4a (name) CONNECT; returns the streams and the reply code (90 = granted)."""
    reader, writer = await open_client(entry)
    try:
        packed = ipaddress.IPv4Address(host).packed
        tail = b""
    except ValueError:
        packed = b"\0\0\0\x01"
        tail = host.encode() + b"\0"
    writer.write(b"\x04\x01" + struct.pack("!H", port) + packed + b"tester\0" + tail)
    reply = await reader.readexactly(8)
    return reader, writer, reply[1]
