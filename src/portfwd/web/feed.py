"""The live side of the dashboard: one status snapshot a second, shared by every watcher, and
each rule's and tunnel's byte rates over the last minutes.

While nobody watches, a tick only reads the rates the sampler already computed (and asks the
workers for theirs), so `[web]` on and unwatched costs next to nothing; while someone watches,
each tick builds one snapshot, encodes it once, and hands the same bytes to every watcher. A
watcher that stops reading loses old ticks, never memory: its queue keeps the newest few.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any

from portfwd.state import State

#: Seconds between ticks, and how many ticks of rates are kept (five minutes).
INTERVAL = 1.0
KEEP = 300
#: Ticks a watcher may fall behind before the oldest are dropped.
BACKLOG = 4
#: Watchers at once (each holds a connection open).
MAX_WATCHERS = 32
#: The kernel's flow list (a conntrack dump: its cost grows with the table, closed flows
#: included) is read at most every READ_EVERY seconds while someone watches, and never more
#: often than READ_COST times what the last read took: a busy box's dump of 0.5 s then costs
#: at most 2 % of a core, not half of one.
READ_EVERY = 5.0
READ_COST = 50.0
#: Rows of each session list a status event carries (the largest by bytes, live flows first);
#: how many were left out is in the event's `omitted`.
MAX_ROWS = 1000

Point = tuple[float, float, float]  # wall-clock, bytes/s up, bytes/s down


class Feed:
    """Ticks once per INTERVAL in a task of its own; `watch` gives a queue of encoded events."""

    def __init__(self, state: State, interval: float = INTERVAL) -> None:
        self.state = state
        self.interval = interval
        self.series: dict[str, deque[Point]] = {}
        self._watchers: set[asyncio.Queue[bytes]] = set()
        self._task: asyncio.Task[None] | None = None
        self.latest: bytes = b""  # the last status event sent (a new watcher starts with it)
        self._next_read = 0.0  # monotonic: when the kernel's flows may be read again

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="portfwd web feed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        for queue in list(self._watchers):
            _offer(queue, b"")  # the end: each stream finishes its response
        self._watchers.clear()

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def watch(self) -> asyncio.Queue[bytes] | None:
        """A queue of events for one watcher (b"" ends it), or None when MAX_WATCHERS watch."""
        if len(self._watchers) >= MAX_WATCHERS:
            return None
        queue: asyncio.Queue[bytes] = asyncio.Queue(BACKLOG)
        self._watchers.add(queue)
        return queue

    def leave(self, queue: asyncio.Queue[bytes]) -> None:
        self._watchers.discard(queue)

    def history(self) -> dict[str, Any]:
        """The rates kept so far: {"interval", "now", "series": {"rule:NAME": [[t, up, down]...]}}."""
        return {
            "interval": self.interval,
            "now": time.time(),
            "series": {key: [list(point) for point in points] for key, points in self.series.items()},
        }

    async def status_event(self) -> bytes:
        """A status event made now (for a watcher that just came)."""
        await self._refresh()
        return sse("status", bounded(self.state.status().to_json()))

    async def _refresh(self) -> None:
        began = time.monotonic()
        readers = began >= self._next_read
        await self.state.refresh(readers=readers)
        if readers:
            self._next_read = began + max(READ_EVERY, (time.monotonic() - began) * READ_COST)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.tick()

    async def tick(self) -> None:
        """One tick: the rates into the history and, with watchers, a snapshot to each."""
        state = self.state
        now = time.time()
        if self._watchers:
            await self._refresh()
            snapshot = state.status()
            rules, tunnels = snapshot.rules, snapshot.tunnels
            self.latest = sse("status", bounded(snapshot.to_json()))
            for queue in list(self._watchers):
                _offer(queue, self.latest)
        else:
            if state.refresher is not None:
                await state.refresher()  # the workers' rates; not the kernel's flow list
            rules, tunnels = tuple(state.rule_rows()), tuple(state.tunnel_rows())
        seen = set()
        for rule in rules:
            seen.add(key := f"rule:{rule.name}")
            self._add(key, (now, rule.rate_up, rule.rate_down))
        for tunnel in tunnels:
            seen.add(key := f"tunnel:{tunnel.name}")
            up = sum(forward.rate_up for forward in tunnel.forwards)
            down = sum(forward.rate_down for forward in tunnel.forwards)
            self._add(key, (now, up, down))
        for key in [key for key in self.series if key not in seen]:
            del self.series[key]  # removed by a reload

    def _add(self, key: str, point: Point) -> None:
        points = self.series.get(key)
        if points is None:
            points = self.series[key] = deque(maxlen=KEEP)
        points.append((round(point[0], 3), round(point[1], 1), round(point[2], 1)))


def bounded(status: dict[str, Any]) -> dict[str, Any]:
    """A status snapshot with at most MAX_ROWS rows per session list, and `omitted` saying how
    many each lost: a page redrawn every second cannot use ten thousand rows, and the stream
    must not cost the relays more because the box is busy."""
    omitted = {}
    for key in ("sessions", "kernel_sessions", "gateway_sessions"):
        rows = status.get(key) or []
        if len(rows) > MAX_ROWS:
            rows.sort(key=_interest)
            omitted[key] = len(rows) - MAX_ROWS
            status[key] = rows[:MAX_ROWS]
    if omitted:
        status["omitted"] = omitted
    return status


def _interest(row: dict[str, Any]) -> tuple[bool, int]:
    """Live flows before closed ones, then the largest first."""
    ended = row.get("state") in ("TIME_WAIT", "CLOSE")
    return ended, -(int(row.get("bytes_up", 0)) + int(row.get("bytes_down", 0)))


def sse(name: str, data: object) -> bytes:
    """One server-sent event: `event: NAME`, one `data:` line of compact JSON, a blank line."""
    return (
        b"event: " + name.encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
    )


def _offer(queue: asyncio.Queue[bytes], item: bytes) -> None:
    """Put without waiting: a watcher that is behind loses its oldest tick."""
    while True:
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            queue.get_nowait()
