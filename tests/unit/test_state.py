"""state: counters, the connect histogram, idle sampling and the snapshot's shape."""

from __future__ import annotations

import json

from portfwd.state import CONNECT_BUCKETS, RuleStats, State


def test_connect_histogram_buckets_are_upper_bounds() -> None:
    stats = RuleStats("r")
    for seconds in (0.0001, 0.0005, 0.0006, 10.0, 11.0):
        stats.observe_connect(seconds)
    assert stats.connect_buckets[0] == 2  # <= 0.5 ms, the bound itself included
    assert stats.connect_buckets[1] == 1
    assert stats.connect_buckets[len(CONNECT_BUCKETS) - 1] == 1  # <= 10 s
    assert stats.connect_buckets[-1] == 1  # +Inf
    assert sum(stats.connect_buckets) == 5


def test_rule_bytes_include_live_sessions_and_fold_in_on_close() -> None:
    state = State()
    rule = state.rule("web")
    session = state.open_session(rule, "127.0.0.1:5000", "10.0.0.5:80", "splice")
    session.bytes_up, session.bytes_down = 100, 2000
    snap = state.snapshot()
    assert snap["rules"][0]["bytes_up"] == 100
    assert snap["rules"][0]["connections_active"] == 1
    assert snap["sessions"][0]["client"] == "127.0.0.1:5000"
    state.close_session(session)
    state.close_session(session)  # twice is harmless
    snap = state.snapshot()
    assert snap["sessions"] == []
    assert (snap["rules"][0]["bytes_up"], snap["rules"][0]["bytes_down"]) == (100, 2000)
    assert snap["rules"][0]["connections_active"] == 0
    assert snap["rules"][0]["connections_total"] == 1


def test_idle_is_reset_only_when_bytes_move() -> None:
    state = State()
    session = state.open_session(state.rule("r"), "c", "t", "splice")
    session.began -= 10
    session.active -= 10
    state.sample()
    assert state.snapshot()["sessions"][0]["idle"] >= 10
    session.bytes_up += 1
    state.sample()
    assert state.snapshot()["sessions"][0]["idle"] < 1


def test_snapshot_is_json_with_slots_for_later_parts() -> None:
    snap = json.loads(json.dumps(State().snapshot()))
    for key in (
        "rules",
        "listeners",
        "sessions",
        "tunnels",
        "server_sessions",
        "gateway_rules",
        "triggers",
        "mappings",
    ):
        assert snap[key] == []
