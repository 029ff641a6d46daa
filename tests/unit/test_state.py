"""state: counters, the connect histogram, idle sampling and the typed snapshot it builds."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from portfwd.counters import (
    CONNECT_BUCKETS,
    RuleStats,
    ServerSessionStats,
    Session,
    TunnelForwardStats,
    TunnelStats,
)
from portfwd.state import RECENT_CLOSED, State
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


@dataclass
class Relay:
    """A relay that ends as the real ones do: it reports its own reason to the state at once."""

    state: State
    session: Session
    told: list[str] = field(default_factory=list)

    def close(self, reason: str) -> None:
        self.told.append(reason)
        self.state.close_session(self.session, "client closed")  # what it saw first


def test_recently_closed_keeps_the_last_n_per_rule_newest_first_with_why() -> None:
    state = State()
    web, dns = state.rule("web"), state.rule("dns")
    before = time.time()
    for number in range(RECENT_CLOSED + 5):
        session = state.open_session(web, f"192.0.2.1:{5000 + number}", "10.0.0.5:80", "splice")
        session.bytes_up, session.bytes_down = number, 2 * number
        state.close_session(session, "client closed" if number % 2 else "upstream reset")
    flow = state.open_session(dns, "192.0.2.2:53000", "10.0.0.53:53", "udp")
    state.close_session(flow, "idle")
    state.connect_failed(dns, "192.0.2.3:53001", "10.0.0.53:53", "udp", "upstream: connection refused")
    closed = state.status().closed
    assert [(row.rule, row.client, row.bytes_up, row.bytes_down, row.reason) for row in closed] == [
        *[
            (
                "web",
                f"192.0.2.1:{5000 + number}",
                number,
                2 * number,
                "client closed" if number % 2 else "upstream reset",
            )
            for number in reversed(range(5, RECENT_CLOSED + 5))
        ],
        ("dns", "192.0.2.3:53001", 0, 0, "upstream: connection refused"),
        ("dns", "192.0.2.2:53000", 0, 0, "idle"),
    ]
    for row in closed:
        assert before <= row.started <= row.ended <= time.time() + 0.01
        assert row.duration == pytest.approx(row.ended - row.started, abs=1e-6)
    assert state.rule_rows()[0].bytes_up == sum(range(RECENT_CLOSED + 5)), "closing still folds bytes in"


def test_why_the_state_closed_a_session_wins_over_what_its_relay_saw() -> None:
    state = State()
    rule = state.rule("web")
    rule.idle_timeout = 5.0
    idle = state.open_session(rule, "c1", "t", "splice")
    idle.relay = slow = Relay(state, idle)
    idle.began -= 10
    idle.active -= 10
    busy = state.open_session(rule, "c2", "t", "protocol")
    busy.relay = shut = Relay(state, busy)
    state.sample()
    assert slow.told == ["idle timeout"]
    state.close_all("shutdown")
    assert shut.told == ["shutdown"]
    assert [(row.client, row.reason) for row in state.status().closed] == [
        ("c2", "shutdown"),
        ("c1", "idle timeout"),
    ]
    assert state._closing == {}, "nothing is left behind for sessions that are gone"
    plain = state.open_session(rule, "c3", "t", "splice")
    state.close_session(plain)
    assert state.status().closed[0].reason == "closed"


def test_server_clients_share_one_recent_list_that_outlives_their_login() -> None:
    state = State()
    for user in ("alice", "bob"):
        client = ServerSessionStats(user, "198.51.100.2:40000", "SHA256:x")
        client.stats.name = f"server {user}"
        state.server_sessions.append(client)
        state.close_session(state.open_session(client.stats, "c", "t", "ssh"), "channel closed")
        state.server_sessions.remove(client)  # logged out
    assert [(row.rule, row.reason) for row in state.status().closed] == [
        ("server bob", "channel closed"),
        ("server alice", "channel closed"),
    ]


def test_rates_are_bytes_per_second_over_the_sample_interval() -> None:
    state = State()
    rule = state.rule("web")
    forward = TunnelForwardStats("-L 8080:web:80", "local", "127.0.0.1:8080", "web:80")
    state.tunnels.append(TunnelStats("edge", "ssh.example", forwards=[forward]))
    client = ServerSessionStats("alice", "198.51.100.2:40000", "SHA256:x")
    state.server_sessions.append(client)
    session = state.open_session(rule, "c", "t", "splice")
    tunnelled = state.open_session(forward.stats, "c", "t", "ssh")
    served = state.open_session(client.stats, "c", "t", "ssh")
    state.sample()
    session.bytes_up, session.bytes_down = 4000, 1000
    tunnelled.bytes_down = 2000
    served.bytes_up = 8000
    gone = state.open_session(rule, "c", "t", "splice")
    gone.bytes_up = 6000
    state.close_session(gone, "client closed")  # closed between samples: still in the rule's rate
    state._sampled -= 2.0  # the interval is a little over two seconds
    state.sample()
    [row, _, _] = state.status().sessions
    assert 1900 < row.rate_up <= 2000
    assert 475 < row.rate_down <= 500
    [rule_row] = state.status().rules
    assert 4750 < rule_row.rate_up <= 5000
    assert 475 < rule_row.rate_down <= 500
    assert 950 < state.status().tunnels[0].forwards[0].rate_down <= 1000
    assert 3800 < state.status().server_sessions[0].rate_up <= 4000
    state._sampled -= 2.0
    state.sample()  # nothing moved since
    assert state.status().sessions[0].rate_up == state.status().rules[0].rate_up == 0.0


def test_listening_is_one_row_per_socket_with_the_address_it_has(tmp_path: Path) -> None:
    state = State()
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind(("::1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "ctl.sock"))
    with tcp, udp, unix:
        state.add_listening("web", "splice", [tcp])
        state.add_listening("web", "udp", [udp])
        state.add_listening("edge -L 9000:x:1", "ssh", [tcp], "tunnel")
        state.add_listening("control", "control", [unix], "control")
        assert [
            (item.owner, item.kind, item.protocol, item.address, item.path)
            for item in state.status().listening
        ] == [
            ("web", "rule", "tcp", f"127.0.0.1:{tcp.getsockname()[1]}", "splice"),
            ("web", "rule", "udp", f"[::1]:{udp.getsockname()[1]}", "udp"),
            ("edge -L 9000:x:1", "tunnel", "tcp", f"127.0.0.1:{tcp.getsockname()[1]}", "ssh"),
            ("control", "control", "unix", str(tmp_path / "ctl.sock"), "control"),
        ]
    state.remove_listening(["edge -L 9000:x:1"])  # a rule of that name: there is none
    assert len(state.listening) == 4
    state.remove_listening(["web"])
    assert [item.kind for item in state.listening] == ["tunnel", "control"]


def test_order_rules_follows_the_config_after_a_reload() -> None:
    state = State()
    for name in ("b", "gone", "a"):
        state.rule(name)
    state.order_rules(["a", "b"])
    assert [row.name for row in state.status().rules] == ["a", "b", "gone"]
