"""The [web] guard's decisions (token, Origin, Host) and the OpenAPI document, without a server."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from portfwd.status import RuleRow, Snapshot
from portfwd.web import guard
from portfwd.web.feed import sse
from portfwd.web.openapi import document

TOKEN = "a" * 32


def test_the_token_is_needed_only_where_asked_and_compared_whole() -> None:
    assert guard.authorize(TOKEN, None, needed=False) is None
    assert guard.authorize(TOKEN, TOKEN, needed=True) is None
    assert guard.authorize(TOKEN, None, needed=True) == guard.Refusal(
        401, "this needs the [web] token: send Authorization: Bearer TOKEN"
    )
    refused = guard.authorize(TOKEN, TOKEN[:-1], needed=True)
    assert refused is not None
    assert refused.status == 401
    off = guard.authorize(None, TOKEN, needed=True)
    assert off is not None
    assert off.status == 403
    assert "no [web] token" in off.message


def test_bearer_reads_only_the_bearer_scheme() -> None:
    assert guard.bearer(f"Bearer {TOKEN}") == TOKEN
    assert guard.bearer(f"bearer   {TOKEN} ") == TOKEN
    assert guard.bearer(f"Basic {TOKEN}") is None
    assert guard.bearer("Bearer ") is None
    assert guard.bearer(None) is None


def test_origin_must_be_this_server() -> None:
    assert guard.same_origin(None, None, "127.0.0.1:9931", None) is None
    assert guard.same_origin("http://127.0.0.1:9931", "same-origin", "127.0.0.1:9931", None) is None
    assert guard.same_origin("http://localhost", None, "localhost:80", None) is None
    assert guard.same_origin("https://dash.example", None, "127.0.0.1:9931", "dash.example:443") is None
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9932", "file://", "%"):
        refused = guard.same_origin(origin, None, "127.0.0.1:9931", None)
        assert refused is not None, origin
        assert refused.status == 403
    refused = guard.same_origin(None, "cross-site", "127.0.0.1:9931", None)
    assert refused is not None
    assert refused.message.startswith("cross-site request refused")


def test_the_host_must_be_an_address_localhost_or_a_listed_name() -> None:
    names = frozenset({"dash.example"})
    for host in (
        "127.0.0.1:9931",
        "localhost:9931",
        "[::1]:9931",
        "LOCALHOST",
        "10.0.0.1",
        "dash.example:443",
    ):
        assert guard.known_host(host, names) is None, host
    for host in ("rebind.example:9931", "127.0.0.1.nip.io", "[evil]:1", "", "dash.example.evil"):
        refused = guard.known_host(host, names)
        assert refused is not None, host
        assert "DNS rebinding" in refused.message
    assert guard.known_host(None, names) == guard.Refusal(403, "no Host header; send one")


def test_behind_an_https_proxy_a_host_without_port_is_the_origin_s() -> None:
    assert guard.same_origin("https://dash.example", "same-origin", "dash.example", None) is None
    assert guard.same_origin("https://dash.example", None, "127.0.0.1:9931", "dash.example") is None
    assert guard.same_origin("https://dash.example:8443", None, "dash.example", None) is not None
    assert guard.same_origin("http://dash.example:99999", None, "dash.example:99999", None) is not None


@given(st.text(max_size=200), st.one_of(st.none(), st.text(max_size=30)), st.text(max_size=100))
def test_the_guard_never_raises_and_answers_in_one_line(origin: str, site: str | None, host: str) -> None:
    for refusal in (
        guard.same_origin(origin, site, host, None),
        guard.known_host(host, frozenset()),
        guard.authorize(TOKEN, guard.bearer(origin), needed=True),
    ):
        if refusal is not None:
            assert "\n" not in refusal.message
            assert refusal.status in (401, 403)


def test_the_openapi_document_describes_the_status_it_serves() -> None:
    served = document()
    schemas = served["components"]["schemas"]
    for name in ("Snapshot", "RuleRow", "BackendRow", "SessionRow", "ClosedRow", "TunnelRow", "MappingRow"):
        Draft202012Validator.check_schema(schemas[name])
    assert schemas["RuleRow"]["properties"]["mode"] == {"type": "string"}
    snapshot = Snapshot(pid=1, started=0.0, config=None, instance="x", kind="run", control="")
    row = RuleRow("r", "l", "c", "tcp", "splice", True, 1, 0, 2, 3, 0, {"refused": 1}, 0, mode="paused")
    data = dataclasses.replace(snapshot, rules=(row,)).to_json()
    Draft202012Validator(
        {"$ref": "#/components/schemas/Snapshot", "components": served["components"]}
    ).validate(data)


def test_an_event_is_one_data_line() -> None:
    assert sse("status", {"a": "line\nbreak"}) == b'event: status\ndata: {"a":"line\\nbreak"}\n\n'


def test_a_status_event_carries_at_most_max_rows_per_list() -> None:
    from portfwd.web.feed import MAX_ROWS, bounded

    sessions = [{"id": index, "bytes_up": index, "bytes_down": 0} for index in range(MAX_ROWS + 500)]
    flows = [{"state": "TIME_WAIT" if index % 2 else "ESTABLISHED"} for index in range(MAX_ROWS + 2)]
    status = bounded({"sessions": sessions, "kernel_sessions": flows, "gateway_sessions": []})
    assert len(status["sessions"]) == MAX_ROWS
    assert status["sessions"][0]["id"] == MAX_ROWS + 499, "the largest first"
    assert status["omitted"] == {"sessions": 500, "kernel_sessions": 2}
    assert [flow["state"] for flow in status["kernel_sessions"][: (MAX_ROWS + 2) // 2]] == ["ESTABLISHED"] * (
        (MAX_ROWS + 2) // 2
    )
    assert "omitted" not in bounded({"sessions": sessions[:3]})


async def test_the_kernel_flows_are_read_at_a_pace_their_cost_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    from portfwd.state import State
    from portfwd.web import feed as feed_module

    clock = [100.0]
    monkeypatch.setattr(feed_module.time, "monotonic", lambda: clock[0])
    state = State()
    reads: list[float] = []

    async def reader() -> None:
        reads.append(clock[0])
        clock[0] += 0.5  # a dump of a busy conntrack table

    state.readers.append(reader)
    feed = feed_module.Feed(state)
    feed.watch()
    for _ in range(40):
        await feed.tick()
        clock[0] += 1.0
    assert reads[0] == 100.0
    gaps = [later - earlier for earlier, later in itertools.pairwise(reads)]
    assert gaps
    assert min(gaps) >= 0.5 * feed_module.READ_COST, "a 0.5 s dump at most every 25 s"


def test_a_limited_snapshot_keeps_the_sessions_that_moved_most() -> None:
    from portfwd.state import State

    state = State()
    rule = state.rule("r")
    for moved in (5, 50, 1, 500, 20):
        session = state.open_session(rule, f"c{moved}", "t", "splice")
        session.bytes_up = moved
    assert [row.client for row in state.status(limit=2).sessions] == ["c500", "c50"]
    assert state.sessions_omitted == 3
    assert len(state.status().sessions) == 5
    assert state.sessions_omitted == 0
