"""relay/upstream.py's Connect on real loopback sockets: answers known at once, and waits."""

from __future__ import annotations

import asyncio
import socket

import pytest

from portfwd.errors import UpstreamError
from portfwd.relay import latekeepalive
from portfwd.relay.listener import KEEPALIVE
from portfwd.relay.upstream import Connect

Outcome = list[tuple[socket.socket | None, UpstreamError | None]]


async def test_loopback_connects_before_the_constructor_returns() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: Outcome = []
    try:
        attempt = Connect([(socket.AF_INET, listener.getsockname())], 5, lambda s, e: outcome.append((s, e)))
        assert len(outcome) == 1, "no trip through the loop"
        sock, error = outcome[0]
        assert error is None
        assert sock is not None
        assert attempt._timer is None, "no timer was armed"
        assert sock.getpeername() == listener.getsockname()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sock.close()
    finally:
        listener.close()


async def test_a_refusal_is_known_at_once_and_the_next_address_tried() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = closed.getsockname()
    closed.close()
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: Outcome = []
    try:
        Connect([(socket.AF_INET, refused)], 5, lambda s, e: outcome.append((s, e)))
        assert outcome[0][0] is None
        error = outcome[0][1]
        assert error is not None
        assert (error.reason, error.message) == ("refused", "connection refused")
        outcome.clear()
        addresses = [(socket.AF_INET, refused), (socket.AF_INET, listener.getsockname())]
        Connect(addresses, 5, lambda s, e: outcome.append((s, e)))
        sock = outcome[0][0]
        assert sock is not None
        assert sock.getpeername() == listener.getsockname()
        sock.close()
    finally:
        listener.close()


@pytest.mark.parametrize("held", [False, True], ids=["at-once", "held"])
async def test_a_connect_that_must_wait_keeps_its_deadline(held: bool) -> None:
    """A listener whose backlog is full drops SYNs: the connect waits, then times out (also
    after a hold, where confirm() finds the connect still under way)."""
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[socket.socket | None, UpstreamError | None]] = loop.create_future()
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(stuck.getsockname())
            fillers.append(filler)
        holding: list[Connect] | None = [] if held else None
        attempt = Connect(
            [(socket.AF_INET, stuck.getsockname())], 0.3, lambda s, e: done.set_result((s, e)), holding
        )
        if holding is not None:
            assert holding == [attempt]
            assert attempt._timer is None, "no timer while held"
            attempt.confirm()
        assert not done.done()
        assert attempt._timer is not None
        sock, error = await asyncio.wait_for(done, 5)
        assert sock is None
        assert error is not None
        assert (error.reason, error.message) == ("timeout", "no answer within 0.3s")
    finally:
        for filler in fillers:
            filler.close()
        stuck.close()


async def test_a_held_connect_goes_on_at_confirm() -> None:
    """The forwarder begins a burst's connects, then confirms them: nothing is done before."""
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: Outcome = []
    held: list[Connect] = []
    try:
        attempt = Connect(
            [(socket.AF_INET, listener.getsockname())], 5, lambda s, e: outcome.append((s, e)), held
        )
        assert (outcome, held) == ([], [attempt])
        attempt.confirm()
        sock, error = outcome[0]
        assert error is None
        assert sock is not None
        assert sock.getpeername() == listener.getsockname()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sock.close()
        attempt.confirm()  # a second confirm is a no-op
        assert len(outcome) == 1

        outcome.clear()
        held.clear()
        cancelled = Connect(
            [(socket.AF_INET, listener.getsockname())], 5, lambda s, e: outcome.append((s, e)), held
        )
        cancelled.cancel()
        cancelled.confirm()
        assert outcome == [], "cancelled: done is never called"
        assert cancelled._waiting is None, "its socket was closed"
    finally:
        listener.close()


async def _armed(sock: socket.socket) -> bool:
    for _ in range(200):  # bounded: two passes of 10 ms, generously
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE):
            return True
        await asyncio.sleep(0.005)
    return False


async def test_late_keepalive_arms_the_sessions_still_open_and_skips_the_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two passes: a session added now is armed at the second one if it is still open. An
    ended one (-1) is skipped, even when another socket took its descriptor number since; a
    number that is closed by then (a bug elsewhere) costs nothing and stops nothing. The timer
    stops when nothing waits."""
    monkeypatch.setattr(latekeepalive, "PERIOD", 0.01)
    open_sessions = {7}
    late = latekeepalive.LateKeepalive(open_sessions)
    with socket.create_server(("127.0.0.1", 0)) as server:
        ended = socket.create_connection(server.getsockname())
        number = ended.fileno()
        ended.close()
        reused = socket.create_connection(server.getsockname())  # the lowest free number: the same
        closed = socket.create_connection(server.getsockname())
        lasting = socket.create_connection(server.getsockname())
        with lasting, reused:
            assert reused.fileno() == number
            late.add((6, number))  # the splice relay of `ended`: its session is over
            late.add(lambda: -1)  # a protocol relay's socket, closed
            late.add(lambda: 1_000_000)  # a descriptor number nobody has (EBADF)
            late.add((7, lasting.fileno()))  # a splice relay's, still open
            assert await _armed(lasting)
            assert lasting.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE[0]
            assert lasting.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE[1]
            assert lasting.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE[2]
            assert reused.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
            assert lasting.fileno() >= 0, "the descriptor stays its owner's"
            late.add(closed.fileno)
            closed.close()  # before its pass: fileno() says -1 then
            late.add(reused.fileno)  # after a bad entry, the passes go on
            assert await _armed(reused)
            assert closed.fileno() == -1
            for _ in range(200):
                if late._timer is None:
                    break
                await asyncio.sleep(0.005)
            assert late._timer is None, "no timer while nothing waits"
