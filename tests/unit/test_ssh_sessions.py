"""The SSH session layer (portfwd/ssh/sessions.py): a failing session closes its socket and its
session, and stop() cancels and awaits every session task. No SSH peer needed."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket

import pytest

from portfwd.counters import RuleStats
from portfwd.ssh.sessions import Sessions
from portfwd.state import State


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


async def test_an_unexpected_error_closes_the_client_and_the_session_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = State()
    stats = RuleStats("t")
    sessions = Sessions(state, "ssh", label="t")
    client, peer = _pair()
    reached = asyncio.Event()

    async def broken() -> None:
        sessions.bridge(stats, "c", "t", channel_is_client=False)
        reached.set()
        raise RuntimeError("a bug")

    with caplog.at_level(logging.ERROR, logger="portfwd.ssh.sessions"):
        sessions.spawn(broken(), client=client)
        await reached.wait()
        await sessions.stop()
    assert client.fileno() == -1, "the client socket is closed"
    assert peer.recv(1) == b"", "and the peer sees EOF"
    assert state.sessions == {}
    assert (stats.connections_total, stats.connections_active) == (1, 0)
    assert [record.getMessage() for record in caplog.records] == [
        "t: session ended by an unexpected error: RuntimeError: a bug"
    ]
    peer.close()


async def test_stop_cancels_and_awaits_the_session_tasks() -> None:
    state = State()
    stats = RuleStats("t")
    sessions = Sessions(state, "ssh-server")
    client, peer = _pair()
    started = asyncio.Event()
    ended: list[str] = []

    async def waits() -> None:
        sessions.bridge(stats, "c", "t", channel_is_client=True)
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            ended.append("finally ran")

    sessions.spawn(waits(), client=client)
    await started.wait()
    await sessions.stop()
    assert ended == ["finally ran"], "stop() returned only after the task ended"
    assert client.fileno() == -1
    assert state.sessions == {}
    peer.close()


async def test_a_socket_handed_to_a_transport_is_not_closed_by_the_session() -> None:
    state = State()
    stats = RuleStats("t")
    released: list[object] = []
    sessions = Sessions(state, "ssh-server", released=released.append)
    client, peer = _pair()
    owner = object()
    attached, emptied = asyncio.Event(), asyncio.Event()
    state.on_empty = emptied.set

    async def attaches() -> None:
        bridge = sessions.bridge(stats, "c", "t", channel_is_client=True, owner=owner)
        assert await sessions.attach(bridge, client)
        attached.set()

    sessions.spawn(attaches(), client=client)
    await attached.wait()
    assert len(state.sessions) == 1, "the session relays on after its task ended"
    assert sessions.owned_by(owner)
    await sessions.stop("shutdown")
    async with asyncio.timeout(5):
        await emptied.wait()  # the transport aborts on the next turn of the loop
    assert released == [owner], "the owner's channel count is given back once"
    assert peer.recv(1) == b"", "the transport closed the socket"
    peer.close()


async def test_a_relaying_session_does_not_keep_its_task_scope() -> None:
    """The transport keeps a copy of the attaching task's context; the scope must not be in it
    (it cost a few hundred bytes per idle tunnelled connection)."""
    state = State()
    stats = RuleStats("t")
    sessions = Sessions(state, "ssh")
    client, peer = _pair()
    attached = asyncio.Event()

    async def attaches() -> None:
        bridge = sessions.bridge(stats, "c", "t", channel_is_client=False)
        assert await sessions.attach(bridge, client)
        attached.set()

    sessions.spawn(attaches(), client=client)
    try:
        await attached.wait()
        await asyncio.sleep(0)  # the task ends
        gc.collect()
        assert len(state.sessions) == 1, "still relaying"
        assert [item for item in gc.get_objects() if type(item).__name__ == "_Scope"] == []
    finally:
        await sessions.stop()
        await asyncio.sleep(0)  # the transport aborts on the next turn of the loop
        peer.close()
