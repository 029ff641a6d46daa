"""relay/listener.py: what a listening socket made by bind_ip gives the sockets it accepts, and
what DescriptorListener hands the forwarder (both its accept4 and its portable path)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from portfwd.errors import BindError
from portfwd.relay import listener as listener_module
from portfwd.relay.listener import (
    NODELAY_INHERITED,
    DescriptorListener,
    bind_ip,
    bind_shared,
    bind_unix,
    shared_queues,
)


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


SO_COOKIE = getattr(socket, "SO_COOKIE", 57)  # Linux: one number per socket, its duplicates' too


def _cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def test_bind_shared_is_one_queue_and_refuses_a_held_address() -> None:
    """Every copy accepts from the same queue (one socket, no SO_REUSEPORT group another
    program could join); an address already held is refused with the rule's line."""
    group = bind_shared("forward[1]", "127.0.0.1", 0, 3, backlog=8, dual_stack=False)
    try:
        address = group[0].getsockname()
        assert len({sock.fileno() for sock in group}) == 3
        assert {sock.getsockname() for sock in group} == {address}
        assert len({_cookie(sock) for sock in group}) == 1
        assert not group[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        client = socket.create_connection(address)
        group[2].setblocking(True)
        accepted, peer = group[2].accept()  # queued at the listener, taken through a copy
        group[2].setblocking(False)
        assert peer == client.getsockname()
        accepted.close()
        client.close()
        with pytest.raises(BindError) as raised:
            bind_shared("forward[2]", "127.0.0.1", address[1], 2, backlog=8, dual_stack=False)
        assert raised.value.line().startswith(f"forward[2]: cannot listen on 127.0.0.1:{address[1]}: ")
    finally:
        for sock in group:
            sock.close()


def test_bind_shared_gives_at_most_four_processes_one_queue() -> None:
    """Ten processes: three queues (a SO_REUSEPORT group), process i on queue i % 3."""
    assert [shared_queues(count) for count in (1, 2, 4, 5, 8, 9, 64)] == [1, 1, 1, 2, 2, 3, 16]
    group = bind_shared("forward[1]", "127.0.0.1", 0, 10, backlog=8, dual_stack=False)
    try:
        cookies = [_cookie(sock) for sock in group]
        assert len(set(cookies)) == 3
        assert all(cookies[index] == cookies[index % 3] for index in range(10))
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for sock in group)
    finally:
        for sock in group:
            sock.close()


async def _accept_one(listener: socket.socket, client: socket.socket) -> tuple[int, Any]:
    """Start a DescriptorListener on `listener` and wait (bounded) for the client it hands over."""
    got: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    accepting = DescriptorListener(
        listener, lambda batch: [got.put_nowait(each) for each in batch], "forward[1]"
    )
    accepting.start()
    try:
        return await asyncio.wait_for(got.get(), 5)
    finally:
        accepting.close()
        client.close()


@pytest.fixture(params=["accept4", "portable"])
def accept_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways DescriptorListener accepts: accept4(2) through libc, and socket objects."""
    if request.param == "portable":
        monkeypatch.setattr(listener_module, "_ACCEPT4", None)
    elif listener_module._ACCEPT4 is None:
        pytest.skip("accept4 through libc is Linux-only")
    return str(request.param)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_descriptor_listener_hands_over_a_ready_descriptor(accept_path: str, host: str) -> None:
    """The forwarder relies on it: non-blocking, TCP_NODELAY on, and the peer as accept() gives it."""
    listener = bind_ip("forward[1]", host, 0, socket.SOCK_STREAM, backlog=8, dual_stack=False)
    client = socket.create_connection(listener.getsockname()[:2])
    where = client.getsockname()
    fd, peer = await _accept_one(listener, client)
    try:
        assert peer == where
        assert not os.get_blocking(fd)
        with socket.socket(fileno=os.dup(fd)) as accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert accepted.getpeername() == where
    finally:
        os.close(fd)


async def test_descriptor_listener_unix_peers(accept_path: str, tmp_path: Path) -> None:
    """A Unix client's address is its path: "" when unnamed (the usual case), else the path."""
    path = str(tmp_path / "in.sock")
    for named in ("", str(tmp_path / "client.sock")):
        listener = bind_unix("forward[1]", path, backlog=8)  # closed (and unlinked) by _accept_one
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if named:
            client.bind(named)
        client.connect(path)
        fd, peer = await _accept_one(listener, client)
        os.close(fd)
        assert peer == named
