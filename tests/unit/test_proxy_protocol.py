"""proto/proxy.py: PROXY protocol v1 and v2 headers, written and read back, and hostile input.

The bytes of the examples are the specification's own layouts (haproxy doc/proxy-protocol.txt);
nginx and haproxy reading what portfwd sends are in tests/integration/test_proxy_protocol.py.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portfwd.proto.proxy import SIGNATURE_V2, Header, ProxyError, Reader, header


def test_v1_is_the_specifications_line() -> None:
    assert (
        header(1, ("192.0.2.7", 51234), ("10.0.0.1", 443)) == b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\n"
    )
    assert header(1, ("2001:db8::7", 1), ("::1", 2)) == b"PROXY TCP6 2001:db8::7 ::1 1 2\r\n"
    assert (
        header(1, ("::ffff:192.0.2.7", 5), ("::ffff:10.0.0.1", 6)) == b"PROXY TCP4 192.0.2.7 10.0.0.1 5 6\r\n"
    )
    assert header(1, None, None) == b"PROXY UNKNOWN\r\n"


def test_v2_is_the_specifications_layout() -> None:
    sent = header(2, ("192.0.2.7", 51234), ("10.0.0.1", 443))
    assert sent == (
        SIGNATURE_V2
        + b"\x21\x11\x00\x0c"
        + bytes([192, 0, 2, 7, 10, 0, 0, 1])
        + (51234).to_bytes(2, "big")
        + b"\x01\xbb"
    )
    assert header(2, ("::1", 1), ("::1", 2), datagram=True)[12:16] == b"\x21\x22\x00\x24"
    assert header(2, None, None) == SIGNATURE_V2 + b"\x21\x00\x00\x00"


addresses = st.one_of(
    st.ip_addresses(v=4).map(str).map(lambda host: (host, 4)),
    st.ip_addresses(v=6).map(str).map(lambda host: (host, 6)),
)
ports = st.integers(0, 65535)


@given(
    version=st.sampled_from([1, 2]),
    client=st.ip_addresses(v=4),
    server=st.ip_addresses(v=4),
    p1=ports,
    p2=ports,
)
def test_what_is_written_reads_back_whole_even_a_byte_at_a_time(
    version: int, client: ipaddress.IPv4Address, server: ipaddress.IPv4Address, p1: int, p2: int
) -> None:
    sent = header(version, (str(client), p1), (str(server), p2)) + b"GET / HTTP/1.0\r\n"
    reader = Reader()
    found = None
    for index in range(len(sent)):
        found = reader.feed(sent[index : index + 1])
        if found is not None:
            break
    assert found == Header(version, (str(client), p1), (str(server), p2))
    assert reader.rest + sent[index + 1 :] == b"GET / HTTP/1.0\r\n"


@given(data=st.binary(max_size=300))
def test_any_bytes_give_a_header_a_wait_or_one_proxy_error(data: bytes) -> None:
    reader = Reader()
    problem = ""
    found: Header | None = None
    try:
        found = reader.feed(data)
    except ProxyError as exc:
        problem = str(exc)
    assert "\n" not in problem
    assert found is None or isinstance(found, Header)


@given(data=st.binary(min_size=1, max_size=120))
def test_a_v1_line_of_junk_is_refused_not_believed(data: bytes) -> None:
    reader = Reader()
    try:
        found = reader.feed(b"PROXY " + data + b"\r\n")
    except ProxyError:
        return
    assert found is not None
    assert found.source is None or ipaddress.ip_address(found.source[0])


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (b"GET / HTTP/1.1\r\n", "no PROXY header (the sender must speak the PROXY protocol, v1 or v2)"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "a PROXY v1 line must be: PROXY TCP4|TCP6 SRC DST SPORT DPORT"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "PROXY v1: ::1 is not an IPv4 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "PROXY v1: '65536' is not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "PROXY v1: '01' is not a port"),
        (b"PROXY " + b"x" * 120, "a PROXY v1 line longer than 107 bytes"),
        (SIGNATURE_V2 + b"\x11\x11\x00\x0c" + bytes(12), "PROXY v2: version 1 is not 2"),
        (
            SIGNATURE_V2 + b"\x21\x31\x00\x0c" + bytes(12),
            "PROXY v2: address family 0x31 is not TCP or UDP over IPv4/IPv6",
        ),
        (
            SIGNATURE_V2 + b"\x21\x11\x00\x04" + bytes(4),
            "PROXY v2: 4 bytes cannot hold two addresses and ports",
        ),
        (SIGNATURE_V2 + b"\x21\x11\xff\xff", "PROXY v2: an address block of 65535 bytes (at most 4096)"),
    ],
)
def test_a_bad_header_is_one_line_naming_what_is_wrong(sent: bytes, error: str) -> None:
    with pytest.raises(ProxyError) as caught:
        Reader().feed(sent)
    assert str(caught.value) == error


def test_v2_skips_the_tlvs_after_the_addresses_and_reads_local_as_no_address() -> None:
    tlv = b"\x04\x00\x02ab"  # PP2_TYPE_NOOP
    body = bytes([127, 0, 0, 2, 127, 0, 0, 1]) + b"\x10\x00\x00\x50" + tlv
    reader = Reader()
    assert reader.feed(SIGNATURE_V2 + b"\x21\x11" + len(body).to_bytes(2, "big") + body + b"hi") == Header(
        2, ("127.0.0.2", 4096), ("127.0.0.1", 80)
    )
    assert reader.rest == b"hi"
    assert Reader().feed(SIGNATURE_V2 + b"\x20\x00\x00\x00") == Header(2, None, None)


@given(
    version=st.sampled_from([1, 2]),
    client=st.ip_addresses(v=4),
    server=st.ip_addresses(v=4),
    p1=ports,
    p2=ports,
)
def test_the_ipv4_fast_path_writes_what_the_general_one_does(
    version: int, client: ipaddress.IPv4Address, server: ipaddress.IPv4Address, p1: int, p2: int
) -> None:
    from portfwd.proto import proxy

    written = header(version, (str(client), p1), (str(server), p2))
    if version == 1:
        assert written == f"PROXY TCP4 {client} {server} {p1} {p2}\r\n".encode()
    else:
        body = client.packed + server.packed + p1.to_bytes(2, "big") + p2.to_bytes(2, "big")
        assert written == SIGNATURE_V2 + b"\x21\x11\x00\x0c" + body
    assert proxy._ipv4("1.02.3.4") is None, "not as the kernel writes it: the general path decides"
    assert proxy._ipv4("1.2.3.256") is None


def test_only_ascii_dotted_quads_are_packed_as_ipv4() -> None:
    """Digits of other scripts are digits to Python's int(), not to the kernel."""
    assert header(2, ("10.0.0.1", 1), ("10.0.0.2", 2)).endswith(bytes([10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2]))
    with pytest.raises(ProxyError, match="not an IP address"):
        header(2, ("\u0661.2.3.4", 1), ("1.2.3.4", 2))
