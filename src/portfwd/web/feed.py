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
        """A status event made now (for a watcher that just came, or a single read)."""
        await self.state.refresh()
        return sse("status", self.state.status().to_json())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.tick()

    async def tick(self) -> None:
        """One tick: the rates into the history and, with watchers, a snapshot to each."""
        state = self.state
        now = time.time()
        if self._watchers:
            await state.refresh()
            snapshot = state.status()
            rules, tunnels = snapshot.rules, snapshot.tunnels
            self.latest = sse("status", snapshot.to_json())
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
