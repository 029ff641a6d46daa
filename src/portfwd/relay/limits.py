"""Per-rule connection limits: how many at once, how many from one source, how fast from one source.

One `Limits` per rule (shared by the forwarders of each port of a range), asked once per client
before its upstream connect, told when that client is done (connect failed, or its session
ended). Pure bookkeeping with an injected clock: no sockets, no timers, so it is tested alone
and costs a rule without limits nothing (it has no `Limits` at all).

The rate is a token bucket per source address: `count` connections at once, refilled at
`count / seconds` a second, like haproxy's `sc_conn_rate` checks and nftables' `limit rate`
meters. The table of sources is bounded: it is kept in order of last use, and past
`MAX_SOURCES` the source used longest ago is forgotten (an O(1) step), so a scan from many
addresses cannot grow it or slow it down; a forgotten source starts again with a full bucket
(the limit loosens for it, as an LRU meter's does).
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Sources tracked for the rate before the full buckets are forgotten.
MAX_SOURCES = 4096


class Limits:
    """Admits or refuses each new client of one rule; `done(source)` once for each admitted."""

    def __init__(
        self,
        max_connections: int = 0,
        max_per_source: int = 0,
        rate: tuple[int, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections  # 0: no limit
        self.max_per_source = max_per_source  # 0: no limit
        self.rate = rate  # (connections, per seconds), per source; None: no limit
        self._clock = clock
        self.active = 0  # admitted and not yet done: connecting or relaying
        self._by_source: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, when)

    def admit(self, source: str | None) -> str | None:
        """None (admitted: call `done(source)` later) or the limit that refuses this client:
        "max_connections", "max_connections_per_source" or "rate"."""
        if self.max_connections and self.active >= self.max_connections:
            return "max_connections"
        if source is not None:
            if self.max_per_source and self._by_source.get(source, 0) >= self.max_per_source:
                return "max_connections_per_source"
            if self.rate is not None and not self._take(source, *self.rate):
                return "rate"
            self._by_source[source] = self._by_source.get(source, 0) + 1
        self.active += 1
        return None

    def done(self, source: str | None) -> None:
        """An admitted client is gone (its connect failed or its session ended)."""
        self.active -= 1
        if source is not None:
            left = self._by_source.get(source, 0) - 1
            if left > 0:
                self._by_source[source] = left
            else:
                self._by_source.pop(source, None)

    def _take(self, source: str, count: int, seconds: float) -> bool:
        now = self._clock()
        per_second = count / seconds
        buckets = self._buckets
        tokens, when = buckets.pop(source, (float(count), now))  # re-inserted: last used goes last
        tokens = min(float(count), tokens + (now - when) * per_second)
        taken = tokens >= 1.0 - 1e-9  # a whole token, less float rounding
        buckets[source] = (tokens - 1.0 if taken else tokens, now)
        if len(buckets) > MAX_SOURCES:
            del buckets[next(iter(buckets))]  # the source used longest ago
        return taken
