"""A sans-IO NAT-PMP client codec (RFC 6886): requests to bytes, router replies to events.

NAT-PMP is three small UDP messages to the default gateway's port 5351: "what is my external
address", "map this TCP/UDP port for N seconds" and the same with lifetime 0 to delete. The
driver in `router/natpmp.py` owns the socket, the retransmissions and the clock; this module
only checks that a datagram really is the answer to the request that was sent (version,
opcode, length) and turns the router's result code into a sentence a person can act on.

Every reply carries the router's epoch (seconds since its mapping table was last reset);
`Epoch` applies RFC 6886 §3.6 to tell a router that rebooted, and lost every mapping, from one
whose clock merely drifted.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal, NamedTuple

PORT = 5351  #: where the gateway listens
CLIENT_PORT = 5350  #: where a router announces a new address or a reboot (224.0.0.1)
VERSION = 0

OP_EXTERNAL = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2

#: RFC 6886 §3.1: first retry after 250 ms, doubling, at most 9 tries (64 s in all).
RETRY_FIRST = 0.25
RETRY_COUNT = 9

Protocol = Literal["tcp", "udp"]

#: A grant shorter than this cannot be renewed in time (renewal is at half the lease).
MIN_LIFETIME = 2

RESULTS = {
    1: "unsupported version (the router speaks another protocol)",
    2: "not authorized or refused (mapping switched off on the router, or not allowed for this port)",
    3: "network failure (the router has no external address yet)",
    4: "out of resources (the router's mapping table is full)",
    5: "unsupported opcode",
}


class NatPmpReplyError(Exception):
    """A datagram that is not a usable answer; `result` is the router's code when it sent one."""

    def __init__(self, message: str, result: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.result = result


class ExternalAddress(NamedTuple):
    """The router's answer to opcode 0."""

    epoch: int
    address: ipaddress.IPv4Address


class Mapping(NamedTuple):
    """The router's answer to a map (or delete) request: what it actually granted."""

    epoch: int
    protocol: Protocol
    internal_port: int
    external_port: int
    lifetime: int


def external_address_request() -> bytes:
    """Opcode 0: ask for the external IPv4 address."""
    return struct.pack("!BB", VERSION, OP_EXTERNAL)


def map_request(protocol: Protocol, internal_port: int, external_port: int, lifetime: int) -> bytes:
    """Map (or, with lifetime 0, delete) `internal_port`; `external_port` 0 lets the router choose."""
    _check_port("internal port", internal_port, allow_zero=lifetime == 0)
    _check_port("external port", external_port, allow_zero=True)
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime {lifetime} does not fit NAT-PMP's 32 bits")
    op = OP_MAP_TCP if protocol == "tcp" else OP_MAP_UDP
    return struct.pack("!BBHHHI", VERSION, op, 0, internal_port, external_port, lifetime)


def parse_reply(data: bytes, request: bytes) -> ExternalAddress | Mapping:
    """Decode the router's answer to `request`; raise NatPmpReplyError for anything else."""
    if len(request) < 2:
        raise ValueError("not a NAT-PMP request")
    op = request[1]
    want = 12 if op == OP_EXTERNAL else 16
    if len(data) < 4:
        raise NatPmpReplyError(f"NAT-PMP reply truncated to {len(data)} bytes (want {want})")
    version, reply_op, result = struct.unpack_from("!BBH", data)
    if version != VERSION:
        raise NatPmpReplyError(f"NAT-PMP reply with version {version} (want 0)")
    if reply_op != 128 + op:
        raise NatPmpReplyError(f"NAT-PMP reply with opcode {reply_op} (want {128 + op}): not ours")
    if result != 0:
        reason = RESULTS.get(result, "unknown result code")
        raise NatPmpReplyError(f"router refused: NAT-PMP result {result}, {reason}", result)
    if len(data) < want:
        raise NatPmpReplyError(f"NAT-PMP reply truncated to {len(data)} bytes (want {want})")
    if len(data) > want:
        raise NatPmpReplyError(f"NAT-PMP reply of {len(data)} bytes (want {want}): not a NAT-PMP answer")
    (epoch,) = struct.unpack_from("!I", data, 4)
    if op == OP_EXTERNAL:
        return ExternalAddress(epoch, ipaddress.IPv4Address(data[8:12]))
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    asked_internal, _asked_external, asked_lifetime = struct.unpack_from("!HHI", request, 4)
    if internal != asked_internal:
        raise NatPmpReplyError(
            f"NAT-PMP reply for internal port {internal} (asked {asked_internal}): not ours"
        )
    if asked_lifetime and not external:
        raise NatPmpReplyError("router granted external port 0: not a usable mapping")
    if asked_lifetime and lifetime < MIN_LIFETIME:
        raise NatPmpReplyError(f"router granted a lease of {lifetime} s: too short to keep alive")
    protocol: Protocol = "tcp" if op == OP_MAP_TCP else "udp"
    return Mapping(epoch, protocol, internal, external, lifetime)


def parse_announcement(data: bytes) -> ExternalAddress | None:
    """An unsolicited address announcement sent to 224.0.0.1:5350, or None if it is not one."""
    if len(data) != 12 or data[0] != VERSION or data[1] != 128 + OP_EXTERNAL or data[2:4] != b"\0\0":
        return None
    (epoch,) = struct.unpack_from("!I", data, 4)
    return ExternalAddress(epoch, ipaddress.IPv4Address(data[8:12]))


class Epoch:
    """RFC 6886 §3.6 (and RFC 6887 §8.5): did the router lose its state since the last reply?

    The router's epoch counts seconds; ours counts too. If the router's count grew much less
    than ours (less than 7/8 of it, minus 2 s of slack) or went backwards, the router
    restarted and every mapping must be made again.
    """

    def __init__(self) -> None:
        self._last: tuple[int, float] | None = None

    def observe(self, epoch: int, now: float) -> bool:
        """Record a reply's epoch at local time `now`; True if the router lost its mappings."""
        last = self._last
        self._last = (epoch, now)
        if last is None:
            return False
        last_epoch, last_now = last
        elapsed = max(0.0, now - last_now)
        return epoch < last_epoch or epoch + 2 < last_epoch + elapsed * 7 / 8


def _check_port(name: str, port: int, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{name} {port} is not in {low}-65535")
