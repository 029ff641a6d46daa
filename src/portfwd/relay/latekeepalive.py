"""TCP keepalive on the upstream side of a relayed connection, turned on once it outlives a second.

Why late: keepalive is for connections that go silent for a minute (listener.KEEPALIVE: the
first probe after 60 s of silence), and turning it on takes four setsockopt() calls on every
upstream socket (the client's side inherits it from the listener at no cost). Most relayed
connections are short (one HTTP request), and those four calls were 3 % of the splice path's
connections a second (bench/RESULTS.md, D26). Here a new session costs a list append; a second
or two later, each one still open gets its four calls. A peer that vanishes is found at most two
seconds later than with keepalive from the start (about two minutes of silence either way).

Safe against reused descriptors: a splice relay's entry is its session's id and descriptor,
armed only while the session is still registered (the relay closes its descriptors and ends
its session in one callback); a protocol relay's is its socket's `fileno` (-1 once its transport
closed it). So a number another socket took since is never touched. Neither keeps a relay, or
its session, alive: at 18,000 connections a second, two seconds of closed relays held here
would be some 36,000 objects the cyclic GC promotes and walks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Container

from portfwd.relay.listener import keepalive

#: Seconds between the passes; a session gets keepalive after between one and two of them.
PERIOD = 1.0


#: What waits for a pass: (session id, descriptor) for a splice relay, a socket's `fileno`
#: for a protocol relay.
Entry = tuple[int, int] | Callable[[], int]


class LateKeepalive:
    """Gathers the upstream sockets of new sessions; turns keepalive on for those still open
    one to two PERIODs later (two generations, one timer). `sessions`: the ids of the
    sessions still open (the state's registry)."""

    __slots__ = ("_aging", "_loop", "_sessions", "_timer", "_young")

    def __init__(self, sessions: Container[int]) -> None:
        self._sessions = sessions
        self._young: list[Entry] = []  # since the last pass
        self._aging: list[Entry] = []  # from the pass before: their turn next
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, entry: Entry) -> None:
        """A new session: `(session id, descriptor)` (a splice relay's), or a socket's `fileno`
        (-1 once closed)."""
        self._young.append(entry)
        if self._timer is None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._timer = loop.call_later(PERIOD, self._pass)

    def _pass(self) -> None:
        due, self._aging, self._young = self._aging, self._young, []
        sessions = self._sessions
        try:
            for entry in due:
                if isinstance(entry, tuple):
                    ident, fd = entry
                    if ident not in sessions:
                        continue
                else:
                    fd = entry()
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
