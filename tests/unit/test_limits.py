"""relay/limits.py: at once, per source, and a token bucket per source, on an injected clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from portfwd.relay import limits as limits_module
from portfwd.relay.limits import Limits


def test_at_most_n_at_once_for_the_rule_then_room_again() -> None:
    limits = Limits(max_connections=2)
    assert [limits.admit("10.0.0.1"), limits.admit("10.0.0.2"), limits.admit("10.0.0.3")] == [
        None,
        None,
        "max_connections",
    ]
    limits.done("10.0.0.1")
    assert limits.admit("10.0.0.3") is None


def test_at_most_n_at_once_from_one_source_others_unaffected() -> None:
    limits = Limits(max_per_source=1)
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") == "max_connections_per_source"
    assert limits.admit("10.0.0.2") is None
    limits.done("10.0.0.1")
    assert limits.admit("10.0.0.1") is None
    assert limits.admit(None) is None, "a Unix client has no address to count"


def test_the_rate_is_a_burst_then_a_steady_flow() -> None:
    now = [100.0]
    limits = Limits(rate=(3, 1.0), clock=lambda: now[0])
    results = [limits.admit("10.0.0.1") for _ in range(5)]
    assert results == [None, None, None, "rate", "rate"]
    assert limits.admit("10.0.0.2") is None, "per source"
    now[0] += 1 / 3  # one token back
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") == "rate"
    now[0] += 10  # full again, never more than the burst
    assert [limits.admit("10.0.0.1") for _ in range(4)] == [None, None, None, "rate"]


def test_a_scan_from_many_addresses_does_not_grow_the_table_without_bound(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(limits_module, "MAX_SOURCES", 50)
    now = [0.0]
    limits = Limits(rate=(2, 1.0), clock=lambda: now[0])
    for index in range(1000):
        now[0] += 1.0  # each source's bucket is full again by the next one
        assert limits.admit(f"10.0.{index // 256}.{index % 256}") is None
        limits.done(f"10.0.{index // 256}.{index % 256}")
    assert len(limits._buckets) <= 50
    # buckets that stay empty for an hour ("1/h") cannot grow it either: the oldest go first
    slow = Limits(rate=(1, 3600.0), clock=lambda: now[0])
    for index in range(1000):
        assert slow.admit(f"10.1.{index // 256}.{index % 256}") is None
    assert len(slow._buckets) == 50
    assert slow.admit("10.1.3.231") == "rate", "the newest are remembered"


@given(steps=st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=200))
def test_admitted_less_done_is_what_is_active(steps: list[tuple[bool, int]]) -> None:
    limits = Limits(max_connections=5, max_per_source=2)
    held: list[str] = []
    for admit, who in steps:
        source = f"10.0.0.{who}"
        if admit:
            if limits.admit(source) is None:
                held.append(source)
        elif source in held:
            held.remove(source)
            limits.done(source)
        assert limits.active == len(held) <= 5
        assert all(held.count(item) <= 2 for item in held)
