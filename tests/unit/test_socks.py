"""The SOCKS codec, byte for byte against RFC 1928/1929 and the SOCKS4/4a memos."""

from __future__ import annotations

import asyncssh
import pytest

from portfwd.errors import UpstreamError
from portfwd.proto.socks import Reply, Request, SocksError, SocksServer
from portfwd.ssh.errors import socks_reply_for


def feed_all(codec: SocksServer, data: bytes, step: int = 1) -> tuple[Request | None, bytes]:
    """Feed `data` in `step`-byte pieces; return the request and everything the codec answered."""
    out = b""
    request = None
    for at in range(0, len(data), step):
        request = codec.feed(data[at : at + step]) or request
        out += codec.outgoing()
    return request, out


@pytest.mark.parametrize("step", [1, 3, 100])
def test_socks5_connect_by_name_ipv4_ipv6(step: int) -> None:
    cases = [
        (b"\x05\x03\x00\x01\x02" + b"\x05\x01\x00\x03\x0bexample.org\x00\x50", "example.org", 80),
        (b"\x05\x01\x00" + b"\x05\x01\x00\x01\x0a\x00\x00\x05\x1f\x90", "10.0.0.5", 8080),
        (b"\x05\x01\x00" + b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x16", "::1", 22),
    ]
    for data, host, port in cases:
        codec = SocksServer()
        request, out = feed_all(codec, data + b"early", step)
        assert request == Request(5, host, port)
        assert out == b"\x05\x00"
        assert codec.trailing == b"early"
        assert codec.accept("127.0.0.1", 4000) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x0f\xa0"


def test_socks5_failure_replies() -> None:
    codec = SocksServer()
    feed_all(codec, b"\x05\x01\x00\x05\x01\x00\x01\x0a\x00\x00\x05\x00\x50")
    assert codec.refuse(Reply.CONNECTION_REFUSED) == b"\x05\x05\x00\x01" + bytes(6)


def test_socks4_and_4a() -> None:
    request, out = feed_all(SocksServer(), b"\x04\x01\x00\x50\x7f\x00\x00\x01bob\x00")
    assert request == Request(4, "127.0.0.1", 80, "bob")
    assert out == b""
    codec = SocksServer()
    request, _ = feed_all(codec, b"\x04\x01\x01\xbb\x00\x00\x00\x07\x00db.internal\x00", 2)
    assert request == Request(4, "db.internal", 443)
    assert codec.accept() == b"\x00\x5a\x00\x00" + bytes(4)
    assert codec.refuse(Reply.HOST_UNREACHABLE) == b"\x00\x5b" + bytes(6)


def test_password_authentication() -> None:
    codec = SocksServer(("alice", "s3cret"))
    request, out = feed_all(
        codec, b"\x05\x02\x00\x02" + b"\x01\x05alice\x06s3cret" + b"\x05\x01\x00\x03\x01h\x00\x50"
    )
    assert out == b"\x05\x02" + b"\x01\x00"
    assert request == Request(5, "h", 80, "alice")


@pytest.mark.parametrize(
    ("data", "credentials", "message", "reply"),
    [
        (b"GET / HTTP/1.1\r\n", None, "not a SOCKS request (first byte 0x47); expected SOCKS 4 or 5", b""),
        (
            b"\x05\x01\x02",
            None,
            "SOCKS5 client offered methods 2; this server needs no authentication (0)",
            b"\x05\xff",
        ),
        (
            b"\x05\x01\x00",
            ("a", "b"),
            "SOCKS5 client offered methods 0; this server needs username/password (2)",
            b"\x05\xff",
        ),
        (b"\x05\x01\x02\x01\x01a\x01x", ("a", "b"), "wrong SOCKS5 username or password for 'a'", b"\x01\x01"),
        (
            b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50",
            None,
            "SOCKS5 command BIND is not supported (only CONNECT)",
            b"\x05\x07\x00\x01" + bytes(6),
        ),
        (
            b"\x05\x01\x00\x05\x03\x00\x01\x7f\x00\x00\x01\x00\x50",
            None,
            "SOCKS5 command UDP ASSOCIATE is not supported (only CONNECT)",
            b"\x05\x07\x00\x01" + bytes(6),
        ),
        (
            b"\x05\x01\x00\x05\x01\x00\x07",
            None,
            "SOCKS5 address type 7 is not supported",
            b"\x05\x08\x00\x01" + bytes(6),
        ),
        (
            b"\x05\x01\x00\x05\x01\x00\x03\x03a b\x00\x50",
            None,
            "SOCKS host name 'a b' is not a valid name",
            b"\x05\x01\x00\x01" + bytes(6),
        ),
        (
            b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00",
            None,
            "SOCKS5 request for port 0",
            b"\x05\x01\x00\x01" + bytes(6),
        ),
        (
            b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00",
            None,
            "SOCKS4 command 2 is not supported (only CONNECT)",
            b"\x00\x5b" + bytes(6),
        ),
        (
            b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",
            ("a", "b"),
            "SOCKS4 cannot authenticate and this server requires a password",
            b"\x00\x5b" + bytes(6),
        ),
        (
            b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"x" * 1100,
            None,
            "request longer than 1024 bytes",
            b"\x00\x5b" + bytes(6),
        ),
    ],
)
def test_malformed_requests(
    data: bytes, credentials: tuple[str, str] | None, message: str, reply: bytes
) -> None:
    codec = SocksServer(credentials)
    with pytest.raises(SocksError) as caught:
        feed_all(codec, data, 1)
    assert caught.value.message == message
    assert caught.value.reply == reply


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "open failed"),
            Reply.NOT_ALLOWED,
        ),
        (
            asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused"),
            Reply.CONNECTION_REFUSED,
        ),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "No route to host"), Reply.HOST_UNREACHABLE),
        (
            asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Network is unreachable"),
            Reply.NETWORK_UNREACHABLE,
        ),
        (
            asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Name or service not known"),
            Reply.HOST_UNREACHABLE,
        ),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection timed out"), Reply.TTL_EXPIRED),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, "too many"), Reply.GENERAL_FAILURE),
        (TimeoutError(), Reply.TTL_EXPIRED),
        (UpstreamError("refused", reason="refused"), Reply.CONNECTION_REFUSED),
        (UpstreamError("x", reason="resolve"), Reply.HOST_UNREACHABLE),
    ],
)
def test_reply_codes_for_upstream_failures(error: BaseException, code: Reply) -> None:
    assert socks_reply_for(error) == code
