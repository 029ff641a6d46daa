"""Readiness for the splice relay's sockets: one epoll set of our own, watched by the loop as one reader.

Why not `loop.add_reader` per socket: on uvloop every descriptor that gets a reader becomes a
libuv poll handle, and making and dropping one costs about eight system calls (a probing
epoll_ctl ADD and DEL, an ioctl(FIONBIO), the real ADD, a DEL on stop and one more on close,
some of them failing). A relayed connection has two sockets, and a short connection (one HTTP
request) paid sixteen of those calls on top of the ones that move its bytes (strace -c under
`wrk`, bench/run.py). Here a socket costs one epoll_ctl to register, one per change of
interest, and none to leave: closing the descriptor takes it out of the set.

Level-triggered, like the loop's readers: a watcher that leaves data unread is called again.
A watcher is told the descriptor and the event mask (`ready(fd, events)`); EPOLLERR and
EPOLLHUP come whatever the interest. The watcher itself is stored, not a callback made for
it: a bound method per socket would cost an idle relayed connection about 150 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
from typing import Protocol

# Linux's values, so that this module imports anywhere (only the splice path, Linux, polls).
IN = getattr(select, "EPOLLIN", 0x001)
OUT = getattr(select, "EPOLLOUT", 0x004)
#: The peer has shut down its writing (its FIN is in): the last bytes, then EOF, are waiting.
RDHUP = getattr(select, "EPOLLRDHUP", 0x2000)
_ERR_HUP = getattr(select, "EPOLLERR", 0x008) | getattr(select, "EPOLLHUP", 0x010)
#: What wakes a reader or a writer: the direction itself, or an error or hang-up on the socket.
READABLE = IN | RDHUP | _ERR_HUP
WRITABLE = OUT | _ERR_HUP
#: Events taken per wake-up of the loop's reader; more stay pending and wake it again.
BATCH = 256


class Watcher(Protocol):
    """What the poller calls: a relay watching one or more of its descriptors."""

    def ready(self, fd: int, events: int) -> None:
        """`fd` is ready for `events` (a mask of select.EPOLL* bits)."""


log = logging.getLogger(__name__)


class Poller:
    """An epoll set whose ready descriptors are dispatched from the loop (see the module docstring)."""

    __slots__ = ("_epoll", "_loop", "_watchers")

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: dict[int, Watcher] = {}

    def register(self, fd: int, mask: int, watcher: Watcher) -> None:
        """Watch `fd` for `mask` (IN, OUT or both); `watcher.ready(fd, events)` runs when it is ready."""
        epoll = self._epoll
        if epoll is None:
            epoll = self._epoll = select.epoll()
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(epoll.fileno(), self._ready)
        epoll.register(fd, mask)
        self._watchers[fd] = watcher

    def modify(self, fd: int, mask: int) -> None:
        """Change what `fd` is watched for (mask non-zero; use `unregister` to stop watching)."""
        assert self._epoll is not None
        self._epoll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        """Stop watching `fd`, which stays open."""
        self._watchers.pop(fd, None)
        if self._epoll is not None:
            self._epoll.unregister(fd)

    def forget(self, fd: int) -> None:
        """`fd` is about to be closed, which takes it out of the set: drop its watcher only."""
        self._watchers.pop(fd, None)

    def _ready(self) -> None:
        assert self._epoll is not None
        try:
            events = self._epoll.poll(0, BATCH)
        except InterruptedError:
            return
        watchers = self._watchers
        for fd, mask in events:
            watcher = watchers.get(fd)
            if watcher is None:  # an earlier watcher in this batch closed it
                continue
            try:
                watcher.ready(fd, mask)
            except Exception:  # a bug in one relay: stop its spinning, keep the others going
                log.exception("relay poller: watcher of descriptor %d failed; no longer watched", fd)
                if watchers.get(fd) is watcher:
                    with contextlib.suppress(OSError):
                        self.unregister(fd)

    def close(self) -> None:
        """Stop dispatching and close the epoll set (the watched descriptors are their owners')."""
        if self._epoll is not None:
            assert self._loop is not None
            if not self._loop.is_closed():
                self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        self._watchers.clear()
