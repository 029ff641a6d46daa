"""relay/forwarder.py's client descriptions, on real sockets."""

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
