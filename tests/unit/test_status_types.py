"""status: typed rows, their one JSON form and back, the schema check, and the views that read them."""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from portfwd.cli import views
from portfwd.counters import ServerSessionStats, TunnelForwardStats, TunnelStats
from portfwd.metrics import StateCollector
from portfwd.state import Listener, State
from portfwd.status import (
    SCHEMA,
    GatewayRuleRow,
    GatewaySessionRow,
    ListeningSocket,
    MappingRow,
    Snapshot,
    StatusError,
    TriggerRow,
)


def busy_state() -> State:
    """A state with a row in every part, and strings a peer might have chosen."""
    state = State()
    state.instance, state.kind, state.control, state.config_path = (
        "edge",
        "run",
        "/run/portfwd/edge.sock",
        "/e.toml",
    )
    rule = state.rule("web")
    rule.listen, rule.connect, rule.protocol, rule.relay = "0.0.0.0:8080", "10.0.0.5:80", "tcp", "splice"
    rule.count_error("refused", 2)
    rule.observe_connect(0.003)
    rule.denied_total = 1
    state.listeners.append(Listener("web", "0.0.0.0:8080", "tcp", "splice"))
    state.listening.append(ListeningSocket("web", "rule", "tcp", "0.0.0.0:8080", "splice"))
    gone = state.open_session(rule, "192.0.2.8:5001", "10.0.0.5:80", "splice")
    gone.bytes_up, gone.bytes_down = 60, 0
    state.close_session(gone, "client closed")
    state.connect_failed(rule, "192.0.2.9:5002", "10.0.0.5:80", "splice", "upstream: connection refused")
    session = state.open_session(rule, "192.0.2.7:5000", "10.0.0.5:80", "splice")
    session.bytes_up, session.bytes_down = 100, 2000
    forward = TunnelForwardStats("-D 1080", "dynamic", "127.0.0.1:1080", "socks", state="up")
    forward.stats.name = "vps -D 1080"  # as ssh/client.py names it
    forward.stats.count_error("unreachable")
    state.tunnels.append(TunnelStats("vps", "user@vps", state="up", forwards=[forward]))
    state.open_session(forward.stats, "127.0.0.1:4000", "evil\x1b[2J.example:443", "ssh").bytes_up = 5
    state.close_session(
        state.open_session(forward.stats, "127.0.0.1:4001", "evil\x1b[2J.example:80", "ssh"),
        "target:\x1b[2J no",
    )
    state.server_sessions.append(
        ServerSessionStats("alice\n", "198.51.100.2:40000", "SHA256:abc", forwards=["-R 9000"])
    )
    state.server_auth_failures = 3
    state.gateway_rules.append(GatewayRuleRow("prerouting", "web dnat", 10, 840))
    state.triggers.append(TriggerRow("game", "udp/27000-27015", "192.168.1.20", 55))
    state.gateway_sessions.append(
        GatewaySessionRow("web", "tcp", "203.0.113.9:5555", 8080, "192.168.1.10:80", "ESTABLISHED", 12)
    )
    state.gateway_sessions.append(
        GatewaySessionRow("web", "udp", "203.0.113.9:5556", 8081, "192.168.1.10:81", "", None)
    )
    state.mappings.append(
        MappingRow(
            "web", "pcp", "tcp", "192.168.1.2:8080", "198.51.100.1:8080", "up", 7200, 1.9e9, 3, 1, "", 1.7e9
        )
    )
    return state


def test_snapshot_round_trips_through_json() -> None:
    snapshot = busy_state().status()
    text = json.dumps(snapshot.to_json())
    assert Snapshot.from_json(json.loads(text)) == snapshot


def test_json_keeps_the_old_keys_and_carries_the_version_first() -> None:
    data = json.loads(json.dumps(busy_state().snapshot()))
    assert next(iter(data)) == "schema"
    assert data["schema"] == SCHEMA == 1
    assert data["rules"][0]["bytes_up"] == 160
    assert data["rules"][0]["errors"] == {"refused": 2}
    assert data["sessions"][0]["client"] == "192.0.2.7:5000"
    assert data["tunnels"][0]["forwards"][0]["spec"] == "-D 1080"
    assert data["server_sessions"][0]["forwards"] == ["-R 9000"]
    assert data["gateway_sessions"][1]["age"] is None
    assert data["mappings"][0]["expires"] == 1.9e9
    assert data["listeners"] == [
        {"rule": "web", "address": "0.0.0.0:8080", "protocol": "tcp", "path": "splice"}
    ]
    assert data["listening"] == [
        {"owner": "web", "kind": "rule", "protocol": "tcp", "address": "0.0.0.0:8080", "path": "splice"}
    ]
    assert [(row["rule"], row["client"], row["bytes_up"], row["reason"]) for row in data["closed"]] == [
        ("web", "192.0.2.9:5002", 0, "upstream: connection refused"),
        ("web", "192.0.2.8:5001", 60, "client closed"),
        ("vps -D 1080", "127.0.0.1:4001", 0, "target:\x1b[2J no"),
    ]
    assert data["rules"][0]["rate_up"] == data["sessions"][0]["rate_down"] == 0.0


@pytest.mark.parametrize(
    ("schema", "spoken"), [(2, "2"), (0, "0"), ("one", "?"), (None, "?"), (True, "?"), (1.5, "?")]
)
def test_another_schema_version_is_refused_in_one_line(schema: object, spoken: str) -> None:
    data = busy_state().snapshot()
    data["schema"] = schema
    with pytest.raises(StatusError) as caught:
        Snapshot.from_json(data)
    assert str(caught.value) == (
        f"the instance speaks status schema {spoken}; this portfwd reads {SCHEMA}; "
        "use the same portfwd version for both"
    )


def test_a_snapshot_without_a_version_is_schema_0() -> None:
    data = busy_state().snapshot()
    del data["schema"]
    with pytest.raises(StatusError, match="speaks status schema 0; this portfwd reads 1"):
        Snapshot.from_json(data)


def test_bad_values_are_named_by_their_path() -> None:
    data = busy_state().snapshot()
    data["tunnels"][0]["forwards"][0]["bytes_up"] = "lots"
    with pytest.raises(StatusError) as caught:
        Snapshot.from_json(data)
    assert str(caught.value) == "status.tunnels[0].forwards[0].bytes_up: expected an integer, got a string"
    data = busy_state().snapshot()
    del data["rules"][0]["listen"]
    with pytest.raises(StatusError, match=r"^status.rules\[0\]: 'listen' is missing$"):
        Snapshot.from_json(data)


def test_unknown_keys_are_ignored_and_new_keys_have_defaults() -> None:
    data = busy_state().snapshot()
    data["from_the_future"] = {"x": 1}
    data["rules"][0]["also_new"] = [1, 2]
    del data["rules"][0]["connect_buckets"], data["server_auth_failures"]
    snapshot = Snapshot.from_json(data)
    assert snapshot.rules[0].connect_buckets == ()
    assert snapshot.server_auth_failures == 0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _fails_in_one_line(data: object) -> None:
    try:
        Snapshot.from_json(data)
    except StatusError as exc:
        line = str(exc)
    else:
        return
    assert "\n" not in line
    assert len(line) < 200


@given(JSON)
@settings(max_examples=300, deadline=None)
def test_any_json_reads_or_fails_in_one_line(data: object) -> None:
    _fails_in_one_line(data)
    if isinstance(data, dict):
        _fails_in_one_line({**data, "schema": SCHEMA})


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(item, (*path, key))] or [path]
    if isinstance(value, list):
        return [leaf for index, item in enumerate(value) for leaf in _leaves(item, (*path, index))] or [path]
    return [path]


VALID = busy_state().snapshot()
PATHS = [path for path in _leaves(VALID) if path]


@given(st.lists(st.tuples(st.sampled_from(PATHS), JSON), min_size=1, max_size=3))
@settings(max_examples=300, deadline=None)
def test_a_valid_snapshot_with_values_swapped_reads_or_fails_in_one_line(
    changes: list[tuple[tuple[Any, ...], object]],
) -> None:
    data = copy.deepcopy(VALID)
    for path, value in changes:
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = value
    _fails_in_one_line(data)


def render(renderable: object) -> str:
    out = io.StringIO()
    Console(file=out, width=250, markup=False, emoji=False, highlight=False).print(renderable)
    return out.getvalue()


def test_status_view_renders_every_part_with_peer_text_escaped() -> None:
    snapshot = views.printable_snapshot(json.loads(json.dumps(busy_state().snapshot())))
    text = render(views.status_view(snapshot))
    for title in ("rules", "tunnels", "gateway (table inet portfwd)", "router mappings", "port triggers"):
        assert title in text
    assert "gateway NAT sessions (conntrack)" in text
    assert "server sessions" in text
    assert "portfwd edge (run), pid" in text
    assert "denied 1, refused 2" in text
    assert "alice\\n" in text
    assert "\x1b" not in text
    assert "listening sockets" in text
    assert "recently closed" in text
    assert "upstream: connection refused" in text
    assert "target:\\x1b[2J no" in text
    listing = render(views.instances_view([snapshot, snapshot]))
    assert "2 running instance(s)" in listing


def test_printable_snapshot_refuses_another_version_in_one_line() -> None:
    with pytest.raises(StatusError, match=r"^the instance speaks status schema 7; "):
        views.printable_snapshot({**busy_state().snapshot(), "schema": 7})


def test_metrics_read_the_same_rows() -> None:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StateCollector(busy_state()))
    text = generate_latest(registry).decode()
    assert 'portfwd_bytes_total{direction="up",rule="web"} 160.0' in text  # a closed session's 60 too
    assert 'portfwd_errors_total{reason="denied",rule="web"} 1.0' in text
    assert 'portfwd_upstream_connect_seconds_bucket{le="0.005",rule="web"} 1.0' in text
    assert 'portfwd_tunnel_bytes_total{direction="up",forward="-D 1080",tunnel="vps"} 5.0' in text
    assert "portfwd_server_auth_failures_total 3.0" in text
    assert 'portfwd_gateway_bytes_total{chain="prerouting",rule="web dnat"} 840.0' in text
    assert 'portfwd_trigger_held{host="192.168.1.20",trigger="game"} 1.0' in text
    assert 'portfwd_mapping_up{mapping="web tcp",method="pcp"} 1.0' in text
    assert 'portfwd_mapping_renewals_total{mapping="web tcp"} 3.0' in text
