"""Coarse deadlines for many short waits: one loop timer for all of them, not one each.

A per-connection wait (an upstream connect, a channel open) needs a deadline that almost never
fires. `asyncio.timeout` and even a bare `call_later` cost several times a dict entry, which is
what a wait costs here (bench/RESULTS.md, design measurement D1).
The price is resolution: a deadline fires up to `tick` seconds late, never early — right for
timeouts counted in seconds.

    result = await deadlines.within(10.0, something())  # TimeoutError after 10 s (to 10.5 s)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Deadlines:
    """Cancels the tasks whose deadline has passed, checked every `tick` seconds while any wait.

    Bound to the event loop of its first wait (one per process, in portfwd)."""

    __slots__ = ("_expired", "_loop", "_tick", "_timer", "_waits")

    def __init__(self, tick: float = 0.5) -> None:
        self._tick = tick
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first wait
        self._waits: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def within(self, seconds: float, awaitable: Awaitable[T]) -> T:
        """`await awaitable`, or TimeoutError once `seconds` have passed (like asyncio.timeout)."""
        task = self.enter(seconds)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.expired(task):
                raise TimeoutError from None
            raise  # anyone else's cancel passes on
        finally:
            self.leave(task)

    def enter(self, seconds: float) -> asyncio.Task[Any]:
        """Start a deadline for the current task; pair with `leave` in a `finally`."""
        loop = self._loop
        if loop is None:
            # Asked once: on Python 3.11 every get_running_loop() is a getpid() system call (its
            # fork check), a cost per connection (bench/RESULTS.md, D17).
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("Deadlines.enter() needs a running task")
        # The clock itself, not loop.time(): uvloop's is the time its loop iteration began, so
        # a deadline set late in a long iteration would fire early by as much.
        self._waits[task] = time.monotonic() + seconds
        if self._timer is None:
            self._timer = loop.call_later(self._tick, self._sweep, loop)
        return task

    def leave(self, task: asyncio.Task[Any]) -> None:
        """The wait is over (either way); an expiry that cancelled it is consumed here."""
        self._waits.pop(task, None)
        if self._expired:
            self._expired.discard(task)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether a CancelledError in `task` came from its deadline (then it is uncancelled)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        task.uncancel()
        return True

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        for task, due in list(self._waits.items()):
            if due <= now:
                del self._waits[task]
                self._expired.add(task)
                task.cancel()
        self._timer = loop.call_later(self._tick, self._sweep, loop) if self._waits else None

    def close(self) -> None:
        """Stop the timer (the waits themselves are their tasks' to end)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waits.clear()
        self._expired.clear()
