"""The PCP codec: MAP requests as RFC 6887 lays them out; replies checked field by field."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from portfwd.proto import pcp
from portfwd.proto.pcp import MapReply, PcpReplyError

NONCE = bytes(range(12))
CLIENT = ipaddress.IPv4Address("192.168.77.10")
REQUEST = pcp.map_request(
    nonce=NONCE, protocol="tcp", internal_port=8000, external_port=18000, lifetime=600, client=CLIENT
)


def reply(
    result: int = 0, lifetime: int = 600, nonce: bytes = NONCE, proto: int = 6, internal: int = 8000,
    external: int = 18000, op: int = 0x81, version: int = 2,
) -> bytes:  # fmt: skip
    header = struct.pack("!BBBBII", version, op, 0, result, lifetime, 42) + bytes(12)
    body = (
        nonce
        + struct.pack("!B3xHH", proto, internal, external)
        + pcp.pack_address(ipaddress.IPv4Address("203.0.113.1"))
    )
    return header + body


def test_request_layout() -> None:
    assert len(REQUEST) == 60
    assert REQUEST[:8] == bytes([2, 1, 0, 0]) + struct.pack("!I", 600)
    assert REQUEST[8:24] == bytes(10) + b"\xff\xff" + CLIENT.packed, "IPv4-mapped client address"
    assert REQUEST[24:36] == NONCE
    assert REQUEST[36:44] == bytes([6, 0, 0, 0]) + struct.pack("!HH", 8000, 18000)
    assert REQUEST[44:60] == bytes(10) + b"\xff\xff" + bytes(4), "no external address suggested"


def test_reply_becomes_an_event() -> None:
    assert pcp.parse_reply(reply(), REQUEST) == MapReply(
        42, 600, NONCE, "tcp", 8000, 18000, ipaddress.IPv4Address("203.0.113.1")
    )


@pytest.mark.parametrize("cut", range(60))
def test_every_truncation_is_an_error(cut: int) -> None:
    with pytest.raises(PcpReplyError, match=r"truncated to \d+ bytes \(want 60\)|version 0"):
        pcp.parse_reply(reply()[:cut], REQUEST)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (reply(nonce=bytes(12)), "PCP reply with another nonce: not the answer to our request"),
        (reply(op=0x82), "PCP reply with opcode 2 (want 1, MAP): not ours"),
        (reply(op=0x01), "PCP datagram is a request, not a reply"),
        (reply(version=1), "PCP reply with version 1 (want 2)"),
        (reply(proto=17), "PCP reply for protocol 17 port 8000 (asked 6 port 8000): not ours"),
        (reply(lifetime=0), "router granted a lease of 0 s: too short to keep alive"),
        (reply(external=0), "router granted external port 0: not a usable mapping"),
        (reply() + b"\0\0", "PCP reply of 62 bytes is not a multiple of 4"),
        (
            reply(result=11),
            "router refused: PCP result 11, CANNOT_PROVIDE_EXTERNAL (the external port asked for is taken)",
        ),
        (
            reply(result=2),
            "router refused: PCP result 2, NOT_AUTHORIZED (the router's policy refuses this mapping)",
        ),
        (b"\x00\x81\x00\x01" + bytes(4), "the router speaks NAT-PMP, not PCP (it answered with version 0)"),
    ],
)
def test_bad_replies_are_one_line(data: bytes, message: str) -> None:
    with pytest.raises(PcpReplyError) as caught:
        pcp.parse_reply(data, REQUEST)
    assert caught.value.message == message


def test_error_lifetime_is_kept() -> None:
    with pytest.raises(PcpReplyError) as caught:
        pcp.parse_reply(reply(result=8, lifetime=30), REQUEST)
    assert (caught.value.result, caught.value.lifetime) == (8, 30)


def test_delete_is_lifetime_zero_with_the_same_nonce() -> None:
    delete = pcp.map_request(
        nonce=NONCE, protocol="tcp", internal_port=8000, external_port=0, lifetime=0, client=CLIENT
    )
    assert delete[4:8] == bytes(4)
    assert delete[24:36] == NONCE
    assert pcp.parse_reply(reply(lifetime=0, external=0), delete).lifetime == 0


def test_ipv6_addresses_round_trip() -> None:
    address = ipaddress.IPv6Address("2001:db8::1")
    assert pcp.unpack_address(pcp.pack_address(address)) == address
    assert pcp.unpack_address(pcp.pack_address(CLIENT)) == CLIENT


def test_announce() -> None:
    announce = struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, 7) + bytes(12)
    assert pcp.parse_announcement(announce) == 7
    assert pcp.parse_announcement(reply()) is None


def test_request_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        pcp.map_request(
            nonce=b"x", protocol="tcp", internal_port=1, external_port=0, lifetime=1, client=CLIENT
        )
