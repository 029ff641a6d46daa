"""relay/forwarder.py's client descriptions and relay/proxyout.py's PROXY headers, on real sockets."""

from __future__ import annotations

import os
import socket

from portfwd.relay.forwarder import describe_peer


def test_a_unix_client_is_described_by_its_credentials_as_socket_or_descriptor() -> None:
    """The forwarder holds clients as bare descriptors, the tunnels as socket objects: both
    show the peer's pid and uid, and a descriptor stays open and the caller's."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    expected = f"unix(pid={os.getpid()},uid={os.getuid()})"
    try:
        assert describe_peer(left, "") == expected
        fd = right.detach()
        try:
            assert describe_peer(fd, "") == expected
            os.fstat(fd)  # still open
        finally:
            os.close(fd)
    finally:
        left.close()


def test_ip_clients_are_described_by_address() -> None:
    assert describe_peer(-1, ("127.0.0.1", 40000)) == "127.0.0.1:40000"
    assert describe_peer(-1, ("::1", 40000, 0, 0)) == "[::1]:40000"
    assert describe_peer(-1, ("::ffff:10.0.0.1", 40000, 0, 0)) == "10.0.0.1:40000"


def test_a_proxy_header_names_the_address_the_client_reached() -> None:
    """One IP listen address is the destination every client reached, so the header is made
    without asking the socket; a wildcard, a name or a scoped address asks it (getsockname),
    and both ways make the same header."""
    from portfwd.addr import parse_listen
    from portfwd.proto.proxy import Reader
    from portfwd.relay.proxyout import listening_address, proxy_header

    assert listening_address(parse_listen("127.0.0.1:8080"), None) == ("127.0.0.1", 8080)
    assert listening_address(parse_listen("127.0.0.1:8000-8009"), 8003) == ("127.0.0.1", 8003)
    assert listening_address(parse_listen("[::1]:8080"), None) == ("::1", 8080)
    for asks in ("0.0.0.0:8080", "[::]:8080", "8080", "localhost:8080", "[fe80::1%lo]:8080"):
        assert listening_address(parse_listen(asks), None) is None, asks

    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))  # the wildcard; the client below comes over loopback only
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            accepted, peer = listener.accept()
            with accepted:
                for version in (1, 2):
                    asked = proxy_header(version, accepted.fileno(), peer)
                    known = proxy_header(version, accepted.fileno(), peer, ("127.0.0.1", port))
                    assert asked == known
                    found = Reader().feed(asked + b"rest")
                    assert found is not None
                    assert found.source == ("127.0.0.1", client.getsockname()[1])
                    assert found.destination == ("127.0.0.1", port)
