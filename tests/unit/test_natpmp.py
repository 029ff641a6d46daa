"""The NAT-PMP codec: bytes in, events out; every other datagram is one precise error."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from portfwd.proto import natpmp
from portfwd.proto.natpmp import Epoch, ExternalAddress, Mapping, NatPmpReplyError

MAP = natpmp.map_request("tcp", 8000, 18000, 3600)


def map_reply(
    result: int = 0, internal: int = 8000, external: int = 18000, lifetime: int = 3600, op: int = 130
) -> bytes:
    return struct.pack("!BBHIHHI", 0, op, result, 77, internal, external, lifetime)


def test_requests_are_the_rfc_bytes() -> None:
    assert natpmp.external_address_request() == b"\x00\x00"
    assert bytes.fromhex("0002 0000 1f40 4650 00000e10".replace(" ", "")) == MAP
    assert natpmp.map_request("udp", 53, 0, 0)[:2] == b"\x00\x01"


def test_replies_become_events() -> None:
    address = struct.pack("!BBHI", 0, 128, 0, 9) + bytes([203, 0, 113, 1])
    assert natpmp.parse_reply(address, natpmp.external_address_request()) == ExternalAddress(
        9, ipaddress.IPv4Address("203.0.113.1")
    )
    assert natpmp.parse_reply(map_reply(), MAP) == Mapping(77, "tcp", 8000, 18000, 3600)


@pytest.mark.parametrize("cut", range(16))
def test_every_truncation_is_an_error(cut: int) -> None:
    with pytest.raises(NatPmpReplyError, match=r"truncated to \d+ bytes \(want 16\)"):
        natpmp.parse_reply(map_reply()[:cut], MAP)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (map_reply(op=129), "NAT-PMP reply with opcode 129 (want 130): not ours"),
        (b"\x02" + map_reply()[1:], "NAT-PMP reply with version 2 (want 0)"),
        (map_reply(internal=9), "NAT-PMP reply for internal port 9 (asked 8000): not ours"),
        (map_reply() + b"\0", "NAT-PMP reply of 17 bytes (want 16): not a NAT-PMP answer"),
        (map_reply(lifetime=0), "router granted a lease of 0 s: too short to keep alive"),
        (map_reply(lifetime=1), "router granted a lease of 1 s: too short to keep alive"),
        (map_reply(external=0), "router granted external port 0: not a usable mapping"),
        (
            map_reply(result=2),
            "router refused: NAT-PMP result 2, not authorized or refused (mapping switched off on the "
            "router, or not allowed for this port)",
        ),
        (map_reply(result=3)[:4], "router refused: NAT-PMP result 3, network failure (the router has no external address yet)"),
        (map_reply(result=99), "router refused: NAT-PMP result 99, unknown result code"),
    ],
)  # fmt: skip
def test_bad_replies_are_one_line(reply: bytes, message: str) -> None:
    with pytest.raises(NatPmpReplyError) as caught:
        natpmp.parse_reply(reply, MAP)
    assert caught.value.message == message


def test_result_code_is_kept_so_the_driver_stops_retrying() -> None:
    with pytest.raises(NatPmpReplyError) as caught:
        natpmp.parse_reply(map_reply(result=4), MAP)
    assert caught.value.result == 4


def test_a_delete_may_answer_lifetime_and_port_zero() -> None:
    delete = natpmp.map_request("tcp", 8000, 0, 0)
    assert natpmp.parse_reply(map_reply(external=0, lifetime=0), delete) == Mapping(77, "tcp", 8000, 0, 0)


def test_announcements() -> None:
    announcement = struct.pack("!BBHI", 0, 128, 0, 5) + bytes([203, 0, 113, 9])
    assert natpmp.parse_announcement(announcement) == ExternalAddress(5, ipaddress.IPv4Address("203.0.113.9"))
    assert natpmp.parse_announcement(announcement[:11]) is None
    assert natpmp.parse_announcement(map_reply()) is None


def test_request_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="internal port 0 is not in 1-65535"):
        natpmp.map_request("tcp", 0, 0, 60)
    with pytest.raises(ValueError, match="does not fit"):
        natpmp.map_request("tcp", 1, 0, 2**32)


def test_epoch_tells_a_reboot_from_drift() -> None:
    epoch = Epoch()
    assert epoch.observe(1000, now=0.0) is False
    assert epoch.observe(1100, now=100.0) is False, "in step"
    assert epoch.observe(1190, now=200.0) is False, "slow router clock within 7/8 and 2 s of slack"
    assert epoch.observe(1195, now=300.0) is True, "grew 5 s in 100 s: the router restarted"
    assert epoch.observe(3, now=301.0) is True, "went backwards"
    assert epoch.observe(5, now=303.0) is False
