"""The kernel relay's plan (forward rules as nft text), what it refuses, and its counters.

The plans are also checked by the real nft (`nft -c`, which asks the kernel too) inside a
throwaway network namespace, never in the machine's own.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portfwd.addr import HostPorts, PortRange, Transport, UnixPath
from portfwd.kernel.relay import (
    KernelRelayError,
    comment,
    document,
    needs_forwarding,
    plan,
    unsuitable,
)
from portfwd.kernel.relaytable import Counts, counts, explain
from portfwd.specs import BackendSpec, HealthSpec, RouteSpec, RuleSpec
from tests.conftest import need, need_root

TABLE = "pft_test"


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def hp(host: str, first: int, last: int | None = None) -> HostPorts:
    return HostPorts(host, PortRange(first, last or first))


def rule(listen: HostPorts | UnixPath, connect: HostPorts | UnixPath, **extra: Any) -> RuleSpec:
    extra.setdefault("where", "forward[0]")
    return RuleSpec(label=extra.pop("label", "r"), name=None, listen=listen, connect=connect, **extra)


BASE_CHAINS = ("prerouting", "output", "postrouting", "count_in", "count_out")


def body(text: str, chain: str) -> list[str]:
    """The rule lines of one chain of a plan (without a base chain's hook line)."""
    lines = text.splitlines()
    start = lines.index(f"  chain {chain} {{")
    end = lines.index("  }", start)
    return [line.strip() for line in lines[start + (2 if chain in BASE_CHAINS else 1) : end]]


def chains(text: str) -> dict[str, list[str]]:
    """Every chain of a plan, by name (as `body` reads each; in one pass: a plan may have 5,000)."""
    found: dict[str, list[str]] = {}
    lines = text.splitlines()
    for start, line in enumerate(lines):
        named = re.fullmatch(r"  chain (\w+) \{", line)
        if named is not None:
            name = named.group(1)
            end = lines.index("  }", start)
            found[name] = [item.strip() for item in lines[start + (2 if name in BASE_CHAINS else 1) : end]]
    return found


def vmap(text: str, name: str) -> dict[tuple[int, int], str] | None:
    """A dispatch map's elements, (first port, last port) -> the chain it jumps to; None if absent."""
    found = re.search(
        rf"^  map {name} \{{ type inet_service : verdict;(?: flags interval;)? elements = \{{ (.*) \}}; \}}$",
        text,
        re.MULTILINE,
    )
    if found is None:
        return None
    elements: dict[tuple[int, int], str] = {}
    for element in found[1].split(", "):
        ports, jump = element.split(" : jump ")
        first, _, last = ports.partition("-")
        elements[int(first), int(last or first)] = jump
    return elements


def dispatched(text: str, name: str, port: int) -> list[str]:
    """The rules' own chains a packet to `port` goes through, in order, by the map `name`."""
    for (first, last), chain in (vmap(text, name) or {}).items():
        if first <= port <= last:
            jumps = body(text, chain)
            if jumps and all(line.startswith("jump ") for line in jumps):
                return [line.removeprefix("jump ") for line in jumps]
            return [chain]
    return []


# --------------------------------------------------------------------------- shapes


def test_redirect_to_a_local_port() -> None:
    text = plan([rule(hp("", 80), hp("127.0.0.1", 8080), label="web", protocol=Transport.TCP_UDP)], TABLE)
    assert text.startswith(f"table inet {TABLE} {{\n")
    pre = 'meta nfproto ipv4 fib daddr type local tcp dport 80 counter name flows_0 redirect to :8080 comment "web"'
    assert pre in body(text, "rule_0")
    assert any("udp dport 80 counter name flows_0 redirect to :8080" in line for line in body(text, "rule_0"))
    # One dispatch by protocol and port per hook; the same chain serves local clients here.
    assert body(text, "prerouting") == ["tcp dport vmap @pre_tcp", "udp dport vmap @pre_udp"]
    assert body(text, "output") == ["tcp dport vmap @out_tcp", "udp dport vmap @out_udp"]
    for name in ("pre_tcp", "pre_udp", "out_tcp", "out_udp"):
        assert vmap(text, name) == {(80, 80): "rule_0"}
    assert "type nat hook output priority -100; policy accept;" in text
    assert body(text, "postrouting") == []  # nothing leaves the host: no masquerade
    assert not needs_forwarding([rule(hp("", 80), hp("127.0.0.1", 8080))])
    assert not any("ip6" in line or "ipv6" in line for line in text.splitlines())


def test_localhost_redirects_both_families() -> None:
    text = plan([rule(hp("", 80), hp("localhost", 8080))], TABLE)
    assert (
        "meta nfproto ipv4 fib daddr type local tcp dport 80 counter name flows_0 redirect to :8080" in text
    )
    assert (
        "meta nfproto ipv6 fib daddr type local tcp dport 80 counter name flows_0 redirect to :8080" in text
    )


def test_loopback_listen_redirects_only_local_clients() -> None:
    text = plan([rule(hp("127.0.0.1", 80), hp("127.0.0.1", 8080))], TABLE)
    assert body(text, "prerouting") == []
    assert vmap(text, "pre_tcp") is None
    assert vmap(text, "out_tcp") == {(80, 80): "rule_0"}
    assert body(text, "rule_0") == [
        'ip daddr 127.0.0.1 tcp dport 80 counter name flows_0 redirect to :8080 comment "r"'
    ]


def test_the_listen_address_itself_is_dnated_to_exactly() -> None:
    text = plan([rule(hp("10.0.0.1", 80), hp("10.0.0.1", 8080))], TABLE)
    assert body(text, "rule_0") == [
        'ip daddr 10.0.0.1 tcp dport 80 counter name flows_0 dnat ip to 10.0.0.1:8080 comment "r"'
    ]
    assert body(text, "postrouting") == []
    assert not needs_forwarding([rule(hp("10.0.0.1", 80), hp("10.0.0.1", 8080))])


def test_dnat_and_masquerade_for_a_remote_target() -> None:
    spec = rule(hp("", 5000), hp("10.60.0.2", 9000), label="db")
    text = plan([spec], TABLE)
    assert body(text, "rule_0") == [
        'meta nfproto ipv4 fib daddr type local tcp dport 5000 counter name flows_0 dnat ip to 10.60.0.2:9000 comment "db"'
    ]
    # A local client may not send from 127.0.0.1 to another host: loopback is left alone.
    assert body(text, "rule_0_out") == [
        "meta nfproto ipv4 fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 5000 counter"
        ' name flows_0 dnat ip to 10.60.0.2:9000 comment "db"'
    ]
    assert vmap(text, "pre_tcp") == {(5000, 5000): "rule_0"}
    assert vmap(text, "out_tcp") == {(5000, 5000): "rule_0_out"}
    # Only these flows: DNATed from our port (the map's key), answered by our target.
    assert body(text, "postrouting") == [
        "meta l4proto tcp ct status dnat ct original proto-dst vmap @masq_tcp"
    ]
    assert vmap(text, "masq_tcp") == {(5000, 5000): "masq_0"}
    assert body(text, "masq_0") == [
        "meta nfproto ipv4 meta l4proto tcp ct reply ip saddr 10.60.0.2 ct reply proto-src 9000"
        ' counter masquerade comment "db"'
    ]
    tracked = "meta nfproto ipv4 meta l4proto tcp ct reply ip saddr 10.60.0.2 ct reply proto-src 9000"
    # Every packet, each way apart: looked up by the flow's original port, one map for both hooks.
    assert body(text, "count_in") == [
        'meta l4proto tcp iif != "lo" ct status dnat ct original proto-dst vmap @count_tcp'
    ]
    assert body(text, "count_out") == [
        "meta l4proto tcp ct status dnat ct original proto-dst vmap @count_tcp"
    ]
    assert vmap(text, "count_tcp") == {(5000, 5000): "count_0"}
    assert body(text, "count_0") == [
        f'ct direction original {tracked} counter name up_0 comment "db (up)"',
        f'ct direction reply {tracked} counter name down_0 comment "db (down)"',
    ]
    assert needs_forwarding([spec])


def test_a_specific_listen_address_and_ipv6() -> None:
    text = plan([rule(hp("2001:db8::1", 53), hp("2001:db8::5", 5353), protocol=Transport.UDP)], TABLE)
    assert (
        'ip6 daddr 2001:db8::1 udp dport 53 counter name flows_0 dnat ip6 to [2001:db8::5]:5353 comment "r"'
        in text
    )
    assert "ct original ip6 daddr 2001:db8::1 ct reply ip6 saddr 2001:db8::5 ct reply proto-src 5353" in text


def test_a_port_range_keeps_its_offset() -> None:
    text = plan([rule(hp("", 7000, 7002), hp("10.60.0.2", 9000, 9002))], TABLE)
    assert (
        "  map ports_0 { type inet_service : inet_service; elements = { 7000 : 9000, 7001 : 9001, 7002 : 9002 }; }"
        in text
    )
    assert "tcp dport 7000-7002 counter name flows_0 dnat ip to 10.60.0.2 : tcp dport map @ports_0" in text
    assert (
        "meta l4proto tcp ct reply ip saddr 10.60.0.2 ct reply proto-src 9000-9002 counter masquerade" in text
    )
    assert vmap(text, "masq_tcp") == {(7000, 7002): "masq_0"}
    assert "flags interval;" in text
    redirect = plan([rule(hp("", 7000, 7001), hp("127.0.0.1", 9000, 9001))], TABLE)
    assert "redirect to : tcp dport map @ports_0" in redirect
    single = plan([rule(hp("", 7000, 7001), hp("10.60.0.2", 9000))], TABLE)
    assert "map ports_" not in single
    assert "tcp dport 7000-7001 counter name flows_0 dnat ip to 10.60.0.2:9000" in single


def test_allow_deny_and_routes_in_order() -> None:
    spec = rule(
        hp("", 80),
        hp("10.60.0.2", 80),
        allow=(net("10.0.0.0/8"), net("10.1.0.0/16"), net("2001:db8::/32")),
        deny=(net("10.5.0.0/16"),),
        route=(
            RouteSpec((net("10.6.0.0/16"),), hp("10.60.0.3", 80)),
            RouteSpec((net("2001:db8:1::/48"),), hp("2001:db8::9", 8080)),
        ),
    )
    text = plan([spec], TABLE)
    # Overlapping networks are merged (nft refuses conflicting intervals).
    assert "  set allow_0_4 { type ipv4_addr; flags interval; elements = { 10.0.0.0/8 }; }" in text
    assert "  set allow_0_6 { type ipv6_addr; flags interval; elements = { 2001:db8::/32 }; }" in text
    assert "  set deny_0_4 { type ipv4_addr; flags interval; elements = { 10.5.0.0/16 }; }" in text
    assert "  set route_0_0_4 { type ipv4_addr; flags interval; elements = { 10.6.0.0/16 }; }" in text
    assert "  set route_0_1_6 { type ipv6_addr; flags interval; elements = { 2001:db8:1::/48 }; }" in text
    v4 = [line for line in body(text, "rule_0") if "ipv4" in line]
    assert [line.split(" counter ")[1] for line in v4] == [
        'name denied_0 reject with tcp reset comment "r (denied)"',
        'name denied_0 reject with tcp reset comment "r (denied)"',
        'name flows_0 dnat ip to 10.60.0.3:80 comment "r"',
        'name flows_0 dnat ip to 10.60.0.2:80 comment "r"',
    ]
    assert "ip saddr @deny_0_4" in v4[0]
    assert "ip saddr != @allow_0_4" in v4[1]
    assert "ip saddr @route_0_0_4" in v4[2]
    v6 = [line for line in body(text, "rule_0") if "ipv6" in line]
    assert "ip6 saddr @route_0_1_6 counter name flows_0 dnat ip6 to [2001:db8::9]:8080" in v6[-1]
    assert len(body(text, "masq_0")) == 3


def test_an_allow_list_without_a_family_drops_that_family() -> None:
    spec = rule(hp("", 80), hp("localhost", 8080), allow=(net("10.0.0.0/8"),))
    text = plan([spec], TABLE)
    assert "  set allow_0_6 { type ipv6_addr; flags interval; }" in text
    assert "ip6 saddr != @allow_0_6 counter name denied_0 reject with tcp reset" in text


def test_0_0_0_0_listens_on_every_ipv4_address_and_double_colon_on_every_ipv6_one() -> None:
    """As the userspace relay binds them: not `ip daddr 0.0.0.0`, which no packet has."""
    text = plan([rule(hp("0.0.0.0", 8080), hp("10.60.0.2", 80), label="any4")], TABLE)
    assert body(text, "rule_0") == [
        'meta nfproto ipv4 fib daddr type local tcp dport 8080 counter name flows_0 dnat ip to 10.60.0.2:80 comment "any4"'
    ]
    assert body(text, "rule_0_out") == [
        "meta nfproto ipv4 fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 8080 counter"
        ' name flows_0 dnat ip to 10.60.0.2:80 comment "any4"'
    ]
    assert "daddr 0.0.0.0" not in text
    assert "ct original ip daddr" not in text  # every address: the flows are matched by port
    assert "meta l4proto tcp ct reply ip saddr 10.60.0.2 ct reply proto-src 80" in body(text, "masq_0")[0]
    assert vmap(text, "masq_tcp") == {(8080, 8080): "masq_0"}
    assert "ipv6" not in text

    text = plan([rule(hp("0.0.0.0", 8080), hp("localhost", 80), label="any4")], TABLE)
    assert body(text, "rule_0") == [
        'meta nfproto ipv4 fib daddr type local tcp dport 8080 counter name flows_0 redirect to :80 comment "any4"'
    ]
    text = plan([rule(hp("::", 8080), hp("localhost", 80), label="any6", protocol=Transport.UDP)], TABLE)
    assert body(text, "rule_0") == [
        'meta nfproto ipv6 fib daddr type local udp dport 8080 counter name flows_0 redirect to :80 comment "any6"'
    ]
    assert "ipv4" not in text
    assert "daddr ::" not in text
    text = plan([rule(hp("::", 53), hp("2001:db8::5", 5353))], TABLE)
    assert (
        "meta nfproto ipv6 fib daddr type local ip6 daddr != ::1 tcp dport 53" in body(text, "rule_0_out")[0]
    )
    assert needs_forwarding([rule(hp("::", 53), hp("2001:db8::5", 5353))])
    # A target of 0.0.0.0 / :: is this host (as a connect() there is): redirected, never DNATed to it.
    text = plan([rule(hp("0.0.0.0", 80), hp("0.0.0.0", 8080))], TABLE)
    assert body(text, "rule_0") == [
        'meta nfproto ipv4 fib daddr type local tcp dport 80 counter name flows_0 redirect to :8080 comment "r"'
    ]
    assert vmap(text, "masq_tcp") is None
    assert not needs_forwarding([rule(hp("0.0.0.0", 80), hp("0.0.0.0", 8080))])
    assert "different IP versions" in (unsuitable(rule(hp("0.0.0.0", 80), hp("::1", 8080))) or "")
    assert "different IP versions" in (unsuitable(rule(hp("::", 80), hp("10.0.0.5", 80))) or "")


def test_rules_sharing_ports_are_tried_in_order_and_each_does_its_exact_match() -> None:
    specs = [
        rule(hp("10.0.0.1", 80, 89), hp("10.60.0.2", 80), label="a", where="forward[0]"),
        rule(hp("", 85), hp("127.0.0.1", 8080), label="b", where="forward[1]"),
        rule(hp("10.0.0.2", 80), hp("10.60.0.3", 80), label="c", where="forward[2]"),
    ]
    text = plan(specs, TABLE)
    assert vmap(text, "pre_tcp") == {
        (80, 80): "pre_tcp_80",
        (81, 84): "rule_0",
        (85, 85): "pre_tcp_85",
        (86, 89): "rule_0",
    }
    assert "flags interval;" in text
    assert body(text, "pre_tcp_80") == ["jump rule_0", "jump rule_2"]
    assert body(text, "pre_tcp_85") == ["jump rule_0", "jump rule_1"]
    assert body(text, "rule_2") == [
        'ip daddr 10.0.0.2 tcp dport 80 counter name flows_2 dnat ip to 10.60.0.3:80 comment "c"'
    ]
    assert dispatched(text, "out_tcp", 85) == ["rule_0", "rule_1"]
    assert dispatched(text, "count_tcp", 80) == ["count_0", "count_2"]
    assert dispatched(text, "masq_tcp", 85) == ["masq_0"]  # b is redirected: nothing to masquerade
    assert dispatched(text, "pre_tcp", 90) == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["", "10.0.0.1", "10.0.0.2"]), st.integers(80, 90), st.integers(0, 4)),
        min_size=1,
        max_size=6,
    )
)
def test_every_port_dispatches_to_the_rules_that_cover_it_in_order(
    shapes: list[tuple[str, int, int]],
) -> None:
    specs = [
        rule(hp(host, first, first + extra), hp("10.60.0.2", 9000), where=f"forward[{index}]")
        for index, (host, first, extra) in enumerate(shapes)
    ]
    text = plan(specs, TABLE)
    for port in range(78, 97):
        covering = [index for index, (_, first, extra) in enumerate(shapes) if first <= port <= first + extra]
        assert dispatched(text, "pre_tcp", port) == [f"rule_{index}" for index in covering]
        assert dispatched(text, "count_tcp", port) == [f"count_{index}" for index in covering]
        assert dispatched(text, "masq_tcp", port) == [f"masq_{index}" for index in covering]


def test_the_work_per_packet_does_not_grow_with_the_rules() -> None:
    """Base chains of one lookup per protocol, whatever the number of rules; each rule's own
    chains as long with 1,000 rules as with one."""
    many = [
        rule(
            hp("", 20000 + i),
            hp("10.60.0.2", 30000 + i),
            label=f"r{i}",
            where=f"forward[{i}]",
            protocol=Transport.TCP_UDP,
        )
        for i in range(1000)
    ]
    one, text = plan(many[:1], TABLE), plan(many, TABLE)
    for name in BASE_CHAINS:
        assert body(text, name) == body(one, name)
        assert len(body(text, name)) == 2  # tcp, udp
    assert len(vmap(text, "pre_tcp") or {}) == 1000
    assert "flags interval;" not in text  # single ports: hash maps
    few, all_chains = chains(one), chains(text)
    assert len(all_chains) == 5 + 1000 * len(set(few) - set(BASE_CHAINS))
    assert all(
        len(all_chains[name.replace("_0", "_999")]) == len(lines)
        for name, lines in few.items()
        if "_0" in name
    )


def test_comments_are_safe_for_nft() -> None:
    assert comment(rule(hp("", 80), hp("127.0.0.1", 1), label='we"b\\x\n')) == "we_b_x_"
    assert len(comment(rule(hp("", 80), hp("127.0.0.1", 1), label="é" * 200)).encode()) <= 128


def test_bad_table_names_and_unsuitable_rules_are_refused() -> None:
    with pytest.raises(KernelRelayError, match="not an nft identifier"):
        plan([], "bad name")
    with pytest.raises(KernelRelayError, match=r"^forward\[0\]: proxy_protocol needs userspace$"):
        plan([rule(hp("", 80), hp("10.0.0.1", 80), proxy_protocol=2)], TABLE)
    assert document("x\n", "t") == "table inet t {}\ndelete table inet t\nx\n"


# --------------------------------------------------------------------------- unsuitable


REMOTE = hp("10.0.0.5", 80)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (rule(UnixPath("/run/a.sock"), REMOTE), "forward[0].listen: a Unix socket listener needs userspace"),
        (
            rule(hp("", 80), UnixPath("/run/a.sock")),
            "forward[0].connect: a Unix socket target needs userspace",
        ),
        (
            rule(hp("", 80), hp("web.internal", 80)),
            "forward[0].connect: host name 'web.internal' needs userspace",
        ),
        (rule(hp("", 80), REMOTE, proxy_protocol=1), "forward[0]: proxy_protocol needs userspace"),
        (rule(hp("", 80), REMOTE, accept_proxy=True), "forward[0]: accept_proxy needs userspace"),
        (
            rule(hp("", 80), REMOTE, backends=(BackendSpec(REMOTE, "a"), BackendSpec(REMOTE, "b"))),
            "several backends",
        ),
        (rule(hp("", 80), REMOTE, health=HealthSpec(interval=2)), "forward[0]: health checks need userspace"),
        (rule(hp("", 80), REMOTE, balance="first"), "forward[0]: balance needs userspace"),
        (rule(hp("", 80), REMOTE, max_connections=5), "forward[0]: max_connections needs userspace"),
        (rule(hp("", 80), REMOTE, max_connections_per_source=5), "forward[0]: max_connections_per_source"),
        (rule(hp("", 80), REMOTE, rate=(10, 1.0)), "forward[0]: rate needs userspace"),
        (rule(hp("", 80), REMOTE, bandwidth=1e6), "forward[0]: bandwidth needs userspace"),
        (rule(hp("", 80), REMOTE, bandwidth_per_connection=1e6), "forward[0]: bandwidth_per_connection"),
        (rule(hp("", 80), REMOTE, idle_timeout=30.0), "forward[0]: idle_timeout needs userspace"),
        (rule(hp("", 80), REMOTE, udp_idle_timeout=5.0), "forward[0]: udp_idle_timeout needs userspace"),
        (rule(hp("", 80), REMOTE, udp_max_flows=10), "forward[0]: udp_max_flows needs userspace"),
        (rule(hp("", 80), REMOTE, transparent=True), "forward[0]: transparent needs userspace"),
        (rule(hp("", 80), REMOTE, dual_stack=True), "forward[0]: dual_stack needs userspace"),
        (rule(hp("127.0.0.1", 80), REMOTE), "route_localnet"),
        (rule(hp("myhost", 80), REMOTE), "forward[0].listen: host name 'myhost' needs userspace"),
        (rule(hp("10.0.0.1", 80), hp("2001:db8::5", 80)), "different IP versions"),
        (rule(hp("fe80::1%eth0", 80), hp("fe80::2", 80)), "scoped IPv6 address"),
        (rule(hp("", 80, 82), hp("10.0.0.5", 80, 81)), "as long as the listen range"),
        (
            rule(hp("", 80), REMOTE, route=(RouteSpec((net("10.0.0.0/8"),), hp("db.internal", 5)),)),
            "forward[0].route[0].connect: host name 'db.internal'",
        ),
        (
            rule(hp("", 80), REMOTE, route=(RouteSpec((net("10.0.0.0/8"),), REMOTE, backend=1),)),
            "forward[0].route[0].backend",
        ),
        (
            rule(hp("", 80), REMOTE, route=(RouteSpec((net("2001:db8::/32"),), REMOTE),)),
            "forward[0].route[0].source: 2001:db8::/32 is IPv6",
        ),
    ],
)
def test_unsuitable_names_the_key(spec: RuleSpec, expected: str) -> None:
    problem = unsuitable(spec)
    assert problem is not None
    assert problem.startswith(expected) or expected in problem
    assert "\n" not in problem


def test_suitable_rules_and_ignored_socket_settings() -> None:
    base = rule(hp("", 80), REMOTE)
    assert unsuitable(base) is None
    # No socket in the middle: these have no meaning in the kernel and do not block it.
    assert (
        unsuitable(replace(base, connect_timeout=3.0, backlog=10, tcp_keepalive=False, relay="splice"))
        is None
    )
    assert unsuitable(rule(hp("::1", 80), hp("localhost", 8080))) is None
    assert unsuitable(rule(hp("10.0.0.1", 80), hp("localhost", 8080))) is None


# --------------------------------------------------------------------------- counters, errors


def _listing(*counters: tuple[str, str, int, int]) -> dict[str, Any]:
    """`nft -j list counters table ...`: (name, comment, packets, bytes) per counter object."""
    items: list[dict[str, Any]] = [{"metainfo": {"json_schema_version": 1}}]
    for name, label, packets, octets in counters:
        items.append(
            {
                "counter": {
                    **{"family": "inet", "name": name, "table": TABLE, "handle": 1, "comment": label},
                    **{"packets": packets, "bytes": octets},
                }
            }
        )
    return {"nftables": items}


def test_counts_take_flows_and_refusals_in_packets_and_each_way_in_bytes() -> None:
    listing = _listing(
        ("up_0", "web (up)", 11, 1100),
        ("down_0", "web (down)", 8, 900),
        ("flows_0", "web", 3, 180),
        ("denied_0", "web (denied)", 4, 240),
        ("up_1", "db (up)", 1, 60),
        ("flows_1", "db", 0, 0),
    )
    # A rule's expressions (what a whole-table listing also holds) are not counter objects.
    listing["nftables"].append(
        {"rule": {"chain": "rule_0", "comment": "web", "expr": [{"counter": "flows_0"}]}}
    )
    assert counts(listing) == {
        "web": Counts(connections=3, denied=4, bytes_up=1100, bytes_down=900),
        "db": Counts(bytes_up=60),
    }
    assert counts({}) == {}


def test_every_rule_has_its_four_counters() -> None:
    text = plan([rule(hp("", 80), REMOTE, label="web"), rule(hp("", 81), REMOTE, label="db")], TABLE)
    assert '  counter flows_1 { comment "db"; }' in text
    for name, suffix in (("flows", ""), ("denied", " (denied)"), ("up", " (up)"), ("down", " (down)")):
        assert f'  counter {name}_0 {{ comment "web{suffix}"; }}' in text
    assert all("counter name up_0 " in line for line in body(text, "count_0")[:1])


def test_a_paused_or_draining_rule_holds_or_refuses_first_packets_before_anything_else() -> None:
    rules = [
        rule(hp("", 80), REMOTE, label="web", protocol=Transport.TCP_UDP, deny=(net("10.5.0.0/16"),)),
        rule(hp("127.0.0.1", 81), hp("127.0.0.1", 8081), label="db"),
    ]
    plain = plan(rules, TABLE)
    assert plan(rules, TABLE, {"web": "", "other": "paused"}) == plain
    paused = plan(rules, TABLE, {"web": "paused"})
    # Local clients to a loopback address are left alone on output, as the NAT lines leave them
    # (every target is remote): a pause or drain refuses only what the rule would relay.
    for chain, local in (("rule_0", ""), ("rule_0_out", "ip daddr != 127.0.0.0/8 ")):
        lines = body(paused, chain)
        assert (
            lines[0]
            == f'meta nfproto ipv4 fib daddr type local {local}tcp dport 80 drop comment "web (paused)"'
        )
        assert any(line.endswith('udp dport 80 drop comment "web (paused)"') for line in lines)
        for proto in ("tcp", "udp"):
            kinds = [
                "held" if "(paused)" in line else "guard" if "(denied)" in line else "nat"
                for line in lines
                if f" {proto} dport " in line
            ]
            assert kinds == ["held", "guard", "nat"], (proto, lines)
    assert "draining" not in paused
    draining = plan(rules, TABLE, {"db": "draining", "web": "draining"})
    assert '  counter draining_1 { comment "db (draining)"; }' in draining
    assert body(draining, "rule_1")[0] == (
        'ip daddr 127.0.0.1 tcp dport 81 counter name draining_1 reject with tcp reset comment "db (draining)"'
    ), "a loopback listen: only the output chain"
    assert 'udp dport 80 counter name draining_0 drop comment "web (draining)"' in draining
    # The rest of the table is unchanged: live flows keep being masqueraded and counted.
    for chain in ("masq_0", "count_0"):
        assert body(draining, chain) == body(plain, chain)
    listing = _listing(("flows_0", "web", 3, 180), ("draining_0", "web (draining)", 2, 120))
    assert counts(listing) == {"web": Counts(connections=3, draining=2)}
    stderr = "/dev/stdin:{}:1-3: Error: syntax error\n"
    text = document(draining, TABLE)
    number = next(
        i
        for i, line in enumerate(text.splitlines(), 1)
        if 'reject with tcp reset comment "db (draining)"' in line
    )
    assert explain(text, stderr.format(number)) == ("db", "syntax error")


def test_nft_errors_name_the_rule() -> None:
    text = document(plan([rule(hp("", 80), REMOTE, label="web", allow=(net("10.0.0.0/8"),))], TABLE), TABLE)
    lines = text.splitlines()
    number = next(i for i, line in enumerate(lines, 1) if "masquerade" in line)
    stderr = f"/dev/stdin:{number}:5-9: Error: syntax error\n"
    assert explain(text, stderr) is not None
    assert explain(text, stderr)[0] == "web"  # type: ignore[index]
    number = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("set allow_0_4"))
    assert explain(text, f"/dev/stdin:{number}:3-5: Error: conflicting intervals specified\n") == (
        "web",
        "conflicting intervals specified (set)",
    )
    assert explain(text, "Error: something\n") is None


# --------------------------------------------------------------------------- the real nft, in a netns


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    need_root()
    need(shutil.which("ip") is not None, "needs ip (apt-get install iproute2)")
    need(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")
    name = f"pft-kr-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def nft_check(netns: str, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-c", "-f", "-"],
        input=document(text, TABLE),
        capture_output=True,
        text=True,
        timeout=30,
    )


SHAPES = [
    rule(hp("", 80), hp("127.0.0.1", 8080), protocol=Transport.TCP_UDP),
    rule(hp("", 80), hp("localhost", 8080), allow=(net("10.0.0.0/8"),)),
    rule(hp("127.0.0.1", 80), hp("127.0.0.1", 8080)),
    rule(hp("10.0.0.1", 80), hp("10.0.0.1", 8080)),
    rule(hp("", 5000), hp("10.60.0.2", 9000), protocol=Transport.UDP),
    rule(hp("2001:db8::1", 53), hp("2001:db8::5", 5353), protocol=Transport.TCP_UDP),
    rule(hp("", 7000, 7002), hp("10.60.0.2", 9000, 9002), protocol=Transport.TCP_UDP),
    rule(hp("", 7000, 7002), hp("::1", 9000, 9002)),
    rule(
        hp("", 80),
        hp("10.60.0.2", 80),
        allow=(net("10.0.0.0/8"), net("2001:db8::/32")),
        deny=(net("10.5.0.0/16"),),
        route=(
            RouteSpec((net("10.6.0.0/16"),), hp("10.60.0.3", 80)),
            RouteSpec((net("2001:db8:1::/48"),), hp("2001:db8::9", 8000)),
            RouteSpec((net("10.7.0.0/16"),), hp("127.0.0.1", 8080)),
        ),
    ),
]


def test_every_shape_is_accepted_by_nft_together(netns: str) -> None:
    labelled = [
        replace(spec, label=f"rule {index}", where=f"forward[{index}]") for index, spec in enumerate(SHAPES)
    ]
    result = nft_check(netns, plan(labelled, TABLE))
    assert result.returncode == 0, result.stderr
    modes = {spec.label: ("paused", "draining")[index % 2] for index, spec in enumerate(labelled)}
    result = nft_check(netns, plan(labelled, TABLE, modes))
    assert result.returncode == 0, result.stderr


def test_nft_check_names_the_rule(netns: str) -> None:
    broken = plan([rule(hp("", 80), REMOTE, label="web")], TABLE).replace(
        "counter masquerade", "counter bogus"
    )
    text = document(broken, TABLE)
    result = nft_check(netns, broken)
    assert result.returncode != 0
    assert explain(text, result.stderr) is not None
    assert explain(text, result.stderr)[0] == "web"  # type: ignore[index]
    assert (
        subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "list", "tables"], capture_output=True, timeout=30
        ).stdout
        == b""
    )


# -------------------------------------------------------------------- any allowed combination


V4_HOSTS = ["10.60.0.2", "192.0.2.7", "127.0.0.1", "localhost"]
V6_HOSTS = ["2001:db8::5", "::1", "localhost"]


@st.composite
def rules(draw: st.DrawFn) -> RuleSpec:
    version = draw(st.sampled_from([4, 6]))
    listen_host = draw(
        st.sampled_from(["", "10.0.0.1", "127.0.0.1"] if version == 4 else ["", "2001:db8::1", "::1"])
    )
    first = draw(st.one_of(st.integers(1, 65000), st.integers(80, 84)))  # often shared with another rule
    length = draw(st.integers(1, 4))
    hosts = V4_HOSTS if version == 4 else V6_HOSTS
    if listen_host in ("127.0.0.1", "::1"):
        hosts = [host for host in hosts if host in ("127.0.0.1", "::1", "localhost")]
    if listen_host:
        hosts = [*hosts, listen_host]

    def target() -> HostPorts:
        start = draw(st.integers(1, 65000))
        ranged = draw(st.booleans()) and length > 1
        return hp(draw(st.sampled_from(hosts)), start, start + length - 1 if ranged else start)

    def networks() -> tuple[Any, ...]:
        v4 = st.builds(
            lambda a, p: ipaddress.ip_network(f"10.{a}.0.0/{p}", strict=False),
            st.integers(0, 255),
            st.integers(8, 32),
        )
        v6 = st.builds(
            lambda a, p: ipaddress.ip_network(f"2001:db8:{a:x}::/{p}", strict=False),
            st.integers(0, 0xFFFF),
            st.integers(32, 128),
        )
        chosen = v4 if version == 4 else v6
        return tuple(draw(st.lists(chosen, max_size=3)))

    routes = tuple(
        RouteSpec(sources, target())
        for sources in (networks() for _ in range(draw(st.integers(0, 2))))
        if sources
    )
    return rule(
        hp(listen_host, first, first + length - 1),
        target(),
        label=draw(st.text(min_size=1, max_size=40)),
        protocol=draw(st.sampled_from(list(Transport))),
        allow=networks(),
        deny=networks(),
        route=routes,
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(rules(), min_size=1, max_size=3))
def test_any_allowed_combination_is_accepted_by_nft(netns: str, specs: list[RuleSpec]) -> None:
    specs = [replace(spec, where=f"forward[{index}]") for index, spec in enumerate(specs)]
    for spec in specs:
        assert unsuitable(spec) is None, unsuitable(spec)
    text = plan(specs, TABLE)
    result = nft_check(netns, text)
    assert result.returncode == 0, result.stderr + text
