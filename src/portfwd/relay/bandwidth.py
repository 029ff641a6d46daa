"""Bandwidth limits of a rule: the whole rule's and each connection's, each way, as token buckets.

Hand-written because no well-kept library paces asyncio transports: the rate limiters on PyPI
(aiolimiter and its kin) count operations and make a coroutine `await` its turn, while the
protocol relay is callback-driven (no task per session) and must hold bytes it has already read.
This module is sans-IO: no asyncio, no sockets, no clock of its own; every call is given a
monotonic `now`, so it is tested alone, fuzzed with hypothesis, and costs an unlimited rule
nothing (it has no `Shaper`).

Theory of operation. Each limit is a token bucket of bytes: it fills at `rate` bytes a second up
to `burst` (a tenth of a second of the rate, at least `MIN_BURST`, so that traffic flows in
small even steps rather than in bursts and silences). A caller *reserves* bytes before it sends
them: the bucket takes them at once, going into debt if it must, and answers how long to wait
until the debt is paid. Reservations are served in the order they are made, so sessions sharing
a rule's bucket queue behind one another: as each session holds at most one reservation of at
most one `slice` per direction at a time, they take turns, and none is starved. Over any time
the bytes sent never exceed `burst + rate * elapsed`, and a sender that always has bytes waiting
gets the whole rate.

A `Shaper` is one rule's limits: a bucket per direction for the whole rule (`up` is client to
target, `down` target to client). `Shaper.session()` gives each new session its `Meters`, one
`Meter` per direction, which reserves from the session's own bucket and from the rule's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The smallest burst and slice, in bytes: at low rates a tenth of a second would mean writes of a
#: few bytes and a timer for each.
MIN_BURST = 16 * 1024
#: The burst, in seconds of the rate: long enough to ride out timer lateness, short enough that
#: traffic looks smooth.
BURST_SECONDS = 0.1


def burst_for(rate: float) -> int:
    """The burst of a bucket of `rate` bytes a second: a tenth of a second, at least MIN_BURST."""
    return max(MIN_BURST, int(rate * BURST_SECONDS))


class TokenBucket:
    """Bytes that may be sent now: fills at `rate` a second up to `burst`; starts full.

    Raises ValueError for a rate that is not positive and finite.
    """

    __slots__ = ("_tokens", "_when", "burst", "rate")

    def __init__(self, rate: float, burst: int | None = None) -> None:
        if not (rate > 0.0 and math.isfinite(rate)):
            raise ValueError(f"a bucket's rate must be a positive number of bytes a second, not {rate!r}")
        self.rate = rate
        self.burst = burst_for(rate) if burst is None else burst
        self._tokens = float(self.burst)
        self._when = -math.inf  # full whenever it is first asked: any elapsed time refills it

    def reserve(self, size: int, now: float) -> float:
        """Take `size` bytes' tokens at `now` (into debt if there are too few), and return the
        seconds until the debt is paid: when those bytes may go (0.0: at once).

        A `now` earlier than one seen before counts as that one, so a clock that steps back
        never mints tokens.
        """
        elapsed = now - self._when
        tokens = self._tokens
        if elapsed > 0.0:
            tokens = min(float(self.burst), tokens + elapsed * self.rate)
            self._when = now
        tokens -= size
        self._tokens = tokens
        return -tokens / self.rate if tokens < 0.0 else 0.0


class Meter:
    """One direction of one session: reserves its bytes from every bucket it is under (its own
    and the rule's) and waits for the slowest. `slice` is the most it should reserve at once, so
    that sessions sharing a bucket take turns in small steps."""

    __slots__ = ("_buckets", "slice")

    def __init__(self, buckets: tuple[TokenBucket, ...]) -> None:
        if not buckets:
            raise ValueError("a meter needs at least one bucket")
        self._buckets = buckets
        self.slice = min(bucket.burst for bucket in buckets)

    def reserve(self, size: int, now: float) -> float:
        """Reserve `size` bytes (at most `slice`, for fairness) from each bucket; the seconds
        until they may go (0.0: at once)."""
        delay = 0.0
        for bucket in self._buckets:
            wait = bucket.reserve(size, now)
            if wait > delay:
                delay = wait
        return delay


@dataclass(frozen=True, slots=True)
class Meters:
    """A session's meters: `up` for bytes from the client, `down` for bytes from the target."""

    up: Meter
    down: Meter


class Shaper:
    """A rule's bandwidth limits in bytes a second, each way; 0 is no limit (not both 0).

    One per limited rule, shared by all its listening ports and sessions: it holds the rule-wide
    bucket of each direction, and gives each session its own through `session()`.
    Raises ValueError if neither limit is set.
    """

    __slots__ = ("_down", "_up", "connection_rate", "rule_rate")

    def __init__(self, rule_rate: float, connection_rate: float) -> None:
        if not (rule_rate > 0.0 or connection_rate > 0.0):
            raise ValueError("a Shaper needs a rule or a connection bandwidth limit")
        self.rule_rate = rule_rate
        self.connection_rate = connection_rate
        self._up = TokenBucket(rule_rate) if rule_rate > 0.0 else None
        self._down = TokenBucket(rule_rate) if rule_rate > 0.0 else None

    def session(self) -> Meters:
        """The meters of a new session: its own buckets (if there is a per-connection limit),
        full, each beside the rule's bucket of its direction (if there is a rule limit)."""
        return Meters(self._meter(self._up), self._meter(self._down))

    def _meter(self, shared: TokenBucket | None) -> Meter:
        own = (TokenBucket(self.connection_rate),) if self.connection_rate > 0.0 else ()
        return Meter(own + ((shared,) if shared is not None else ()))
