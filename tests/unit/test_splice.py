"""relay/splice.py's SpliceRelay on real TCP loopback connections: when the FIN is passed on."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from portfwd.counters import Session
from portfwd.relay.poller import Poller
from portfwd.relay.splice import PipePool, SpliceRelay, splice_available
from portfwd.state import State

pytestmark = pytest.mark.skipif(not splice_available(), reason="splice(2) is Linux-only")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    for end in (near, far):
        end.setblocking(False)
    return near, far


class CountingRelay(SpliceRelay):
    """Notes each readiness call for the upstream socket."""

    upstream_calls = 0

    def ready(self, fd: int, events: int) -> None:
        if fd == self.upstream:
            CountingRelay.upstream_calls += 1
        super().ready(fd, events)


class Owner:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.ended = asyncio.Event()

    def relay_closed(self, session: Session, reason: str) -> None:
        self.reasons.append(reason)
        self.ended.set()


@pytest.fixture
def ends() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    client_app, client_relay = tcp_pair()
    upstream_relay, upstream_app = tcp_pair()
    yield client_app, client_relay, upstream_relay, upstream_app
    for end in (client_app, client_relay, upstream_relay, upstream_app):
        end.close()


async def test_the_fin_follows_the_last_bytes_in_the_same_wakeup(
    ends: tuple[socket.socket, socket.socket, socket.socket, socket.socket],
) -> None:
    """The response and the FIN arrive together: both are passed on in one readiness call.

    Why it matters: a client that closes as soon as its response is complete would otherwise
    close first and hold the TIME_WAIT (see the module docstring)."""
    client_app, client_relay, upstream_relay, upstream_app = ends
    state = State()
    session = state.open_session(state.rule("r"), "client", "target", "splice")
    poller, pipes, owner = Poller(), PipePool(), Owner()
    upstream_app.sendall(b"response")
    upstream_app.shutdown(socket.SHUT_WR)  # both in before the relay looks
    CountingRelay.upstream_calls = 0
    relay = CountingRelay(client_relay.detach(), upstream_relay.detach(), session, owner, pipes, poller)
    try:
        relay.start()
        received = b""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            while chunk := await loop.sock_recv(client_app, 65536):
                received += chunk
        assert received == b"response"
        assert CountingRelay.upstream_calls == 1, "the EOF was read with the bytes, not a wake-up later"
        assert session.bytes_down == len(b"response")
        client_app.sendall(b"bye")
        client_app.shutdown(socket.SHUT_WR)
        got = b""
        async with asyncio.timeout(5):
            while chunk := await loop.sock_recv(upstream_app, 16):
                got += chunk
        assert got == b"bye"
        await asyncio.wait_for(owner.ended.wait(), 5)
        assert owner.reasons == ["upstream closed"]
    finally:
        relay.close("test over")
        poller.close()
        pipes.close()
