"""relay/bandwidth.py: token buckets that reserve into debt, meters under two buckets, a Shaper
whose rule-wide bucket its sessions share by taking turns; all on a clock passed in. And the
paced sides of relay/tcp.py on fake transports: held bytes, pause reasons kept apart, EOF order."""

from __future__ import annotations

import asyncio
import heapq
import os
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portfwd.counters import RuleStats, Session
from portfwd.relay.bandwidth import MIN_BURST, Meter, Shaper, TokenBucket, burst_for
from portfwd.relay.tcp import ProtocolRelay, _Side

#: Float slack: the arithmetic is exact to far better than a byte.
EPSILON = 1e-6

rates = st.floats(min_value=1000.0, max_value=1e12)
sizes = st.integers(min_value=1, max_value=512 * 1024)


def test_the_burst_is_a_tenth_of_a_second_and_at_least_min_burst() -> None:
    assert burst_for(1_250_000) == 125_000
    assert burst_for(1000) == MIN_BURST
    assert TokenBucket(1_250_000).burst == 125_000


def test_a_full_bucket_lets_the_burst_go_at_once_then_waits_for_the_debt() -> None:
    bucket = TokenBucket(1000.0, burst=2000)
    assert bucket.reserve(1500, now=50.0) == 0.0
    assert bucket.reserve(500, now=50.0) == 0.0
    assert bucket.reserve(1000, now=50.0) == pytest.approx(1.0), "1000 bytes of debt at 1000 B/s"
    assert bucket.reserve(1000, now=50.5) == pytest.approx(1.5), "queued behind the first"
    assert bucket.reserve(1, now=1000.0) == 0.0, "refilled"
    assert bucket.reserve(2000, now=1000.0) == pytest.approx(0.001), "but never past the burst"


def test_a_clock_that_steps_back_mints_no_tokens() -> None:
    bucket = TokenBucket(1000.0, burst=1000)
    bucket.reserve(1000, now=10.0)
    assert bucket.reserve(1000, now=5.0) == pytest.approx(1.0)
    assert bucket.reserve(1000, now=10.0) == pytest.approx(2.0)


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bucket_needs_a_positive_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="positive number of bytes a second"):
        TokenBucket(rate)


def test_a_shaper_needs_a_limit() -> None:
    with pytest.raises(ValueError, match="needs a rule or a connection bandwidth limit"):
        Shaper(0.0, 0.0)


@given(
    rate=rates,
    steps=st.lists(st.tuples(sizes, st.floats(min_value=0.0, max_value=2.0)), min_size=1, max_size=60),
)
def test_bytes_released_never_exceed_the_burst_plus_the_rate(
    rate: float, steps: list[tuple[int, float]]
) -> None:
    """Over any reservations at any times: the bytes due by each release time are at most
    `burst + rate * elapsed`, from the first call and between any two releases."""
    bucket = TokenBucket(rate)
    now = start = 100.0
    releases: list[float] = []
    totals: list[int] = [0]
    for size, pause in steps:
        now += pause
        releases.append(now + bucket.reserve(size, now))
        totals.append(totals[-1] + size)
    assert releases == sorted(releases), "reservations are served in the order they were made"
    scale = EPSILON * (1 + totals[-1])
    for j, release in enumerate(releases):
        assert totals[j + 1] <= bucket.burst + rate * (release - start) + scale
        for i in range(j):
            assert totals[j + 1] - totals[i + 1] <= bucket.burst + rate * (release - releases[i]) + scale


@given(
    rate=rates,
    steps=st.lists(st.tuples(sizes, st.floats(min_value=0.0, max_value=1.0)), min_size=1, max_size=60),
)
def test_a_sender_that_always_has_bytes_waiting_gets_the_whole_rate(
    rate: float, steps: list[tuple[int, float]]
) -> None:
    """Each reservation made at or before the previous one came due (no idle time): the last
    bytes go no later than the rate allows after the burst."""
    bucket = TokenBucket(rate)
    start = last_release = 100.0
    now = start
    total = 0
    for size, early in steps:
        now = max(now, last_release - early)  # any time up to the previous release, never back
        last_release = now + bucket.reserve(size, now)
        total += size
        assert last_release - start <= max(0.0, (total - bucket.burst) / rate) + EPSILON * (1 + total / rate)


def test_a_meter_charges_its_own_bucket_and_the_rules() -> None:
    shaper = Shaper(rule_rate=1_000_000, connection_rate=100_000)
    first, second = shaper.session(), shaper.session()
    assert first.up.slice == burst_for(100_000)
    assert first.up.reserve(10_000, now=0.0) == 0.0
    # its own bucket (burst 16 KiB at 100 kB/s) is short: it waits for that one
    assert first.up.reserve(10_000, now=0.0) == pytest.approx((20_000 - MIN_BURST) / 100_000)
    assert second.up.reserve(10_000, now=0.0) == 0.0, "another session has its own bucket"
    assert first.down.reserve(10_000, now=0.0) == 0.0, "and each direction is apart"
    # the rule's bucket (100 kB burst) has lent 30 kB up: 70 kB more, then debt for everyone
    for _ in range(4):
        assert shaper.session().up.reserve(16_000, now=0.0) == 0.0  # 94 kB of 100 kB
    assert shaper.session().up.reserve(16_000, now=0.0) == pytest.approx(10_000 / 1_000_000)


def test_a_meter_needs_a_bucket() -> None:
    with pytest.raises(ValueError, match="at least one bucket"):
        Meter(())


def _share(shaper: Shaper, starts: list[float], seconds: float) -> list[int]:
    """Simulate sessions that always have bytes to send up: each reserves one slice when it
    starts and another each time the last comes due. The bytes each got through by `seconds`."""
    meters = [shaper.session().up for _ in starts]
    sent = [0] * len(starts)
    due = [(start, index, 0) for index, start in enumerate(starts)]  # (when, session, bytes due then)
    heapq.heapify(due)
    for _ in range(100_000):  # bounded: far more than the steps of `seconds`
        when, index, size = heapq.heappop(due)
        if when > seconds:
            break
        sent[index] += size
        meter = meters[index]
        heapq.heappush(due, (when + meter.reserve(meter.slice, when), index, meter.slice))
    return sent


@given(
    count=st.integers(min_value=2, max_value=6),
    offsets=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=6, max_size=6),
    rate=st.floats(min_value=200_000.0, max_value=1e8),
)
def test_sessions_share_the_rule_limit_fairly(count: int, offsets: list[float], rate: float) -> None:
    """Sessions that start at any times within the first second share the rule's rate: after
    ten seconds the sum is the rate (plus the burst) and none has less than 80 % of its share."""
    sent = _share(Shaper(rule_rate=rate, connection_rate=0.0), offsets[:count], 10.0)
    burst = burst_for(rate)
    assert sum(sent) <= burst + rate * 10.0 + count * burst  # each may have one slice due at 10 s
    assert sum(sent) >= rate * (10.0 - max(offsets[:count])) - count * burst
    assert min(sent) >= 0.8 * sum(sent) / count, sent


def test_a_session_under_its_own_limit_leaves_the_rest_of_the_rule_to_others() -> None:
    shaper = Shaper(rule_rate=1_000_000, connection_rate=200_000)
    sent = _share(shaper, [0.0, 0.0, 0.0], 10.0)
    for each in sent:
        assert 0.95 * 2_000_000 <= each <= 2_000_000 + 2 * burst_for(200_000), "its own limit binds"


# The paced relay (relay/tcp.py) driven by hand: fake transports that keep what is written and
# call pause_writing/resume_writing at a high-water mark as asyncio's do, and a clock turned by
# the test. Only what a transport would see is checked: bytes, EOF, and reading paused or not.

#: 163840 B/s has a burst and a slice of 16 KiB: each slice after the first takes 0.1 s.
SLOW = 163_840.0
SLICE = 16 * 1024


class _Timer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class _Clock:
    """The loop's time() and call_later(), with time moved on by `advance`."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[_Timer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def pending(self) -> int:
        return sum(not timer.cancelled for timer in self.timers)

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        for _ in range(10_000):  # bounded
            due = [timer for timer in self.timers if not timer.cancelled and timer.when <= end]
            if not due:
                break
            timer = min(due, key=lambda timer: timer.when)
            self.timers.remove(timer)
            self.now = max(self.now, timer.when)
            timer.callback()
        self.now = end


class _Transport:
    """What a relay side writes to, and reads from (whether reading is paused)."""

    def __init__(self, clock: _Clock, high: int = 1 << 30) -> None:
        self.clock, self.high = clock, high
        self.protocol: asyncio.Protocol | None = None
        self.written = bytearray()
        self.buffered = 0
        self.full = False
        self.reading = True
        self.eof_at: int | None = None  # how much had been written when write_eof came
        self.closing = False

    def pause_reading(self) -> None:
        assert self.reading, "paused twice: the reasons to pause were not kept apart"
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True

    def write(self, data: bytes | memoryview) -> None:
        assert self.eof_at is None, "written after write_eof"
        assert not self.closing, "written after close"
        self.written += data
        self.buffered += len(data)
        if self.buffered > self.high and not self.full:
            self.full = True
            assert self.protocol is not None
            self.protocol.pause_writing()

    def drain(self) -> None:
        """The kernel took everything buffered."""
        self.buffered = 0
        if self.full:
            self.full = False
            assert self.protocol is not None
            self.protocol.resume_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_at = len(self.written)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            assert self.protocol is not None
            self.clock.call_later(0.0, lambda: self.protocol.connection_lost(None))  # type: ignore[union-attr]


class _Owner:
    def __init__(self) -> None:
        self.closed: list[str] = []

    def relay_closed(self, session: Session, reason: str) -> None:
        self.closed.append(reason)


def _relay(
    shaper: Shaper | None, high: int = 1 << 30
) -> tuple[ProtocolRelay, _Clock, _Transport, _Transport, _Owner]:
    """A relay whose upstream (made first, as start() does) and client transports exist."""
    clock, owner = _Clock(), _Owner()
    session = Session(1, RuleStats("bw"), "client", "target", "protocol", clock.now)
    relay = ProtocolRelay(session, owner, shaper)
    transports = []
    for side in (relay._upstream, relay._client):
        if shaper is not None:
            side.loop = clock  # type: ignore[attr-defined]
        transport = _Transport(clock, high)
        transport.protocol = side
        side.connection_made(transport)  # type: ignore[arg-type]
        transports.append(transport)
    upstream, client = transports
    return relay, clock, client, upstream, owner


def test_an_unlimited_relay_runs_the_plain_sides() -> None:
    relay, *_ = _relay(None)
    assert type(relay._client) is _Side
    assert type(relay._upstream) is _Side


def test_bytes_past_the_burst_are_held_and_go_a_slice_at_a_time() -> None:
    relay, clock, client, upstream, _ = _relay(Shaper(0.0, SLOW))
    assert client.reading, "the client side reads once its peer exists"
    data = os.urandom(3 * SLICE + 848)
    relay._client.data_received(data)
    assert len(upstream.written) == SLICE, "the burst goes at once"
    assert not client.reading, "the rest is held, and reading waits"
    clock.advance(0.099)
    assert len(upstream.written) == SLICE
    clock.advance(0.002)
    assert len(upstream.written) == 2 * SLICE
    clock.advance(0.1)
    assert len(upstream.written) == 3 * SLICE
    assert not client.reading
    clock.advance(0.1)
    assert bytes(upstream.written) == data
    assert client.reading, "all written: reading again"
    assert relay.session.bytes_up == len(data)
    assert clock.pending() == 0


def test_a_read_already_under_way_when_reading_paused_is_held_too() -> None:
    relay, clock, client, upstream, _ = _relay(Shaper(0.0, SLOW))
    first, second = os.urandom(2 * SLICE), os.urandom(1000)
    relay._client.data_received(first)
    relay._client.data_received(second)
    clock.advance(1.0)
    assert bytes(upstream.written) == first + second
    assert client.reading


def test_a_full_peer_and_the_pacing_each_keep_reading_paused_until_both_are_done() -> None:
    relay, clock, client, upstream, _ = _relay(Shaper(0.0, SLOW), high=20_000)
    data = os.urandom(3 * SLICE + 848)
    relay._client.data_received(data)
    clock.advance(0.1)  # the second slice fills the upstream's buffer past its high-water mark
    assert upstream.full
    assert len(upstream.written) == 2 * SLICE
    clock.advance(5.0)
    assert len(upstream.written) == 2 * SLICE, "nothing more while the peer is full"
    assert not client.reading
    upstream.drain()  # the peer can take more: the pacing goes on, reading still waits for it
    assert len(upstream.written) == 3 * SLICE, "tokens came back while it waited: a slice at once"
    assert not client.reading
    clock.advance(0.1)
    assert bytes(upstream.written) == data
    assert client.reading
    # the other way round: the pacing is done while the peer is still full
    more = os.urandom(2 * SLICE)
    upstream.drain()
    clock.advance(5.0)
    relay._client.data_received(more)
    assert not client.reading
    clock.advance(0.1)  # the last slice goes, and fills the peer
    assert upstream.full
    assert bytes(upstream.written) == data + more
    assert not client.reading, "the peer is still full"
    upstream.drain()
    assert client.reading


def test_a_full_peer_alone_pauses_and_resumes_reading_as_without_a_limit() -> None:
    relay, _, client, upstream, _ = _relay(Shaper(0.0, 1e9), high=1000)
    relay._client.data_received(b"x" * 2000)
    assert upstream.full
    assert not client.reading
    upstream.drain()
    assert client.reading


def test_an_eof_is_passed_on_after_the_held_bytes() -> None:
    relay, clock, client, upstream, owner = _relay(Shaper(0.0, SLOW))
    data = os.urandom(2 * SLICE + 10)
    relay._client.data_received(data)
    assert relay._client.eof_received() is True
    assert upstream.eof_at is None, "not before the held bytes"
    clock.advance(1.0)
    assert upstream.eof_at == len(data)
    assert not client.reading, "nothing more to read after EOF"
    # the upstream answers and closes too: both directions done, the relay closes
    relay._upstream.data_received(b"answer")
    relay._upstream.eof_received()
    assert client.written == b"answer"
    assert client.eof_at == len(b"answer")
    clock.advance(0.0)
    assert owner.closed == ["client closed"]


def test_closing_the_relay_cancels_the_timers_and_writes_nothing_more() -> None:
    relay, clock, _, upstream, owner = _relay(Shaper(0.0, SLOW))
    relay._client.data_received(os.urandom(4 * SLICE))
    relay._upstream.data_received(os.urandom(4 * SLICE))
    assert clock.pending() == 2
    relay.close("shutdown")
    clock.advance(0.0)  # the transports report their loss
    assert clock.pending() == 0
    clock.advance(10.0)
    assert len(upstream.written) == SLICE
    assert owner.closed == ["shutdown"]


def test_a_timer_that_finds_the_peer_closing_drops_its_bytes() -> None:
    relay, clock, _, upstream, _ = _relay(Shaper(0.0, SLOW))
    relay._client.data_received(os.urandom(4 * SLICE))
    upstream.closing = True  # closing, its loss not yet reported
    clock.advance(10.0)
    assert len(upstream.written) == SLICE
