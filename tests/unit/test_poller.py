"""relay/poller.py on real sockets: readiness, changes of interest, closing, a failing watcher."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from portfwd.relay.poller import IN, OUT, READABLE, WRITABLE, Poller


class Seen:
    """A watcher that notes what it was told and, on demand, reads what is there."""

    def __init__(self, drain: socket.socket | None = None, fail: bool = False) -> None:
        self.events: list[tuple[int, int]] = []
        self.woke = asyncio.Event()
        self.drain = drain
        self.fail = fail

    def ready(self, fd: int, events: int) -> None:
        self.events.append((fd, events))
        self.woke.set()
        if self.drain is not None and events & IN:
            self.drain.recv(4096)
        if self.fail:
            raise RuntimeError("a bug")


async def woken(seen: Seen) -> None:
    await asyncio.wait_for(seen.woke.wait(), 5)
    seen.woke.clear()


async def test_readable_writable_and_changes_of_interest() -> None:
    poller = Poller()
    left, right = socket.socketpair()
    left.setblocking(False)
    right.setblocking(False)
    try:
        seen = Seen(drain=left)
        poller.register(left.fileno(), IN, seen)
        right.send(b"x")
        await woken(seen)
        assert seen.events[-1] == (left.fileno(), IN)
        assert seen.events[-1][1] & READABLE
        poller.modify(left.fileno(), OUT)  # a socket with room to write is writable at once
        await woken(seen)
        assert seen.events[-1][1] & WRITABLE
        poller.unregister(left.fileno())
        seen.events.clear()
        right.send(b"y")
        await asyncio.sleep(0.05)
        assert seen.events == []
    finally:
        poller.close()
        left.close()
        right.close()


async def test_a_closed_descriptor_leaves_the_set() -> None:
    poller = Poller()
    left, right = socket.socketpair()
    try:
        seen = Seen()
        fd = left.fileno()
        poller.register(fd, IN, seen)
        poller.forget(fd)
        left.close()  # closing takes it out of the epoll set: no stale registration remains
        again, other = socket.socketpair()  # likely the same descriptor number
        try:
            fresh = Seen(drain=again)
            poller.register(again.fileno(), IN, fresh)
            other.send(b"z")
            await woken(fresh)
            assert seen.events == []
        finally:
            again.close()
            other.close()
    finally:
        poller.close()
        right.close()


async def test_a_failing_watcher_is_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    poller = Poller()
    left, right = socket.socketpair()
    try:
        seen = Seen(fail=True)  # never reads: level-triggered, it would be called forever
        poller.register(left.fileno(), IN, seen)
        with caplog.at_level(logging.ERROR, logger="portfwd.relay.poller"):
            right.send(b"x")
            await woken(seen)
            await asyncio.sleep(0.05)
        assert len(seen.events) == 1, "unregistered after the failure, not spinning"
        assert f"watcher of descriptor {left.fileno()} failed; no longer watched" in caplog.text
    finally:
        poller.close()
        left.close()
        right.close()
