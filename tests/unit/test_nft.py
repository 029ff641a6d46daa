"""The gateway plan as nft text: maps for O(1) lookups, allow lists, hairpin, masquerade, checks."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from portfwd import config, planner
from portfwd.kernel.gwplan import Interfaces, check, plan
from portfwd.kernel.nft import counters, document, explain, forwarding_problems, trigger_holders

GATEWAY = planner.plan(
    config.validate(
        {
            "gateway": {
                "wan": "eth0",
                "lan": "eth1",
                "forward": [
                    {"port": 8080, "to": "192.168.1.10:80", "protocol": "tcp+udp"},
                    {"port": "8000-8002", "to": "192.168.1.11:9000-9002"},
                    {"port": 2222, "to": "192.168.1.12:22", "allow": ["198.51.100.0/24", "203.0.113.7"]},
                ],
            }
        }
    )
).gateway
LAN = Interfaces(("203.0.113.1",), (ipaddress.IPv4Network("192.168.1.0/24"),))


def test_plan_text() -> None:
    assert GATEWAY is not None
    assert plan(GATEWAY, LAN) == (
        "table inet portfwd {\n"
        "  set wan_addresses { type ipv4_addr; elements = { 203.0.113.1 }; }\n"
        '  map dnat_2_tcp { type inet_service : ipv4_addr . inet_service; elements = { 2222 comment "gateway.forward[2]" : 192.168.1.12 . 22 } }\n'
        "  set allow_2 { type ipv4_addr; flags interval; elements = { 198.51.100.0/24, 203.0.113.7/32 } }\n"
        "  map dnat_tcp { type inet_service : ipv4_addr . inet_service; elements = { "
        '8080 comment "gateway.forward[0]" : 192.168.1.10 . 80, 8000 comment "gateway.forward[1]" : 192.168.1.11 . 9000, '
        '8001 comment "gateway.forward[1]" : 192.168.1.11 . 9001, 8002 comment "gateway.forward[1]" : 192.168.1.11 . 9002 } }\n'
        '  map dnat_udp { type inet_service : ipv4_addr . inet_service; elements = { 8080 comment "gateway.forward[0]" : 192.168.1.10 . 80 } }\n'
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        '    iifname "eth0" fib daddr . iif type local ip saddr @allow_2 counter dnat ip to tcp dport map @dnat_2_tcp comment "gateway.forward[2]"\n'
        '    iifname "eth0" fib daddr . iif type local counter dnat ip to tcp dport map @dnat_tcp comment "gateway.forward tcp"\n'
        '    iifname "eth0" fib daddr . iif type local counter dnat ip to udp dport map @dnat_udp comment "gateway.forward udp"\n'
        '    iifname "eth1" fib daddr type local fib daddr . iif type != local counter dnat ip to tcp dport map @dnat_tcp comment "hairpin"\n'
        '    iifname "eth1" fib daddr type local fib daddr . iif type != local counter dnat ip to udp dport map @dnat_udp comment "hairpin"\n'
        "  }\n"
        "  chain output {\n"
        "    type nat hook output priority -100; policy accept;\n"
        '    ip daddr @wan_addresses counter dnat ip to tcp dport map @dnat_tcp comment "router tcp"\n'
        '    ip daddr @wan_addresses counter dnat ip to udp dport map @dnat_udp comment "router udp"\n'
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        '    iifname "eth1" oifname "eth0" meta nfproto ipv4 counter masquerade comment "masquerade"\n'
        '    iifname "eth1" oifname "eth1" ct status dnat meta nfproto ipv4 counter masquerade comment "hairpin"\n'
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        '    ct status dnat counter accept comment "dnat"\n'
        "  }\n"
        "}\n"
    )


def test_a_thousand_ports_are_one_rule_per_protocol() -> None:
    many = planner.plan(
        config.validate(
            {
                "gateway": {
                    "wan": "eth0",
                    "lan": "eth1",
                    "forward": [{"port": "10000-10999", "to": "192.168.1.10:20000-20999"}],
                }
            }
        )
    ).gateway
    assert many is not None
    text = plan(many, LAN)
    assert text.count("dnat ip to tcp dport map @dnat_tcp") == 3  # WAN side, hairpin, the router's own
    assert '10999 comment "gateway.forward[0]" : 192.168.1.10 . 20999' in text


def test_replace_is_one_transaction_that_never_fails_on_a_missing_table() -> None:
    assert document("X\n") == "table inet portfwd {}\ndelete table inet portfwd\nX\n"


def test_targets_outside_the_lan_are_refused() -> None:
    assert GATEWAY is not None
    elsewhere = Interfaces(("203.0.113.1",), (ipaddress.IPv4Network("10.0.0.0/24"),))
    assert check(GATEWAY, elsewhere)[0] == (
        "gateway.forward[0].to: 192.168.1.10 is not on the LAN (eth1: 10.0.0.0/24); "
        "set allow_external_target = true if that is intended"
    )
    assert (
        check(GATEWAY, Interfaces((), ()))[0]
        == "gateway.lan: interface eth1 has no IPv4 address; give it one first"
    )
    assert check(GATEWAY, LAN) == []


def test_trigger_plan() -> None:
    triggered = planner.plan(
        config.validate(
            {
                "gateway": {
                    "wan": "eth0",
                    "lan": "eth1",
                    "trigger": [
                        {"trigger": "tcp/6667", "open": ["tcp/7000-7010", "udp/7100"], "idle_timeout": "10m"}
                    ],
                }
            }
        )
    ).gateway
    assert triggered is not None
    text = plan(triggered, LAN)
    assert "  map trig_host_0 { type mark : ipv4_addr; flags dynamic,timeout; timeout 600s; }\n" in text
    assert "elements = { tcp . 7000-7010, udp . 7100 }" in text
    assert (
        'iifname "eth1" oifname "eth0" meta l4proto . th dport @trig_out_0 meta mark set 0x70f00'
        ' update @trig_host_0 { meta mark : ip saddr } counter comment "gateway.trigger[0]"'
    ) in text
    assert (
        'iifname "eth0" fib daddr . iif type local meta l4proto . th dport @trig_open_0 meta mark set 0x70f00'
        ' counter dnat ip to meta mark map @trig_host_0 comment "gateway.trigger[0]"'
    ) in text
    assert (  # the opened ports through the public address, from the LAN
        'iifname "eth1" fib daddr type local fib daddr . iif type != local meta l4proto . th dport'
        " @trig_open_0 meta mark set 0x70f00 counter dnat ip to meta mark map @trig_host_0"
        ' comment "hairpin gateway.trigger[0]"'
    ) in text


def test_counters_and_trigger_holders_from_a_listing() -> None:
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {
                "map": {
                    "name": "trig_host_0",
                    "elem": [[{"elem": {"val": 462592, "expires": 30}}, "192.168.77.10"]],
                }
            },
            {
                "rule": {
                    "chain": "prerouting",
                    "comment": "gateway.forward tcp",
                    "expr": [{"counter": {"packets": 3, "bytes": 180}}],
                }
            },
            {
                "rule": {
                    "chain": "forward",
                    "comment": "gateway.trigger[0]",
                    "expr": [{"counter": {"packets": 1, "bytes": 60}}],
                }
            },
            {
                "rule": {
                    "chain": "forward",
                    "comment": "gateway.trigger[0]",
                    "expr": [{"counter": {"packets": 2, "bytes": 120}}],
                }
            },
        ]
    }
    assert counters(listing) == [
        {"chain": "prerouting", "rule": "gateway.forward tcp", "packets": 3, "bytes": 180},
        {"chain": "forward", "rule": "gateway.trigger[0]", "packets": 3, "bytes": 180},
    ]
    assert trigger_holders(listing) == {0: ("192.168.77.10", 30)}


def test_conntrack_event_lines() -> None:
    from portfwd.kernel.triggers import parse_event

    line = (
        "    [NEW] tcp      6 120 SYN_SENT src=192.168.77.10 dst=203.0.113.20 sport=40000 dport=6667 [UNREPLIED] "
        "src=203.0.113.20 dst=203.0.113.1 sport=6667 dport=40000"
    )
    assert parse_event(line) == ("tcp", "192.168.77.10", 6667)
    assert parse_event("[DESTROY] tcp 6 src=1.2.3.4 dport=1") is None
    assert parse_event("[NEW] tcp 6 garbage") is None


def test_nft_errors_name_the_rule() -> None:
    """nft's own error lines (as nft 1.0.6 prints them) traced back to the config rule."""
    assert GATEWAY is not None
    text = document(plan(GATEWAY, LAN))
    lines = text.splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.startswith("  map dnat_tcp"))
    line = lines[number - 1]
    column = line.index("192.168.1.11 . 9001") + len("192.168.1.11 . ") + 1
    stderr = f"/dev/stdin:{number}:{column}-{column + 3}: Error: Service out of range\n{line}\n"
    assert explain(text, stderr) == ("gateway.forward[1]", "Service out of range (9001)")
    number = next(i for i, line in enumerate(lines, 1) if line.startswith("  set allow_2"))
    column = lines[number - 1].index("203.0.113.7/32") + 1
    stderr = f"/dev/stdin:{number}:{column}-{column + 13}: Error: conflicting intervals specified\n"
    assert explain(text, stderr) == (
        "gateway.forward[2].allow",
        "conflicting intervals specified (203.0.113.7/32)",
    )
    assert explain(text, "Error: something else entirely\n") is None


def test_forwarding_switches_are_checked_and_set(tmp_path: Path) -> None:
    v4, v6 = tmp_path / "ip_forward", tmp_path / "forwarding"
    v4.write_text("0\n")
    v6.write_text("0\n")
    switches = (("IPv4", str(v4), "net.ipv4.ip_forward"), ("IPv6", str(v6), "net.ipv6.conf.all.forwarding"))
    disabled = tmp_path / "disable_ipv6"
    disabled.write_text("1\n")
    assert forwarding_problems(False, switches, str(disabled)) == [
        "IPv4 forwarding is off: run sysctl -w net.ipv4.ip_forward=1, or set enable_forwarding = true",
    ], "no IPv6 line where IPv6 is switched off"
    disabled.write_text("0\n")
    assert forwarding_problems(False, switches, str(disabled)) == [
        "IPv4 forwarding is off: run sysctl -w net.ipv4.ip_forward=1, or set enable_forwarding = true",
        "IPv6 forwarding is off: run sysctl -w net.ipv6.conf.all.forwarding=1, or set enable_forwarding = true",
    ]
    assert forwarding_problems(True, switches, str(disabled)) == []
    assert (v4.read_text(), v6.read_text()) == ("1\n", "1\n")
    v6.unlink()
    assert forwarding_problems(False, switches, str(disabled)) == [], "a kernel without IPv6 is not a problem"
