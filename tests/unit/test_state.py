"""state: counters, the connect histogram, idle sampling and the typed snapshot it builds."""

from __future__ import annotations

import json

from portfwd.state import (
    CONNECT_BUCKETS,
    RuleStats,
    ServerSessionStats,
    State,
    TunnelForwardStats,
    TunnelStats,
)
from portfwd.status import SCHEMA


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
    snap = state.status()
    assert snap.rules[0].bytes_up == 100
    assert snap.rules[0].connections_active == 1
    assert snap.sessions[0].client == "127.0.0.1:5000"
    state.close_session(session)
    state.close_session(session)  # twice is harmless
    snap = state.status()
    assert snap.sessions == ()
    assert (snap.rules[0].bytes_up, snap.rules[0].bytes_down) == (100, 2000)
    assert snap.rules[0].connections_active == 0
    assert snap.rules[0].connections_total == 1


def test_idle_is_reset_only_when_bytes_move() -> None:
    state = State()
    session = state.open_session(state.rule("r"), "c", "t", "splice")
    session.began -= 10
    session.active -= 10
    state.sample()
    assert state.status().sessions[0].idle >= 10
    session.bytes_up += 1
    state.sample()
    assert state.status().sessions[0].idle < 1


def test_snapshot_is_json_with_a_version_and_slots_for_later_parts() -> None:
    snap = json.loads(json.dumps(State().snapshot()))
    assert snap["schema"] == SCHEMA
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


def test_tunnel_and_server_rows_count_live_bytes() -> None:
    state = State()
    forward = TunnelForwardStats("-L 8080:web:80", "local", "127.0.0.1:8080", "web:80")
    state.tunnels.append(TunnelStats("edge", "ssh.example", forwards=[forward]))
    client = ServerSessionStats("alice", "10.0.0.9:40000", "SHA256:x", forwards=["-R 9000"])
    state.server_sessions.append(client)
    state.open_session(forward.stats, "c", "t", "ssh").bytes_up = 7
    state.open_session(client.stats, "c", "t", "ssh").bytes_down = 9
    [tunnel] = state.status().tunnels
    assert (tunnel.name, tunnel.forwards[0].bytes_up, tunnel.forwards[0].connections_active) == ("edge", 7, 1)
    [server] = state.status().server_sessions
    assert (server.user, server.forwards, server.bytes_down) == ("alice", ("-R 9000",), 9)
