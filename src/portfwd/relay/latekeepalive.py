"""TCP keepalive on the upstream side of a relayed connection, turned on once it outlives a second.

Why late: keepalive is for connections that go silent for a minute (listener.KEEPALIVE: the
first probe after 60 s of silence), and turning it on takes four setsockopt() calls on every
upstream socket (the client's side inherits it from the listener at no cost). Most relayed
connections are short (one HTTP request), and those four calls were 3 % of the splice path's
connections a second (bench/RESULTS.md, D26). Here a new session costs a list append; a second
or two later, each one still open gets its four calls. A peer that vanishes is found at most two
seconds later than with keepalive from the start (about two minutes of silence either way).

Safe against reused descriptors: each entry is asked for its descriptor when its time comes
(-1 once the relay ended and closed it), so a number another socket took since is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from portfwd.relay.listener import keepalive

#: Seconds between the passes; a session gets keepalive after between one and two of them.
PERIOD = 1.0


class LateKeepalive:
    """Gathers the upstream sockets of new sessions; turns keepalive on for those still open
    one to two PERIODs later (two generations, one timer)."""

    __slots__ = ("_aging", "_loop", "_timer", "_young")

    def __init__(self) -> None:
        self._young: list[Callable[[], int]] = []  # since the last pass
        self._aging: list[Callable[[], int]] = []  # from the pass before: their turn next
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, descriptor: Callable[[], int]) -> None:
        """A new session: `descriptor()` is its upstream socket's descriptor, -1 once closed."""
        self._young.append(descriptor)
        if self._timer is None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._timer = loop.call_later(PERIOD, self._pass)

    def _pass(self) -> None:
        due, self._aging, self._young = self._aging, self._young, []
        try:
            for descriptor in due:
                fd = descriptor()
                if fd >= 0:
                    _arm(fd)
        finally:  # whatever happened, the next pass is planned (or none is needed)
            self._timer = None
            if self._aging:
                assert self._loop is not None
                self._timer = self._loop.call_later(PERIOD, self._pass)


def _arm(fd: int) -> None:
    """Keepalive on a relay's TCP socket. The family and type are given, not asked of the
    socket (two getsockopt calls): setsockopt does not depend on them."""
    with contextlib.suppress(OSError):  # a peer that reset meanwhile: nothing to keep alive
        borrowed = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
        try:
            keepalive(borrowed)
        finally:
            borrowed.detach()  # the descriptor stays the relay's
