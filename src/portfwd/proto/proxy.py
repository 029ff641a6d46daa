"""The PROXY protocol, v1 (text) and v2 (binary): the header that tells a backend who the client is.

haproxy's specification (doc/proxy-protocol.txt): a proxy sends one header at the start of the
upstream connection, before any byte of the client's, naming the client's address and port and
the address it connected to; nginx (`listen ... proxy_protocol`), haproxy (`accept-proxy`),
Postfix, Dovecot and others read it and log or filter by the real client.

`header(version, source, destination)` writes one. `Reader` reads one from the bytes a
connection delivers (sans-IO: feed what arrived, get the header and what followed it); every
malformed header is a `ProxyError` naming what is wrong. Written here rather than taken from
PyPI: the packages there (proxy-protocol, proxyprotocol) are unmaintained or pull in their own
asyncio servers; the format is two small, fixed layouts.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass

#: v2's 12-byte signature; v1 begins with "PROXY ".
SIGNATURE_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest v1 line, CRLF included (the specification's 107 bytes).
V1_MAX = 107
#: v2's command and address-family bytes.
_PROXY, _LOCAL = 0x21, 0x20
_TCP4, _UDP4, _TCP6, _UDP6, _UNSPEC = 0x11, 0x12, 0x21, 0x22, 0x00
#: The start of every v2 header of an IPv4 TCP or UDP client (12 bytes of addresses follow).
_V2_TCP4 = SIGNATURE_V2 + bytes((_PROXY, _TCP4)) + b"\x00\x0c"
_V2_UDP4 = SIGNATURE_V2 + bytes((_PROXY, _UDP4)) + b"\x00\x0c"
_PORTS = struct.Struct("!HH")
#: The largest v2 address block portfwd accepts (the addresses plus TLVs it skips).
V2_MAX_LENGTH = 4096

Address = tuple[str, int]


class ProxyError(ValueError):
    """A PROXY header that cannot be read: one line naming what is wrong."""


@dataclass(frozen=True, slots=True)
class Header:
    """A header read: the client (`source`) and where it connected (`destination`); both None
    for a header that names no address (v1 UNKNOWN, v2 LOCAL or an unspecified family)."""

    version: int
    source: Address | None
    destination: Address | None
    datagram: bool = False


@functools.lru_cache(maxsize=4096)
def _ipv4(host: str) -> bytes | None:
    """A dotted-quad IPv4 address packed (as the kernel writes it: no leading zeros), else None.
    About 5 µs a header faster than an ipaddress object, which a relayed connection pays; the
    cache makes a repeated address (the listen address, a returning client) 0.1 µs instead of
    1 (bench/RESULTS.md, D19, D24). Bounded: a flood of new sources only misses it."""
    parts = host.split(".")
    if len(parts) != 4:
        return None
    try:
        numbers = [
            int(part)
            for part in parts
            if part.isascii() and part.isdigit() and (part == "0" or part[0] != "0")
        ]
        return bytes(numbers) if len(numbers) == 4 else None
    except ValueError:  # a part over 255
        return None


def _plain(host: str) -> str:
    """An IPv4 client of a dual-stack socket (`::ffff:1.2.3.4`) as the IPv4 address it is."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def header(
    version: int, source: Address | None, destination: Address | None, *, datagram: bool = False
) -> bytes:
    """The header a backend is sent first. `source`/`destination` None (a Unix socket client):
    v1 `UNKNOWN`, v2 an unspecified address family. Raises ProxyError on a bad address."""
    if source is None or destination is None:
        if version == 1:
            return b"PROXY UNKNOWN\r\n"
        return SIGNATURE_V2 + bytes((_PROXY, _UNSPEC)) + b"\x00\x00"
    client_v4, server_v4 = _ipv4(_plain(source[0])), _ipv4(_plain(destination[0]))
    if client_v4 is not None and server_v4 is not None:  # the common case: no ipaddress objects
        if version == 1:
            shown = f"{_plain(source[0])} {_plain(destination[0])} {source[1]} {destination[1]}"
            return f"PROXY TCP4 {shown}\r\n".encode()
        ports = _PORTS.pack(source[1], destination[1])
        return (_V2_UDP4 if datagram else _V2_TCP4) + client_v4 + server_v4 + ports
    try:
        client = ipaddress.ip_address(_plain(source[0]))
        server = ipaddress.ip_address(_plain(destination[0]))
    except ValueError as exc:
        raise ProxyError(f"not an IP address: {exc}") from None
    if client.version != server.version:  # a v4 client of a v6 listener, not mapped: say v6
        client, server = (
            ipaddress.IPv6Address(f"::ffff:{item}") if item.version == 4 else item
            for item in (client, server)
        )
    if version == 1:
        word = "TCP4" if client.version == 4 else "TCP6"
        return f"PROXY {word} {client} {server} {source[1]} {destination[1]}\r\n".encode()
    families = {(4, False): _TCP4, (4, True): _UDP4, (6, False): _TCP6, (6, True): _UDP6}
    family = families[client.version, datagram]
    body = client.packed + server.packed + struct.pack("!HH", source[1], destination[1])
    return SIGNATURE_V2 + bytes((_PROXY, family)) + struct.pack("!H", len(body)) + body


def local_header(version: int) -> bytes:
    """The header of a connection the proxy makes for itself (a health check): v2 LOCAL, v1
    UNKNOWN; the receiver keeps the connection's own addresses."""
    if version == 1:
        return b"PROXY UNKNOWN\r\n"
    return SIGNATURE_V2 + bytes((_LOCAL, _UNSPEC)) + b"\x00\x00"


class Reader:
    """Reads one PROXY header (v1 or v2) from the start of a connection's bytes.

    `feed(data)` returns None while more bytes are needed, else the Header; `rest` is then what
    followed it (the client's own first bytes). Raises ProxyError for anything that is not a
    whole, well-formed header: no signature, a v1 line over 107 bytes, a bad address or port.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self.rest = b""

    def feed(self, data: bytes) -> Header | None:
        self._buffer += data
        buffer = self._buffer
        if buffer.startswith(b"PROXY "):
            return self._v1(buffer)
        if buffer.startswith(SIGNATURE_V2):
            return self._v2(buffer) if len(buffer) >= 16 else None
        if b"PROXY ".startswith(buffer) or SIGNATURE_V2.startswith(buffer):
            return None  # a prefix of either: wait for more
        raise ProxyError("no PROXY header (the sender must speak the PROXY protocol, v1 or v2)")

    def _v1(self, buffer: bytes) -> Header | None:
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) >= V1_MAX:
                raise ProxyError("a PROXY v1 line longer than 107 bytes")
            return None
        if end + 2 > V1_MAX:
            raise ProxyError("a PROXY v1 line longer than 107 bytes")
        line, self.rest = buffer[:end], buffer[end + 2 :]
        try:
            words = line.decode("ascii").split(" ")
        except UnicodeDecodeError:
            raise ProxyError("a PROXY v1 line that is not ASCII") from None
        if len(words) >= 2 and words[1] == "UNKNOWN":
            return Header(1, None, None)
        if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
            raise ProxyError("a PROXY v1 line must be: PROXY TCP4|TCP6 SRC DST SPORT DPORT")
        want = 4 if words[1] == "TCP4" else 6
        source = (_ip(words[2], want), _port(words[4]))
        destination = (_ip(words[3], want), _port(words[5]))
        return Header(1, source, destination)

    def _v2(self, buffer: bytes) -> Header | None:
        command, family = buffer[12], buffer[13]
        (length,) = struct.unpack("!H", buffer[14:16])
        if command >> 4 != 2:
            raise ProxyError(f"PROXY v2: version {command >> 4} is not 2")
        if command & 0x0F not in (0, 1):
            raise ProxyError(f"PROXY v2: unknown command {command & 0x0F}")
        if length > V2_MAX_LENGTH:
            raise ProxyError(f"PROXY v2: an address block of {length} bytes (at most {V2_MAX_LENGTH})")
        if len(buffer) < 16 + length:
            return None
        body, self.rest = buffer[16 : 16 + length], buffer[16 + length :]
        if command == _LOCAL or family == _UNSPEC:
            return Header(2, None, None)
        sizes = {_TCP4: 4, _UDP4: 4, _TCP6: 16, _UDP6: 16}
        size = sizes.get(family)
        if size is None:
            raise ProxyError(f"PROXY v2: address family 0x{family:02x} is not TCP or UDP over IPv4/IPv6")
        if length < 2 * size + 4:
            raise ProxyError(f"PROXY v2: {length} bytes cannot hold two addresses and ports")
        source_port, destination_port = struct.unpack("!HH", body[2 * size : 2 * size + 4])
        client = str(ipaddress.ip_address(body[:size]))
        server = str(ipaddress.ip_address(body[size : 2 * size]))
        return Header(2, (client, source_port), (server, destination_port), datagram=family in (_UDP4, _UDP6))


def _ip(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"PROXY v1: {text[:40]!r} is not an IP address") from None
    if address.version != version:
        raise ProxyError(f"PROXY v1: {text} is not an IPv{version} address")
    return str(address)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 0 <= int(text) <= 65535 or (text[0] == "0" and text != "0"):
        raise ProxyError(f"PROXY v1: {text[:8]!r} is not a port")
    return int(text)
