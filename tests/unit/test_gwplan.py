"""The gateway plan's IPv6 firewall and pinholes, the flowtable and its note; `relay = "auto"`'s
choice of the kernel relay (#23)."""

from __future__ import annotations

import ipaddress
from typing import Any

from portfwd import config, planner
from portfwd.addr import HostPorts, PortRange, UnixPath
from portfwd.kernel import auto
from portfwd.kernel.gwplan import Interfaces, check, notes, plan
from portfwd.specs import GatewaySpec, RuleSpec

V4 = (ipaddress.IPv4Network("192.168.1.0/24"),)
V6 = (ipaddress.IPv6Network("2001:db8:1::/64"),)


def gateway(**extra: Any) -> GatewaySpec:
    spec = planner.plan(config.validate({"gateway": {"wan": "eth0", "lan": "eth1", **extra}})).gateway
    assert spec is not None
    return spec


def test_the_ipv6_firewall_lets_in_replies_icmp_and_pinholes_only() -> None:
    spec = gateway(
        enable_forwarding=True,
        forward=[
            {"port": 443, "to": "[2001:db8:1::10]:443", "protocol": "tcp+udp"},
            {"port": 22, "to": "[2001:db8:1::11]:22", "allow": ["2001:db8:99::/48"]},
        ],
    )
    assert spec.ipv6_firewall
    text = plan(spec, Interfaces(("203.0.113.1",), V4, V6))
    inbound = 'iifname "eth0" oifname "eth1"'
    forward = text.split("  chain forward {\n", 1)[1].splitlines()
    assert forward[1:8] == [
        '    ct status dnat counter accept comment "dnat"',
        f'    {inbound} meta nfproto ipv6 ct state established,related accept comment "ipv6 replies"',
        f"    {inbound} icmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded, parameter-problem,"
        ' echo-request } accept comment "ipv6 icmp"',
        f'    {inbound} ip6 daddr 2001:db8:1::10 tcp dport 443 counter accept comment "gateway.forward[0]"',
        f'    {inbound} ip6 daddr 2001:db8:1::10 udp dport 443 counter accept comment "gateway.forward[0]"',
        f"    {inbound} ip6 daddr 2001:db8:1::11 ip6 saddr @allow6_1 tcp dport 22 counter accept"
        ' comment "gateway.forward[1]"',
        f'    {inbound} meta nfproto ipv6 counter drop comment "ipv6 inbound"',
    ]
    assert "  set allow6_1 { type ipv6_addr; flags interval; elements = { 2001:db8:99::/48 } }" in text
    assert "dnat_tcp" not in text, "a pinhole is not translated"
    assert check(spec, Interfaces(("203.0.113.1",), V4, V6)) == []
    assert check(spec, Interfaces(("203.0.113.1",), V4, ())) == [
        f"gateway.forward[{index}].to: {host} is not on the LAN (eth1 IPv6: none); "
        "set allow_external_target = true if that is intended"
        for index, host in enumerate(("2001:db8:1::10", "2001:db8:1::11"))
    ]


def test_no_ipv6_firewall_unless_forwarding_is_portfwd_s_or_asked_for() -> None:
    assert not gateway().ipv6_firewall
    assert "ipv6" not in plan(gateway(), Interfaces((), V4))
    assert not gateway(enable_forwarding=True, ipv6_firewall=False).ipv6_firewall
    assert gateway(forward=[{"port": 443, "to": "[2001:db8:1::10]:443"}]).ipv6_firewall


def test_a_flowtable_where_the_kernel_has_them_and_one_line_where_it_does_not() -> None:
    spec = gateway(flowtable=True, forward=[{"port": 80, "to": "192.168.1.10:80"}])
    with_them = plan(spec, Interfaces(("203.0.113.1",), V4, flowtables=True))
    assert '  flowtable fastpath { hook ingress priority filter; devices = { "eth0", "eth1" }; }' in with_them
    assert (
        "meta l4proto { tcp, udp } ct state established meta mark & 0xfff00 != 0x70f00"
        ' flow add @fastpath comment "flowtable"'
    ) in with_them, "trigger flows stay where their rules see every packet"
    assert notes(spec, Interfaces(("203.0.113.1",), V4, flowtables=True)) == []
    without = Interfaces(("203.0.113.1",), V4, flowtables=False)
    assert "flowtable" not in plan(spec, without)
    assert notes(spec, without) == [
        "gateway.flowtable: this kernel has no nftables flowtables (CONFIG_NF_FLOW_TABLE); "
        "established flows take the normal forward path"
    ]


def rule(listen: str = "", connect: str = "127.0.0.1", **extra: Any) -> RuleSpec:
    return RuleSpec(
        label="r",
        name=None,
        listen=HostPorts(listen, PortRange(80, 80)),
        connect=HostPorts(connect, PortRange(8080, 8080)),
        **extra,
    )


BOX = auto.Box(capable=True, filtering=None, forwarding=frozenset({4}))


def test_auto_takes_the_kernel_only_when_nothing_is_lost() -> None:
    assert auto.why_not(rule("127.0.0.1"), BOX, None) is None, "loopback to loopback: redirected exactly"
    assert auto.why_not(rule(connect="10.0.0.5"), BOX, None) is None, "forwarding is on"
    assert auto.why_not(rule(), BOX, None) == (
        "the kernel reaches a loopback target on the address a client came in to, so a server bound "
        "to the loopback address alone would not see clients from other hosts"
    )
    assert auto.why_not(rule("127.0.0.1"), auto.Box(False, None, frozenset()), None) == (
        "the kernel relay needs root or CAP_NET_ADMIN, and nft"
    )
    assert auto.why_not(rule("127.0.0.1"), auto.Box(True, None, frozenset(), allowed=False), None) == (
        'PORTFWD_AUTO_KERNEL=0 keeps relay = "auto" in userspace'
    )
    assert auto.why_not(rule("127.0.0.1"), BOX, "nobody") == (
        "user = drops the capability the kernel relay needs to remove its table at exit"
    )
    assert auto.why_not(rule("127.0.0.1", proxy_protocol=2), BOX, None) == "proxy_protocol needs userspace"
    unix = RuleSpec(
        label="r", name=None, listen=HostPorts("", PortRange(80, 80)), connect=UnixPath("/run/app.sock")
    )
    assert auto.why_not(unix, BOX, None) == "a Unix socket target needs userspace"
    assert auto.why_not(
        rule("127.0.0.1"), auto.Box(True, "table inet filter chain input", frozenset({4})), None
    ) == ("table inet filter chain input filters traffic, and the kernel relay would change what it sees")
    assert auto.why_not(rule(connect="10.0.0.5"), auto.Box(True, None, frozenset()), None) == (
        "a remote target is routed by the kernel, and net.ipv4.ip_forward is off"
    )


def chain(name: str, hook: str, policy: str = "accept", table: str = "filter") -> dict[str, Any]:
    return {
        "chain": {
            "family": "inet",
            "table": table,
            "name": name,
            "hook": hook,
            "type": "filter",
            "policy": policy,
        }
    }


def test_a_filter_is_a_base_chain_on_input_or_forward_that_can_drop() -> None:
    assert auto.filtering({"nftables": [chain("input", "input")]}) is None
    assert auto.filtering({"nftables": [chain("input", "input", "drop")]}) == "table inet filter chain input"
    assert auto.filtering({"nftables": [chain("out", "output", "drop")]}) is None, "not a hook that sees them"
    dropping = {"rule": {"family": "inet", "table": "filter", "chain": "input", "expr": [{"drop": None}]}}
    assert (
        auto.filtering({"nftables": [chain("input", "input"), dropping]}) == "table inet filter chain input"
    )
    assert auto.filtering({"nftables": [chain("forward", "forward", "drop", table="portfwd")]}) is None
    assert auto.filtering({}) is None
