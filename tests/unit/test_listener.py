"""relay/listener.py: what a listening socket made by bind_ip gives the sockets it accepts."""

from __future__ import annotations

import socket

import pytest

from portfwd.relay.listener import NODELAY_INHERITED, bind_ip


@pytest.mark.skipif(not NODELAY_INHERITED, reason="TCP_NODELAY is inherited on Linux only")
def test_accepted_clients_come_with_nodelay() -> None:
    """The forwarder skips setsockopt(TCP_NODELAY) per client on the strength of this."""
    listener = bind_ip("forward[1]", "127.0.0.1", 0, socket.SOCK_STREAM, backlog=8, dual_stack=False)
    client = socket.create_connection(listener.getsockname())
    listener.setblocking(True)
    accepted, _ = listener.accept()
    assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert not client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    for sock in (accepted, client, listener):
        sock.close()
