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
import logging
import time
from collections import deque
from typing import Any

from portfwd.state import State

log = logging.getLogger(__name__)

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
#: Seconds a status snapshot is served again before a new one is made.
CACHE = 0.9
#: Rows of each session list a status event carries (the largest by bytes, live flows first);
#: how many were left out is in the event's `omitted`.
MAX_ROWS = 500

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
        self._building = asyncio.Lock()
        self._made: dict[int | None, tuple[float, dict[str, Any]]] = {}  # limit -> (when, status)

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
        """A status event for a watcher that just came (at most CACHE old)."""
        return sse("status", bounded(await self.current(MAX_ROWS)))

    async def current(self, limit: int | None = None) -> dict[str, Any]:
        """The status snapshot as JSON (with at most `limit` live sessions: the stream's), made
        at most CACHE seconds ago: however many clients ask at once, the instance builds one
        snapshot a second for them. Do not change what it returns."""
        async with self._building:
            made = self._made.get(limit)
            if made is None or time.monotonic() - made[0] >= CACHE:
                await self._refresh(limit)
                status = self.state.status(limit).to_json()
                if limit is not None and self.state.sessions_omitted:
                    status["omitted"] = {"sessions": self.state.sessions_omitted}
                made = self._made[limit] = (time.monotonic(), status)
            return made[1]

    def invalidate(self) -> None:
        """An action changed the state: the next read makes a new snapshot."""
        self._made.clear()

    async def _refresh(self, limit: int | None) -> None:
        began = time.monotonic()
        readers = began >= self._next_read
        await self.state.refresh(readers=readers, limit=limit)
        if readers:
            self._next_read = began + max(READ_EVERY, (time.monotonic() - began) * READ_COST)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:  # the feed's boundary: a bad tick is logged, the next one comes
                log.exception("web: the dashboard's update failed")

    async def tick(self) -> None:
        """One tick: the rates into the history and, with watchers, a snapshot to each."""
        now = time.time()
        if self._watchers:
            snapshot = await self.current(MAX_ROWS)
            self.latest = sse("status", bounded(snapshot))
            for queue in list(self._watchers):
                _offer(queue, self.latest)
            rules = {row["name"]: (row["rate_up"], row["rate_down"]) for row in snapshot["rules"]}
            tunnels = {
                row["name"]: (
                    sum(forward["rate_up"] for forward in row["forwards"]),
                    sum(forward["rate_down"] for forward in row["forwards"]),
                )
                for row in snapshot["tunnels"]
            }
        else:  # the sampler's rates, and the workers' (not their snapshots): next to nothing
            rules, tunnels = await self._rates()
        for name, (up, down) in rules.items():
            self._add(f"rule:{name}", (now, up, down))
        for name, (up, down) in tunnels.items():
            self._add(f"tunnel:{name}", (now, up, down))
        seen = {f"rule:{name}" for name in rules} | {f"tunnel:{name}" for name in tunnels}
        for key in [key for key in self.series if key not in seen]:
            del self.series[key]  # removed by a reload

    async def _rates(self) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
        state = self.state
        rules = {name: (rule.rate_up, rule.rate_down) for name, rule in state.rules.items() if rule.running}
        if state.rate_reader is not None:
            for name, (up, down) in (await state.rate_reader()).items():
                mine = rules.get(name, (0.0, 0.0))
                rules[name] = (mine[0] + up, mine[1] + down)
        tunnels = {
            tunnel.name: (
                sum(forward.stats.rate_up for forward in tunnel.forwards),
                sum(forward.stats.rate_down for forward in tunnel.forwards),
            )
            for tunnel in state.tunnels
        }
        return rules, tunnels

    def _add(self, key: str, point: Point) -> None:
        points = self.series.get(key)
        if points is None:
            points = self.series[key] = deque(maxlen=KEEP)
        points.append((round(point[0], 3), round(point[1], 1), round(point[2], 1)))


def bounded(status: dict[str, Any]) -> dict[str, Any]:
    """A status snapshot with at most MAX_ROWS rows per session list, and `omitted` saying how
    many each lost (the live sessions are trimmed as the snapshot is made; the kernel's and the
    gateway's flows here): a page redrawn every second cannot use ten thousand rows, and the
    stream must not cost the relays more because the box is busy."""
    status = dict(status)  # a copy: the cached snapshot stays whole
    omitted = dict(status.get("omitted") or {})
    for key in ("sessions", "kernel_sessions", "gateway_sessions"):
        rows = status.get(key) or []
        if len(rows) > MAX_ROWS:
            omitted[key] = omitted.get(key, 0) + len(rows) - MAX_ROWS
            status[key] = sorted(rows, key=_interest)[:MAX_ROWS]
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
