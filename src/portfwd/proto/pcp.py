"""A sans-IO PCP client codec (RFC 6887): MAP requests to bytes, router replies to events.

PCP is NAT-PMP's successor on the same port (5351). A MAP request carries a 96-bit nonce that
the router ties to the mapping: renewing or deleting it needs the same nonce (another gets
NOT_AUTHORIZED), so the driver keeps one per mapping for its whole life. Addresses are always
16 bytes; IPv4 goes as an IPv4-mapped IPv6 address (::ffff:a.b.c.d).

A router that speaks only NAT-PMP answers a PCP request with a NAT-PMP "unsupported version"
reply; `parse_reply` says so, which lets `method = "auto"` move on at once.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal, NamedTuple

PORT = 5351
VERSION = 2

OP_ANNOUNCE = 0
OP_MAP = 1

PROTOCOLS = {"tcp": 6, "udp": 17}
Protocol = Literal["tcp", "udp"]

#: RFC 6887 §8.1.1: IRT 3 s, doubling with ±10 % jitter, capped at MRT 1024 s.
RETRY_FIRST = 3.0
RETRY_MAX = 1024.0
#: The RFC's schedule has no end; 4 tries (3 + 6 + 12 + 24 s = 45 s) before saying "no answer".
RETRY_COUNT = 4

HEADER = 24
#: A grant shorter than this cannot be renewed in time (renewal is at half the lease).
MIN_LIFETIME = 2
MAP_BODY = 36
NONCE = 12

#: Result codes (RFC 6887 §7.4) and what a person should do about them.
RESULTS = {
    1: "UNSUPP_VERSION (the router does not speak PCP version 2)",
    2: "NOT_AUTHORIZED (the router's policy refuses this mapping)",
    3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION",
    6: "MALFORMED_OPTION",
    7: "NETWORK_FAILURE (the router has no external address yet)",
    8: "NO_RESOURCES (the router's mapping table is full)",
    9: "UNSUPP_PROTOCOL",
    10: "USER_EX_QUOTA (this host has too many mappings)",
    11: "CANNOT_PROVIDE_EXTERNAL (the external port asked for is taken)",
    12: "ADDRESS_MISMATCH (the router sees another source address; a NAT between us and it?)",
    13: "EXCESSIVE_REMOTE_PEERS",
}
CANNOT_PROVIDE_EXTERNAL = 11
NOT_AUTHORIZED = 2
UNSUPP_VERSION = 1

_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


class PcpReplyError(Exception):
    """A datagram that is not a usable answer; `result` is the router's code when it sent one."""

    def __init__(self, message: str, result: int | None = None, lifetime: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.result = result
        #: For errors, how long the router says not to ask again (RFC 6887 §8.3).
        self.lifetime = lifetime


class MapReply(NamedTuple):
    """What the router granted for a MAP request."""

    epoch: int
    lifetime: int
    nonce: bytes
    protocol: Protocol
    internal_port: int
    external_port: int
    external_address: ipaddress.IPv4Address | ipaddress.IPv6Address


def pack_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """16 bytes, IPv4 as ::ffff:a.b.c.d (RFC 6887 §5)."""
    if isinstance(address, ipaddress.IPv4Address):
        return _V4_MAPPED + address.packed
    return address.packed


def unpack_address(data: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Inverse of `pack_address`."""
    if data[:12] == _V4_MAPPED:
        return ipaddress.IPv4Address(data[12:16])
    return ipaddress.IPv6Address(data)


def map_request(
    *,
    nonce: bytes,
    protocol: Protocol,
    internal_port: int,
    external_port: int,
    lifetime: int,
    client: ipaddress.IPv4Address | ipaddress.IPv6Address,
    external_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
) -> bytes:
    """A MAP request; lifetime 0 deletes (with the nonce that created the mapping)."""
    if len(nonce) != NONCE:
        raise ValueError("a PCP nonce is 12 bytes")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime {lifetime} does not fit PCP's 32 bits")
    if not 1 <= internal_port <= 65535 or not 0 <= external_port <= 65535:
        raise ValueError("ports must be in 1-65535 (external 0 = any)")
    if external_address is None:
        external_address = (
            ipaddress.IPv4Address(0)
            if isinstance(client, ipaddress.IPv4Address)
            else ipaddress.IPv6Address(0)
        )
    header = struct.pack("!BBHI", VERSION, OP_MAP, 0, lifetime) + pack_address(client)
    body = (
        nonce
        + struct.pack("!B3xHH", PROTOCOLS[protocol], internal_port, external_port)
        + pack_address(external_address)
    )
    return header + body


def parse_reply(data: bytes, request: bytes) -> MapReply:
    """Decode the router's answer to the MAP `request`; raise PcpReplyError for anything else."""
    if len(data) >= 4 and data[0] == 0:
        # RFC 6887 §9: a NAT-PMP-only router answers with its own version 0 and result 1.
        raise PcpReplyError("the router speaks NAT-PMP, not PCP (it answered with version 0)", UNSUPP_VERSION)
    if len(data) < HEADER:
        raise PcpReplyError(f"PCP reply truncated to {len(data)} bytes (want {HEADER + MAP_BODY})")
    version, r_op, _reserved, result, lifetime, epoch = struct.unpack_from("!BBBBII", data)
    if version != VERSION:
        raise PcpReplyError(f"PCP reply with version {version} (want {VERSION})")
    if not r_op & 0x80:
        raise PcpReplyError("PCP datagram is a request, not a reply")
    if r_op & 0x7F != OP_MAP:
        raise PcpReplyError(f"PCP reply with opcode {r_op & 0x7F} (want {OP_MAP}, MAP): not ours")
    if len(data) < HEADER + MAP_BODY:
        raise PcpReplyError(f"PCP reply truncated to {len(data)} bytes (want {HEADER + MAP_BODY})")
    if len(data) % 4:
        raise PcpReplyError(f"PCP reply of {len(data)} bytes is not a multiple of 4")
    nonce = data[HEADER : HEADER + NONCE]
    if nonce != request[HEADER : HEADER + NONCE]:
        raise PcpReplyError("PCP reply with another nonce: not the answer to our request")
    proto_number, internal, external = struct.unpack_from("!B3xHH", data, HEADER + NONCE)
    asked_proto, asked_internal = struct.unpack_from("!B3xH", request, HEADER + NONCE)
    if proto_number != asked_proto or internal != asked_internal:
        raise PcpReplyError(
            f"PCP reply for protocol {proto_number} port {internal} "
            f"(asked {asked_proto} port {asked_internal}): not ours"
        )
    if result != 0:
        reason = RESULTS.get(result, "unknown result code")
        raise PcpReplyError(f"router refused: PCP result {result}, {reason}", result, lifetime)
    (asked_lifetime,) = struct.unpack_from("!I", request, 4)
    if asked_lifetime and lifetime < MIN_LIFETIME:
        raise PcpReplyError(f"router granted a lease of {lifetime} s: too short to keep alive")
    if asked_lifetime and external == 0:
        raise PcpReplyError("router granted external port 0: not a usable mapping")
    protocol: Protocol = "tcp" if proto_number == PROTOCOLS["tcp"] else "udp"
    address = unpack_address(data[HEADER + NONCE + 8 : HEADER + NONCE + 24])
    return MapReply(epoch, lifetime, nonce, protocol, internal, external, address)


def parse_announcement(data: bytes) -> int | None:
    """The epoch of an unsolicited ANNOUNCE reply (sent when a router restarts), else None."""
    if len(data) < HEADER or data[0] != VERSION or data[1] != 0x80 | OP_ANNOUNCE or data[3] != 0:
        return None
    (epoch,) = struct.unpack_from("!I", data, 8)
    return int(epoch)
