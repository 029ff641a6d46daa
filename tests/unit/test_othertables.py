"""portfwd.kernel.othertables and openings: which other tables' forward chains drop the gateway's packets, and the fix.

Every listing here is real: loaded with `nft -f` in a throwaway network namespace (nft 1.0.6) and
captured with `nft -j list ruleset`; the ruleset loaded is in the comment above it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portfwd import planner
from portfwd.kernel import gwfirewall
from portfwd.kernel.openings import closing, fix, openable, opened, opening, render
from portfwd.kernel.othertables import Blocked, Probe, RuleAt, blocked
from portfwd.specs import GatewaySpec

LISTINGS = {
    # table inet filter {
    #   chain forward {
    #     type filter hook forward priority filter; policy drop;
    #     ct state established,related accept
    #   }
    # }
    "established": """{"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "filter", "handle": 1}},
    {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 2, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}}
]}""",
    # table inet filter {
    #   chain forward {
    #     type filter hook forward priority filter; policy drop;
    #     ct state established,related accept
    #     ct status dnat accept
    #   }
    # }
    "dnat": """{"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "filter", "handle": 1}},
    {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 2, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 3, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}, {"accept": null}]}}
]}""",
    # table inet filter {
    #   chain forward {
    #     type filter hook forward priority filter; policy drop;
    #     ct state vmap { established : accept, related : accept, invalid : drop }
    #     iifname "wan" oifname "lan" accept
    #   }
    # }
    "ifaces": """{"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "filter", "handle": 1}},
    {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 3, "expr": [{"vmap": {"key": {"ct": {"key": "state"}}, "data": {"set": [["invalid", {"drop": null}], ["established", {"accept": null}], ["related", {"accept": null}]]}}}]}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 4, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "wan"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lan"}}, {"accept": null}]}}
]}""",
    # table ip filter {
    #   chain forward {
    #     type filter hook forward priority 0; policy drop;
    #     ct state established,related accept
    #     iifname "lan*" oifname "wan" accept
    #   }
    # }
    "ipfilter": """{"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "ip", "name": "filter", "handle": 1}},
    {"chain": {"family": "ip", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    {"rule": {"family": "ip", "table": "filter", "chain": "forward", "handle": 2, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "forward", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lan*"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "wan"}}, {"accept": null}]}}
]}""",
    # table inet filter {
    #   chain wan_in {
    #     ip saddr 198.51.100.0/24 return
    #     tcp dport { 22, 8000-8099 } drop
    #   }
    #   chain forward {
    #     type filter hook forward priority filter; policy accept;
    #     iifname "wan" jump wan_in
    #   }
    # }
    "jump": """{"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "filter", "handle": 1}},
    {"chain": {"family": "inet", "table": "filter", "name": "wan_in", "handle": 1}},
    {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
    {"rule": {"family": "inet", "table": "filter", "chain": "wan_in", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "198.51.100.0", "len": 24}}}}, {"return": null}]}},
    {"rule": {"family": "inet", "table": "filter", "chain": "wan_in", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": [22, {"range": [8000, 8099]}]}}}, {"drop": null}]}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 6, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "wan"}}, {"jump": {"target": "wan_in"}}]}}
]}""",
    # table inet filter {
    #   chain forward {
    #     type filter hook forward priority filter; policy drop;
    #     ct state established,related accept
    #     limit rate 10/second accept
    #   }
    # }
    "limit": """{"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "filter", "handle": 1}},
    {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 2, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 3, "expr": [{"limit": {"rate": 10, "burst": 5, "per": "second"}}, {"accept": null}]}}
]}""",
    # table inet filter {
    #   set servers {
    #     type ipv4_addr; flags interval
    #     elements = { 192.168.77.10, 192.168.77.32/28 }
    #   }
    #   chain forward {
    #     type filter hook forward priority filter; policy drop;
    #     ip daddr @servers tcp dport 80 accept
    #   }
    # }
    "namedset": """{"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "filter", "handle": 1}},
    {"set": {"family": "inet", "name": "servers", "table": "filter", "type": "ipv4_addr", "handle": 2, "flags": ["interval"], "elem": ["192.168.77.10", {"prefix": {"addr": "192.168.77.32", "len": 28}}]}},
    {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@servers"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}, {"accept": null}]}}
]}""",
    # table inet filter {
    #   chain forward {
    #     type filter hook forward priority filter; policy accept;
    #     ct state established,related accept
    #     iifname "lan" accept
    #     counter drop
    #   }
    # }
    "explicitdrop": """{"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "filter", "handle": 1}},
    {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 2, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lan"}}, {"accept": null}]}},
    {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 4, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}
]}""",
    # table inet portfwd {
    #   chain forward {
    #     type filter hook forward priority filter; policy drop;
    #   }
    # }
    # table inet filter {
    #   chain forward {
    #     type filter hook forward priority filter; policy accept;
    #   }
    # }
    "own": """{"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "portfwd", "handle": 1}},
    {"chain": {"family": "inet", "table": "portfwd", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    {"table": {"family": "inet", "name": "filter", "handle": 2}},
    {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}
]}""",
    # table ip6 filter6 {
    #   chain forward {
    #     type filter hook forward priority filter; policy drop;
    #     ct state established,related accept
    #     ip6 daddr 2001:db8:1::/64 tcp dport != 22 accept
    #   }
    # }
    "pinhole": """{"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "ip6", "name": "filter6", "handle": 1}},
    {"chain": {"family": "ip6", "table": "filter6", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    {"rule": {"family": "ip6", "table": "filter6", "chain": "forward", "handle": 2, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}},
    {"rule": {"family": "ip6", "table": "filter6", "chain": "forward", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": {"prefix": {"addr": "2001:db8:1::", "len": 64}}}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}, {"accept": null}]}}
]}""",
    # iptables-nft 1.8.9 (docker's FORWARD): iptables -P FORWARD DROP; -N DOCKER-USER ... (see the listing)
    "iptables": """{"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "ip", "name": "filter", "handle": 1}},
    {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER", "handle": 2}},
    {"chain": {"family": "ip", "table": "filter", "name": "DOCKER", "handle": 3}},
    {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-ISOLATION-STAGE-1", "handle": 4}},
    {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-ISOLATION-STAGE-2", "handle": 5}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 6, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "DOCKER-USER"}}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 7, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "DOCKER-ISOLATION-STAGE-1"}}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 8, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"xt": {"type": "match", "name": "conntrack"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 9, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "DOCKER"}}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 10, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}}, {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 11, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 17, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "192.168.77.10"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8080}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 18, "expr": [{"xt": {"type": "match", "name": "conntrack"}}, {"limit": {"rate": 3, "burst": 5, "per": "minute"}}, {"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "LOG"}}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-USER", "handle": 16, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"return": null}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-ISOLATION-STAGE-1", "handle": 12, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "docker0"}}, {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "DOCKER-ISOLATION-STAGE-2"}}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-ISOLATION-STAGE-1", "handle": 13, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"return": null}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-ISOLATION-STAGE-2", "handle": 14, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "docker0"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER-ISOLATION-STAGE-2", "handle": 15, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"return": null}]}}
]}""",
    # table inet filter {
    #   set blocklist { type ipv4_addr; elements = { 203.0.113.21 } }
    #   chain forward {
    #     type filter hook forward priority filter; policy accept;
    #     ip saddr @blocklist drop
    #   }
    # }
    "blocklist": """{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "filter", "handle": 1}}, {"set": {"family": "inet", "name": "blocklist", "table": "filter", "type": "ipv4_addr", "handle": 2, "elem": ["203.0.113.21"]}}, {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@blocklist"}}, {"drop": null}]}}]}""",
    # table inet filter {
    #   set blocklist { type ipv4_addr; elements = { 203.0.113.21 } }
    #   chain forward {
    #     type filter hook forward priority filter; policy drop;
    #     ct state established,related accept
    #     ip saddr @blocklist drop
    #   }
    # }
    "blocklistdrop": """{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "filter", "handle": 2}}, {"set": {"family": "inet", "name": "blocklist", "table": "filter", "type": "ipv4_addr", "handle": 2, "elem": ["203.0.113.21"]}}, {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 3, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@blocklist"}}, {"drop": null}]}}]}""",
    # table inet filter {
    #   chain forward {
    #     type filter hook forward priority filter; policy drop;
    #     ct direction reply ip saddr 192.168.77.10 tcp sport 8080 accept
    #     iifname "wan" return
    #     ct state established accept
    #   }
    # }
    "return": """{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "filter", "handle": 3}}, {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 2, "expr": [{"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "192.168.77.10"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "sport"}}, "right": 8080}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "wan"}}, {"return": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 4, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "established"}}, {"accept": null}]}}]}""",
}
# handle: expr, from `nft -j list ruleset` (nft 1.0.6) of the rule in the comment
KITCHEN_SINK = {
    7: [
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
        {"accept": None},
    ],  # ct state established,related accept
    8: [
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}},
        {"drop": None},
    ],  # ct state invalid drop
    9: [
        {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
        {"accept": None},
    ],  # ct status dnat accept
    10: [
        {"match": {"op": "!=", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
        {"counter": {"packets": 0, "bytes": 0}},
    ],  # ct status != dnat counter
    11: [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "wan"}},
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lan"}},
        {"accept": None},
    ],  # iifname "wan" oifname "lan" accept
    12: [
        {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}},
        {"accept": None},
    ],  # iif "lo" accept
    14: [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 8080}},
        {"accept": None},
    ],  # meta l4proto { tcp, udp } th dport 8080 accept
    15: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                "right": {"range": [80, 90]},
            }
        },
        {"accept": None},
    ],  # tcp dport 80-90 accept
    17: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "udp", "field": "dport"}},
                "right": {"set": [53, 123]},
            }
        },
        {"accept": None},
    ],  # udp dport { 53, 123 } accept
    18: [
        {"match": {"op": "!=", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}},
        {"accept": None},
    ],  # tcp dport != 22 accept
    19: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": "192.168.77.10",
            }
        },
        {"accept": None},
    ],  # ip daddr 192.168.77.10 accept
    20: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": {"prefix": {"addr": "192.168.77.0", "len": 24}},
            }
        },
        {"accept": None},
    ],  # ip daddr 192.168.77.0/24 accept
    21: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": {"range": ["10.0.0.1", "10.0.0.9"]},
            }
        },
        {"accept": None},
    ],  # ip daddr 10.0.0.1-10.0.0.9 accept
    23: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": {"set": ["1.2.3.4", {"prefix": {"addr": "5.6.7.0", "len": 24}}]},
            }
        },
        {"accept": None},
    ],  # ip daddr { 1.2.3.4, 5.6.7.0/24 } accept
    24: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": "@lanhosts",
            }
        },
        {"accept": None},
    ],  # ip daddr @lanhosts accept
    25: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                "right": "@ports",
            }
        },
        {"accept": None},
    ],  # tcp dport @ports accept
    26: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
                "right": "2001:db8::1",
            }
        },
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 443}},
        {"accept": None},
    ],  # ip6 daddr 2001:db8::1 tcp dport 443 accept
    27: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
                "right": {"prefix": {"addr": "2001:db8::", "len": 64}},
            }
        },
        {"accept": None},
    ],  # ip6 daddr 2001:db8::/64 accept
    28: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": "1.1.1.1",
            }
        },
        {"drop": None},
    ],  # ip saddr 1.1.1.1 drop
    29: [
        {"limit": {"rate": 10, "burst": 5, "per": "second"}},
        {"accept": None},
    ],  # limit rate 10/second accept
    30: [
        {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 1}},
        {"accept": None},
    ],  # meta mark 0x1 accept
    31: [
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
        {"accept": None},
    ],  # meta nfproto ipv4 accept
    32: [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "protocol"}}, "right": "tcp"}},
        {"accept": None},
    ],  # ip protocol tcp accept
    33: [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"accept": None},
    ],  # meta l4proto tcp accept
    35: [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": {"set": ["a", "b"]}}},
        {"accept": None},
    ],  # iifname { "a", "b" } accept
    36: [
        {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "wan"}},
        {"drop": None},
    ],  # iifname != "wan" drop
    37: [{"jump": {"target": "fw_lan"}}],  # jump fw_lan
    38: [{"goto": {"target": "fw_lan"}}],  # goto fw_lan
    40: [
        {
            "match": {
                "op": "==",
                "left": {
                    "concat": [
                        {"payload": {"protocol": "ip", "field": "daddr"}},
                        {"payload": {"protocol": "tcp", "field": "dport"}},
                    ]
                },
                "right": {"set": [{"concat": ["1.2.3.4", 80]}]},
            }
        },
        {"accept": None},
    ],  # ip daddr . tcp dport { 1.2.3.4 . 80 } accept
    42: [
        {
            "vmap": {
                "key": {"payload": {"protocol": "tcp", "field": "dport"}},
                "data": {"set": [[22, {"accept": None}], [23, {"drop": None}]]},
            }
        }
    ],  # tcp dport vmap { 22 : accept, 23 : drop }
    43: [
        {"log": {"prefix": "x"}},
        {"reject": {"type": "icmpx", "expr": "admin-prohibited"}},
    ],  # log prefix "x" reject with icmpx type admin-prohibited
    44: [{"reject": {"type": "icmpx", "expr": "port-unreachable"}}],  # reject
    45: [
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "new"]}},
        {"continue": None},
    ],  # ct state new,established continue
    46: [
        {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": ["snat", "dnat"]}},
        {"accept": None},
    ],  # ct status dnat,snat accept
    47: [
        {
            "match": {
                "op": "!=",
                "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": "1.2.3.4",
            }
        },
        {"accept": None},
    ],  # ip daddr != { 1.2.3.4 } accept
    49: [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                "right": {"set": [{"range": [80, 90]}, 443]},
            }
        },
        {"accept": None},
    ],  # tcp dport { 80-90, 443 } accept
    50: [{"counter": {"packets": 0, "bytes": 0}}, {"drop": None}],  # counter drop
}
KITCHEN_SETS = [
    {
        "set": {
            "family": "inet",
            "name": "lanhosts",
            "table": "filter",
            "type": "ipv4_addr",
            "handle": 3,
            "flags": ["interval"],
            "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, "192.168.77.10"],
        }
    },
    {
        "set": {
            "family": "inet",
            "name": "ports",
            "table": "filter",
            "type": "inet_service",
            "handle": 4,
            "flags": ["interval"],
            "elem": [80, {"range": [8000, 8010]}],
        }
    },
]


def listing(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(LISTINGS[name])
    return loaded


FORWARD = Probe("gateway.forward[0]", "ip", "wan", "lan", "tcp", "192.168.77.10", (8080, 8080), True)
RANGE = Probe("gateway.forward[1]", "ip", "wan", "lan", "udp", "192.168.77.10", (9000, 9001), True)
MASQUERADE = Probe("masquerade", "ip", "lan", "wan", None, None, None, False)
HAIRPIN = Probe("hairpin", "ip", "lan", "lan", "tcp", "192.168.77.10", (80, 80), True)
PINHOLE = Probe(
    "gateway.forward[2] (IPv6 pinhole)", "ip6", "wan", "lan", "tcp", "2001:db8:1::5", (443, 443), False
)
ALL = (FORWARD, RANGE, MASQUERADE, HAIRPIN, PINHOLE)
# the replies: LAN host -> WAN client (DNAT), WAN -> LAN (masquerade), LAN -> WAN (pinhole)
FORWARD_REPLY = Probe(
    "gateway.forward[0] (replies)", "ip", "lan", "wan", "tcp", None, None, True, "established",
    "192.168.77.10", (8080, 8080),
)  # fmt: skip
MASQUERADE_REPLY = Probe(
    "masquerade (replies)", "ip", "wan", "lan", None, None, None, False, "established", snat=True
)
PINHOLE_REPLY = Probe(
    "gateway.forward[2] (replies)", "ip6", "lan", "wan", "tcp", None, None, False, "established",
    "2001:db8:1::5", (443, 443),
)  # fmt: skip
REPLIES = (FORWARD_REPLY, MASQUERADE_REPLY, PINHOLE_REPLY)


def where(found: list[Blocked]) -> list[tuple[str, str, str, str, bool, str]]:
    return [(b.probe.what, b.family, b.table, b.chain, b.certain, b.because) for b in found]


# --------------------------------------------------------------------------- the cases of the brief


def test_policy_drop_with_only_established_blocks_everything_for_sure() -> None:
    found = blocked(listing("established"), ALL)
    assert where(found) == [
        ("gateway.forward[0]", "inet", "filter", "forward", True, "policy drop"),
        ("gateway.forward[1]", "inet", "filter", "forward", True, "policy drop"),
        ("masquerade", "inet", "filter", "forward", True, "policy drop"),
        ("hairpin", "inet", "filter", "forward", True, "policy drop"),
        ("gateway.forward[2] (IPv6 pinhole)", "inet", "filter", "forward", True, "policy drop"),
    ]


def test_ct_status_dnat_accept_lets_dnat_through_but_not_masquerade() -> None:
    found = blocked(listing("dnat"), ALL)
    assert [b.probe.what for b in found] == ["masquerade", "gateway.forward[2] (IPv6 pinhole)"]


def test_interface_pair_accept_and_ct_state_vmap() -> None:
    found = blocked(listing("ifaces"), ALL)
    # wan -> lan is accepted for every forward (DNAT or pinhole); lan -> wan and lan -> lan are not
    assert where(found) == [
        ("masquerade", "inet", "filter", "forward", True, "policy drop"),
        ("hairpin", "inet", "filter", "forward", True, "policy drop"),
    ]


def test_ip_table_applies_to_ipv4_probes_only_and_wildcards_match() -> None:
    found = blocked(listing("ipfilter"), ALL)
    assert where(found) == [
        ("gateway.forward[0]", "ip", "filter", "forward", True, "policy drop"),
        ("gateway.forward[1]", "ip", "filter", "forward", True, "policy drop"),
        ("hairpin", "ip", "filter", "forward", True, "policy drop"),  # lan* -> lan is not lan* -> wan
    ]  # masquerade is accepted by `iifname "lan*" oifname "wan"`; the IPv6 pinhole never sees an ip table


def test_jump_to_a_regular_chain_that_drops() -> None:
    found = blocked(listing("jump"), [FORWARD, RANGE, MASQUERADE])
    # 8080 is in { 22, 8000-8099 }, but `ip saddr 198.51.100.0/24 return` may spare some clients
    assert where(found) == [
        (
            "gateway.forward[0]",
            "inet",
            "filter",
            "forward",
            False,
            "rule 5 in chain wan_in: tcp dport { 22, 8000-8099 } drop",
        ),
    ]
    without_return = listing("jump")
    without_return["nftables"] = [
        i for i in without_return["nftables"] if i.get("rule", {}).get("handle") != 3
    ]
    found = blocked(without_return, [FORWARD, dataclass_replace(FORWARD, dport=(8090, 8100))])
    assert [(b.certain, b.because) for b in found] == [
        (True, "rule 5 in chain wan_in: tcp dport { 22, 8000-8099 } drop"),
        (False, "rule 5 in chain wan_in: tcp dport { 22, 8000-8099 } drop"),  # 8090-8100 straddles the edge
    ]


def test_limit_before_the_policy_drop_makes_it_uncertain() -> None:
    found = blocked(listing("limit"), [FORWARD])
    assert where(found) == [("gateway.forward[0]", "inet", "filter", "forward", False, "policy drop")]


def test_named_set_of_destinations() -> None:
    inside = dataclass_replace(FORWARD, daddr="192.168.77.40", dport=(80, 80))
    found = blocked(
        listing("namedset"), [dataclass_replace(FORWARD, dport=(80, 80)), inside, FORWARD, MASQUERADE]
    )
    assert [(b.probe.daddr, b.probe.dport, b.certain) for b in found] == [
        ("192.168.77.10", (8080, 8080), True),  # the right host, the wrong port
        (None, None, False),  # masquerade: any destination, any port
    ]


def test_policy_accept_with_an_explicit_drop_at_the_end() -> None:
    found = blocked(listing("explicitdrop"), [FORWARD, MASQUERADE])
    assert where(found) == [("gateway.forward[0]", "inet", "filter", "forward", True, "rule 4: drop")]


def test_our_own_table_is_ignored() -> None:
    assert blocked(listing("own"), ALL) == []
    assert [b.table for b in blocked(listing("own"), [FORWARD], own=("inet", "other"))] == ["portfwd"]


def test_ip6_table_pinhole_with_a_negated_port() -> None:
    assert blocked(listing("pinhole"), [PINHOLE]) == []
    found = blocked(listing("pinhole"), [dataclass_replace(PINHOLE, dport=(22, 22)), FORWARD])
    assert where(found) == [
        ("gateway.forward[2] (IPv6 pinhole)", "ip6", "filter6", "forward", True, "policy drop")
    ]


def test_iptables_nft_docker_forward_chain() -> None:
    found = blocked(listing("iptables"), [FORWARD, RANGE, MASQUERADE, HAIRPIN])
    # rule 17 (-d 192.168.77.10 -p tcp --dport 8080 -j ACCEPT) lets gateway.forward[0] through; the
    # xt conntrack match and the limit are Unknown, and so is rule 17 for masquerade (any daddr)
    assert where(found) == [
        ("gateway.forward[1]", "ip", "filter", "FORWARD", True, "policy drop"),
        ("masquerade", "ip", "filter", "FORWARD", False, "policy drop"),
        ("hairpin", "ip", "filter", "FORWARD", True, "policy drop"),
    ]
    assert all(b.iptables for b in found)
    assert [fix(b) for b in found] == [
        "iptables -A FORWARD -m conntrack --ctstate DNAT -j ACCEPT",
        "iptables -A FORWARD -i lan -o wan -j ACCEPT",
        "iptables -A FORWARD -m conntrack --ctstate DNAT -j ACCEPT",
    ]
    # what portfwd adds itself must stay readable by iptables-nft: no `ct status` there; and only
    # the certain drops are opened (masquerade may be accepted by the xt conntrack match already)
    assert opening(found) == (
        'add rule ip filter FORWARD iifname "wan" oifname "lan" ip daddr 192.168.77.10 udp dport 9000-9001 accept comment "portfwd gateway: gateway.forward[1]"\n'
        'add rule ip filter FORWARD iifname "lan" oifname "lan" ip daddr 192.168.77.10 tcp dport 80 accept comment "portfwd gateway: hairpin"\n'
    )


def test_not_inet_ip_or_ip6_forward_hooks_are_ignored() -> None:
    bridged = {"nftables": [
        {"table": {"family": "bridge", "name": "br", "handle": 4}},
        {"chain": {"family": "bridge", "table": "br", "name": "fw", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
        {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
    ]}  # fmt: skip
    assert blocked(bridged, ALL) == []


# --------------------------------------------------------------------------- one rule at a time


def dataclass_replace(probe: Probe, **changes: Any) -> Probe:
    fields = {name: getattr(probe, name) for name in Probe.__dataclass_fields__}
    return Probe(**{**fields, **changes})


def one_rule(expr: list[Any], policy: str = "drop") -> dict[str, Any]:
    """The kitchen-sink table with only the rule `expr` in its forward chain."""
    return {"nftables": [
        {"table": {"family": "inet", "name": "filter", "handle": 1}},
        *({"set": body} for body in (item["set"] for item in KITCHEN_SETS)),
        {"chain": {"family": "inet", "table": "filter", "name": "fw_lan", "handle": 1}},
        {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": policy}},
        {"rule": {"family": "inet", "table": "filter", "chain": "fw_lan", "handle": 5, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth*"}}, {"drop": None}]}},
        {"rule": {"family": "inet", "table": "filter", "chain": "fw_lan", "handle": 6, "expr": [{"return": None}]}},
        {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 99, "expr": expr}},
    ]}  # fmt: skip


def outcome(expr: list[Any], probe: Probe, policy: str = "drop") -> str:
    """ "pass", "drop" (certain) or "maybe" (uncertain) for `probe` through the one-rule chain."""
    found = blocked(one_rule(expr, policy), [probe])
    return "pass" if not found else "drop" if found[0].certain else "maybe"


V4 = FORWARD  # tcp 192.168.77.10:8080, DNAT, wan -> lan
UDP = dataclass_replace(FORWARD, l4proto="udp", dport=(53, 53))
V6 = dataclass_replace(PINHOLE, daddr="2001:db8::1")  # tcp [2001:db8::1]:443, no DNAT
ETH = dataclass_replace(FORWARD, iif="eth1")


@pytest.mark.parametrize(
    ("handle", "probe", "expected"),
    [
        (7, V4, "drop"),  # ct state established,related: the first packet is new
        (9, V4, "pass"), (9, V6, "drop"),  # ct status dnat
        (11, V4, "pass"), (11, MASQUERADE, "drop"),  # iifname "wan" oifname "lan"
        (12, V4, "drop"),  # iif "lo"
        (14, V4, "pass"), (14, UDP, "drop"), (14, MASQUERADE, "maybe"),  # meta l4proto { tcp, udp } th dport 8080
        (15, V4, "drop"), (15, dataclass_replace(V4, dport=(85, 86)), "pass"),  # tcp dport 80-90
        (15, dataclass_replace(V4, dport=(85, 95)), "maybe"),  # partly inside
        (17, UDP, "pass"), (17, V4, "drop"),  # udp dport { 53, 123 }: a tcp packet has no udp header
        (18, V4, "pass"), (18, dataclass_replace(V4, dport=(22, 22)), "drop"), (18, UDP, "drop"),  # tcp dport != 22
        (19, V4, "pass"), (19, V6, "drop"), (19, MASQUERADE, "maybe"),  # ip daddr 192.168.77.10
        (20, V4, "pass"),  # ip daddr 192.168.77.0/24
        (21, V4, "drop"), (21, dataclass_replace(V4, daddr="10.0.0.5"), "pass"),  # ip daddr 10.0.0.1-10.0.0.9
        (23, dataclass_replace(V4, daddr="5.6.7.8"), "pass"), (23, V4, "drop"),  # anonymous set with a prefix
        (24, V4, "pass"), (24, dataclass_replace(V4, daddr="10.1.2.3"), "pass"),  # @lanhosts
        (24, dataclass_replace(V4, daddr="172.16.0.1"), "drop"),
        (25, dataclass_replace(V4, dport=(8000, 8010)), "pass"), (25, V4, "drop"),  # tcp dport @ports
        (26, V6, "pass"), (26, V4, "drop"),  # ip6 daddr 2001:db8::1 tcp dport 443
        (27, V6, "pass"),  # ip6 daddr 2001:db8::/64
        (29, V4, "maybe"),  # limit rate 10/second accept
        (30, V4, "maybe"),  # meta mark 0x1
        (31, V4, "pass"), (31, V6, "drop"),  # meta nfproto ipv4
        (32, V4, "pass"), (32, V6, "drop"), (32, UDP, "drop"),  # ip protocol tcp
        (33, V4, "pass"), (33, UDP, "drop"), (33, MASQUERADE, "maybe"),  # meta l4proto tcp
        (35, V4, "drop"),  # iifname { "a", "b" }
        (40, V4, "maybe"),  # a concatenation
        (45, V4, "drop"),  # ct state new,established continue
        (46, V4, "pass"),  # ct status dnat,snat
        (47, V4, "pass"), (47, dataclass_replace(V4, daddr="1.2.3.4"), "drop"),  # ip daddr != 1.2.3.4
        (49, dataclass_replace(V4, dport=(443, 443)), "pass"), (49, V4, "drop"),  # tcp dport { 80-90, 443 }
    ],
)  # fmt: skip
def test_accept_rule_under_policy_drop(handle: int, probe: Probe, expected: str) -> None:
    assert outcome(KITCHEN_SINK[handle], probe) == expected


@pytest.mark.parametrize(
    ("handle", "probe", "expected"),
    [
        (8, V4, "pass"),  # ct state invalid drop
        (28, V4, "maybe"),  # ip saddr 1.1.1.1 drop: the client is anyone
        (28, V6, "pass"),  # ... but an IPv6 packet has no ip header
        (36, V4, "pass"), (36, MASQUERADE, "drop"),  # iifname != "wan" drop
        (37, V4, "pass"), (37, ETH, "drop"), (38, ETH, "drop"),  # jump/goto fw_lan: iifname "eth*" drop
        (37, dataclass_replace(V4, iif="eth*"), "drop"),
        (42, dataclass_replace(V4, dport=(23, 23)), "drop"), (42, V4, "pass"),  # tcp dport vmap { 22 : accept, 23 : drop }
        (42, MASQUERADE, "maybe"),
        (43, V4, "drop"), (44, V4, "drop"),  # reject
        (50, V4, "drop"),  # counter drop
    ],
)  # fmt: skip
def test_rule_under_policy_accept(handle: int, probe: Probe, expected: str) -> None:
    assert outcome(KITCHEN_SINK[handle], probe, policy="accept") == expected


CT = {"ct": {"key": "status"}}
STATE = {"ct": {"key": "state"}}


@pytest.mark.parametrize(
    ("match", "dnat", "expected"),
    [
        # shapes of `ct status == dnat`, `ct status != dnat`, `ct status & dnat == dnat`, `ct state == new` ...
        ({"op": "==", "left": CT, "right": "dnat"}, True, "maybe"),  # the word has dnat-done too
        ({"op": "==", "left": CT, "right": "snat"}, True, "drop"),
        ({"op": "!=", "left": CT, "right": "snat"}, True, "pass"),
        ({"op": "in", "left": CT, "right": "dnat"}, False, "drop"),
        ({"op": "==", "left": {"&": [CT, "dnat"]}, "right": "dnat"}, True, "pass"),
        ({"op": "==", "left": {"&": [CT, "dnat"]}, "right": "dnat"}, False, "drop"),
        ({"op": "!=", "left": {"&": [CT, "dnat"]}, "right": 0}, True, "pass"),
        ({"op": "==", "left": STATE, "right": "new"}, False, "pass"),
        ({"op": "!=", "left": STATE, "right": "established"}, False, "pass"),
        ({"op": "==", "left": STATE, "right": {"set": ["established", "new"]}}, False, "pass"),
        ({"op": "!=", "left": STATE, "right": {"set": ["established", "new"]}}, False, "drop"),
        ({"op": "==", "left": {"ct": {"key": "mark"}}, "right": 1}, False, "maybe"),
        (
            {"op": "<", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 1024},
            True,
            "drop",
        ),
        (
            {"op": ">=", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 1024},
            True,
            "pass",
        ),
    ],
)
def test_ct_words_and_comparisons(match: dict[str, Any], dnat: bool, expected: str) -> None:
    assert outcome([{"match": match}, {"accept": None}], dataclass_replace(V4, dnat=dnat)) == expected


def test_jump_loops_and_missing_chains_are_unknown_not_errors() -> None:
    looping = {"nftables": [
        {"chain": {"family": "inet", "table": "t", "name": "a"}},
        {"chain": {"family": "inet", "table": "t", "name": "forward", "type": "filter", "hook": "forward", "policy": "drop"}},
        {"rule": {"family": "inet", "table": "t", "chain": "a", "handle": 3, "expr": [{"jump": {"target": "a"}}]}},
        {"rule": {"family": "inet", "table": "t", "chain": "forward", "handle": 4, "expr": [{"jump": {"target": "a"}}]}},
        {"rule": {"family": "inet", "table": "t", "chain": "forward", "handle": 5, "expr": [{"goto": {"target": "nowhere"}}]}},
    ]}  # fmt: skip
    found = blocked(looping, [V4])
    assert [(b.certain, b.because) for b in found] == [(False, "policy drop")]


def test_deep_chains_stop_at_sixteen() -> None:
    items: list[dict[str, Any]] = [
        {"chain": {"family": "inet", "table": "t", "name": "forward", "type": "filter", "hook": "forward", "policy": "accept"}},
        {"rule": {"family": "inet", "table": "t", "chain": "forward", "handle": 1, "expr": [{"jump": {"target": "c0"}}]}},
    ]  # fmt: skip
    for depth in range(40):
        items.append({"chain": {"family": "inet", "table": "t", "name": f"c{depth}"}})
        items.append({"rule": {"family": "inet", "table": "t", "chain": f"c{depth}", "handle": 10 + depth, "expr": [{"jump": {"target": f"c{depth + 1}"}}]}})  # fmt: skip
    items.append(
        {"rule": {"family": "inet", "table": "t", "chain": "c40", "handle": 99, "expr": [{"drop": None}]}}
    )
    found = blocked({"nftables": items}, [V4])
    assert [b.certain for b in found] == [False]
    assert "not followed" in found[0].because


# --------------------------------------------------------------------------- fix, opening, opened, closing


def item(probe: Probe, family: str = "inet", table: str = "filter", chain: str = "forward") -> Blocked:
    return Blocked(probe, family, table, chain, True, "policy drop", policy=True)


def test_fix_commands_append_for_a_policy_drop() -> None:
    assert fix(item(FORWARD)) == "nft add rule inet filter forward ct status dnat accept"
    assert fix(item(MASQUERADE)) == 'nft add rule inet filter forward \'iifname "lan" oifname "wan" accept\''
    assert (
        fix(item(PINHOLE, "ip6", "filter6"))
        == "nft add rule ip6 filter6 forward ip6 daddr 2001:db8:1::5 tcp dport 443 accept"
    )
    ranged = dataclass_replace(PINHOLE, dport=(8000, 8010), l4proto="udp")
    assert (
        fix(item(ranged))
        == "nft add rule inet filter forward ip6 daddr 2001:db8:1::5 udp dport 8000-8010 accept"
    )
    assert fix(Blocked(ranged, "ip6", "filter", "FORWARD", True, "policy drop", True, True)) == (
        "ip6tables -A FORWARD -d 2001:db8:1::5 -p udp --dport 8000:8010 -j ACCEPT"
    )
    for reply in (FORWARD_REPLY, MASQUERADE_REPLY, PINHOLE_REPLY):
        assert fix(item(reply)) == "nft add rule inet filter forward ct state established,related accept"
    assert fix(Blocked(MASQUERADE_REPLY, "ip", "filter", "FORWARD", True, "policy drop", True, True)) == (
        "iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    )


def test_fix_commands_insert_before_a_drop_rule() -> None:
    rule = Blocked(
        FORWARD,
        "inet",
        "filter",
        "forward",
        False,
        "rule 3: ip saddr @blocklist drop",
        at=RuleAt("forward", 3, 2),
    )
    assert fix(rule) == "nft insert rule inet filter forward position 3 ct status dnat accept"
    deep = Blocked(
        MASQUERADE,
        "inet",
        "filter",
        "forward",
        True,
        "rule 5 in chain lan_out: drop",
        at=RuleAt("lan_out", 5, 1),
    )
    assert (
        fix(deep) == 'nft insert rule inet filter lan_out position 5 \'iifname "lan" oifname "wan" accept\''
    )
    docker = Blocked(
        FORWARD_REPLY,
        "ip",
        "filter",
        "FORWARD",
        True,
        "rule 14 in chain X: drop",
        True,
        at=RuleAt("X", 14, 3),
    )
    assert fix(docker) == "iptables -I X 3 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    unknown = Blocked(FORWARD, "inet", "filter", "forward", False, "the chain could not be read")
    assert fix(unknown) == "nft insert rule inet filter forward ct status dnat accept"
    assert not any(map(openable, (rule, deep, docker, unknown)))
    assert opening([rule, deep, docker, unknown]) == ""


def test_opening_merges_duplicates_and_comments_each_rule() -> None:
    items = [
        item(FORWARD),
        item(RANGE),
        item(MASQUERADE),
        item(FORWARD),
        item(FORWARD, "ip", "filter", "FWD"),
    ]
    assert opening(items) == (
        'add rule inet filter forward ct status dnat accept comment "portfwd gateway: gateway.forward[0] and 1 more"\n'
        'add rule inet filter forward iifname "lan" oifname "wan" accept comment "portfwd gateway: masquerade"\n'
        'add rule ip filter FWD ct status dnat accept comment "portfwd gateway: gateway.forward[0]"\n'
    )
    assert opening([]) == ""


def test_opening_cannot_narrow_an_unknown_dnat_for_iptables() -> None:
    vague = dataclass_replace(FORWARD, daddr=None)
    text = opening([Blocked(vague, "ip", "filter", "FORWARD", True, "policy drop", True, True)])
    assert (
        text
        == "# ip filter FORWARD is iptables-nft's: run iptables -A FORWARD -m conntrack --ctstate DNAT -j ACCEPT\n"
    )
    # nor a reply to a masqueraded flow (no `ct state` for iptables-nft); a forward's reply is
    # let through by its source, the LAN host and port
    replies = [
        Blocked(probe, "ip", "filter", "FORWARD", True, "policy drop", True, True)
        for probe in (MASQUERADE_REPLY, FORWARD_REPLY)
    ]
    assert opening(replies) == (
        "# ip filter FORWARD is iptables-nft's: run iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        'add rule ip filter FORWARD iifname "lan" oifname "wan" ip saddr 192.168.77.10 tcp sport 8080 accept comment "portfwd gateway: gateway.forward[0] (replies)"\n'
    )


def test_opened_finds_our_comments_outside_our_table_and_closing_deletes_them() -> None:
    found = {"nftables": [
        {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 7, "comment": "portfwd gateway: masquerade", "expr": []}},
        {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 8, "comment": "mine", "expr": []}},
        {"rule": {"family": "inet", "table": "portfwd", "chain": "forward", "handle": 9, "comment": "portfwd gateway: x", "expr": []}},
        {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 3, "comment": "portfwd gateway: gateway.forward[1]", "expr": []}},
        {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": "3", "comment": "portfwd gateway: odd"}},
    ]}  # fmt: skip
    rules = opened(found)
    assert rules == [("inet", "filter", "forward", 7), ("ip", "filter", "FORWARD", 3)]
    assert (
        closing(rules) == "delete rule inet filter forward handle 7\ndelete rule ip filter FORWARD handle 3\n"
    )
    assert closing([]) == ""


def test_render() -> None:
    assert render({"expr": KITCHEN_SINK[11]}) == 'iifname "wan" oifname "lan" accept'
    assert render({"expr": KITCHEN_SINK[18]}) == "tcp dport != 22 accept"
    assert render({"expr": KITCHEN_SINK[20]}) == "ip daddr 192.168.77.0/24 accept"
    assert render(
        {"expr": [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 1}}] * 20}
    ).endswith("...")


# --------------------------------------------------------------------------- never raises


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.sampled_from(
        ["", "@lanhosts", "@nope", "eth*", "dnat", "new", "tcp", "ipv4", "192.168.77.10", "2001:db8::/64", "forward", "drop", "accept", "filter", "inet", "ip", "ip6"]
    ),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["nftables", "rule", "chain", "set", "table", "family", "table", "name", "chain", "hook", "type", "policy", "expr", "match", "op", "left", "right", "meta", "key", "payload", "protocol", "field", "ct", "set", "range", "prefix", "addr", "len", "elem", "jump", "goto", "target", "vmap", "data", "&", "accept", "drop", "xt", "handle", "flags"]),
        children, max_size=4,
    ),
    max_leaves=40,
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(JSONISH)
def test_blocked_never_raises_on_random_json(doc: Any) -> None:
    for found in (blocked(doc, ALL), blocked({"nftables": doc}, ALL), blocked({"nftables": [doc]}, ALL)):
        for entry in found:
            assert isinstance(fix(entry), str)
        assert isinstance(opening(found), str)
    assert isinstance(opened(doc), list)
    assert isinstance(opened({"nftables": [{"rule": doc}]}), list)


REAL_RULES = [expr for expr in KITCHEN_SINK.values()]


@st.composite
def real_shaped(draw: st.DrawFn) -> dict[str, Any]:
    """A forward chain of real rules, some of them damaged (keys dropped, values swapped)."""
    rules: list[Any] = []
    for handle, expr in enumerate(draw(st.lists(st.sampled_from(REAL_RULES), max_size=8))):
        statements = [dict(statement) for statement in expr]
        if draw(st.booleans()) and statements:
            victim = draw(st.integers(0, len(statements) - 1))
            statements[victim] = draw(
                st.sampled_from(
                    [
                        {},
                        {"match": {}},
                        {"match": {"op": "==", "left": {"meta": {}}, "right": None}},
                        {
                            "match": {
                                "left": {"payload": {"protocol": "tcp"}},
                                "right": {"set": [None, {"range": [1]}, {"prefix": {}}]},
                            }
                        },
                        {"jump": None},
                        {"vmap": {"key": {"ct": {"key": "state"}}, "data": "@nope"}},
                        {"new-thing": [1, 2]},
                        {"xt": {"type": "target", "name": "REJECT"}},
                        draw(JSONISH),
                    ]
                )
            )
        rules.append(
            {
                "rule": {
                    "family": "inet",
                    "table": "filter",
                    "chain": draw(st.sampled_from(["forward", "fw_lan"])),
                    "handle": handle,
                    "expr": statements,
                }
            }
        )
    policy = draw(st.sampled_from(["accept", "drop", None, 3]))
    listing = one_rule([], "drop")
    listing["nftables"][4]["chain"]["policy"] = policy
    listing["nftables"].extend(rules)
    listing["nftables"].append(
        {
            "rule": {
                "family": "inet",
                "table": "filter",
                "chain": "fw_lan",
                "handle": 98,
                "expr": [{"goto": {"target": "forward"}}],
            }
        }
    )
    return listing  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(real_shaped())
def test_blocked_never_raises_on_real_shaped_json(doc: dict[str, Any]) -> None:
    found = blocked(doc, ALL)
    for entry in found:
        assert entry.because
        assert fix(entry).startswith(("nft insert rule inet filter ", "nft add rule inet filter "))
        assert openable(entry) == (entry.certain and entry.policy and entry.at is None)
    assert opening(found).count("\n") <= len(found)


# --------------------------------------------------------------------------- whose drop it is, and replies


def test_a_blocklist_drop_rule_is_reported_and_never_opened() -> None:
    found = blocked(listing("blocklist"), [FORWARD, MASQUERADE, PINHOLE])
    assert where(found) == [
        ("gateway.forward[0]", "inet", "filter", "forward", False, "rule 3: ip saddr @blocklist drop"),
        ("masquerade", "inet", "filter", "forward", False, "rule 3: ip saddr @blocklist drop"),
    ]  # the client is anyone: some are on the list; an IPv6 packet has no ip header
    assert [(b.policy, b.at) for b in found] == [(False, RuleAt("forward", 3, 1))] * 2
    assert fix(found[0]) == "nft insert rule inet filter forward position 3 ct status dnat accept"
    assert opening(found) == "", "the admin's drop rule is theirs: portfwd never opens it"
    # certain or not: a rule that surely drops is reported with its handle, and not opened either
    sure = [dataclass_replace_blocked(b, certain=True) for b in found]
    assert opening(sure) == ""


def dataclass_replace_blocked(found: Blocked, **changes: Any) -> Blocked:
    fields = {name: getattr(found, name) for name in Blocked.__dataclass_fields__}
    return Blocked(**{**fields, **changes})


def test_a_policy_drop_after_a_blocklist_is_appended_to_and_the_blocklist_stays_first() -> None:
    found = blocked(listing("blocklistdrop"), [FORWARD, MASQUERADE, FORWARD_REPLY, MASQUERADE_REPLY])
    assert where(found) == [
        ("gateway.forward[0]", "inet", "filter", "forward", True, "policy drop"),
        ("masquerade", "inet", "filter", "forward", True, "policy drop"),
    ]  # the replies pass the established accept
    assert all(b.appendable and b.at is None for b in found)
    assert [fix(b) for b in found] == [
        "nft add rule inet filter forward ct status dnat accept",
        'nft add rule inet filter forward \'iifname "lan" oifname "wan" accept\'',
    ]
    assert opening(found) == (
        'add rule inet filter forward ct status dnat accept comment "portfwd gateway: gateway.forward[0]"\n'
        'add rule inet filter forward iifname "lan" oifname "wan" accept comment "portfwd gateway: masquerade"\n'
    )
    # with those appended (as `nft -j list` shows them), the blocklist still comes first: what is
    # left is the admin's rule, reported as "may drop" and not opened again
    after = listing("blocklistdrop")
    after["nftables"] += [
        {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 5, "comment": "portfwd gateway: gateway.forward[0]", "expr": [{"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}, {"accept": None}]}},
        {"rule": {"family": "inet", "table": "filter", "chain": "forward", "handle": 6, "comment": "portfwd gateway: masquerade", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lan"}}, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "wan"}}, {"accept": None}]}},
    ]  # fmt: skip
    again = blocked(after, [FORWARD, MASQUERADE])
    assert where(again) == [
        ("gateway.forward[0]", "inet", "filter", "forward", False, "rule 4: ip saddr @blocklist drop"),
        ("masquerade", "inet", "filter", "forward", False, "rule 4: ip saddr @blocklist drop"),
    ]
    assert opening(again) == ""


def test_replies_need_an_established_accept() -> None:
    found = blocked(listing("ifaces"), REPLIES)  # ct state vmap { established : accept, ... }
    assert found == []
    found = blocked(listing("namedset"), REPLIES)  # no established accept
    assert where(found) == [
        # `ip daddr @servers tcp dport 80 accept`: the WAN client the reply goes to might be a server
        ("gateway.forward[0] (replies)", "inet", "filter", "forward", False, "policy drop"),
        ("masquerade (replies)", "inet", "filter", "forward", False, "policy drop"),  # to a LAN server
        ("gateway.forward[2] (replies)", "inet", "filter", "forward", True, "policy drop"),  # IPv6
    ]
    assert opening(found) == (
        'add rule inet filter forward ct state established,related accept comment "portfwd gateway: '
        'gateway.forward[2] (replies)"\n'
    )  # the certain ones only
    assert [b.certain for b in blocked(one_rule([], "drop"), REPLIES)] == [True] * 3


def test_docker_like_forward_without_an_established_accept_blocks_the_replies() -> None:
    docker = listing("iptables")
    found = blocked(docker, [FORWARD_REPLY, MASQUERADE_REPLY])
    # rule 17 (-d 192.168.77.10 -p tcp --dport 8080 -j ACCEPT) might take a reply going to that address
    assert [b.certain for b in found] == [False, False]
    docker["nftables"] = [i for i in docker["nftables"] if i.get("rule", {}).get("handle") != 17]
    found = blocked(docker, [FORWARD_REPLY, MASQUERADE_REPLY])
    # rule 8 (-o docker0 -m conntrack ... -j ACCEPT) is for docker0 only; rule 18 is a LOG
    assert where(found) == [
        ("gateway.forward[0] (replies)", "ip", "filter", "FORWARD", True, "policy drop"),
        ("masquerade (replies)", "ip", "filter", "FORWARD", True, "policy drop"),
    ]
    assert [fix(b) for b in found] == [
        "iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    ] * 2
    assert opening(found) == (  # no `ct state` where iptables-nft must read it: the forward's by its source
        "# ip filter FORWARD is iptables-nft's: run iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        'add rule ip filter FORWARD iifname "lan" oifname "wan" ip saddr 192.168.77.10 tcp sport 8080 accept comment "portfwd gateway: gateway.forward[0] (replies)"\n'
    )


def test_a_return_hands_the_packet_to_the_policy_before_the_rest_of_the_chain() -> None:
    found = blocked(listing("return"), [FORWARD, MASQUERADE_REPLY, FORWARD_REPLY])
    # FORWARD comes in on wan: `iifname "wan" return` sends it to the policy at rule 3, so an
    # accept appended after rule 4 would never be seen; the masquerade reply too (also from wan)
    assert [(b.probe.what, b.certain, b.because, b.at, b.appendable) for b in found] == [
        ("gateway.forward[0]", True, "policy drop", RuleAt("forward", 3, 2), False),
        # a reply from anyone on the LAN: rule 2 may take it (from 192.168.77.10 port 8080)
        ("masquerade (replies)", False, "policy drop", RuleAt("forward", 3, 2), False),
    ]  # the forward's reply: ct direction reply, from 192.168.77.10 port 8080: accepted by rule 2
    assert fix(found[0]) == "nft insert rule inet filter forward position 3 ct status dnat accept"
    assert opening(found) == ""


STATE_KEY = {"ct": {"key": "state"}}
STATUS_KEY = {"ct": {"key": "status"}}
SADDR = {"payload": {"protocol": "ip", "field": "saddr"}}
SPORT = {"payload": {"protocol": "tcp", "field": "sport"}}


@pytest.mark.parametrize(
    ("match", "probe", "expected"),
    [
        ({"op": "in", "left": STATE_KEY, "right": ["established", "related"]}, "reply", "pass"),
        ({"op": "in", "left": STATE_KEY, "right": "new"}, "reply", "drop"),
        ({"op": "==", "left": STATE_KEY, "right": "established"}, "reply", "pass"),
        ({"op": "in", "left": STATUS_KEY, "right": "seen-reply"}, "reply", "pass"),
        ({"op": "in", "left": STATUS_KEY, "right": "seen-reply"}, "new", "drop"),
        ({"op": "in", "left": STATUS_KEY, "right": "confirmed"}, "reply", "pass"),
        ({"op": "in", "left": STATUS_KEY, "right": "assured"}, "reply", "maybe"),  # depends on the flow
        ({"op": "in", "left": STATUS_KEY, "right": "snat"}, "masq", "pass"),
        ({"op": "in", "left": STATUS_KEY, "right": "snat"}, "reply", "drop"),
        ({"op": "in", "left": STATUS_KEY, "right": "dnat"}, "reply", "pass"),
        ({"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}, "reply", "pass"),
        ({"op": "==", "left": {"ct": {"key": "direction"}}, "right": "original"}, "reply", "drop"),
        ({"op": "==", "left": {"ct": {"key": "direction"}}, "right": "original"}, "new", "pass"),
        ({"op": "!=", "left": {"ct": {"key": "direction"}}, "right": "reply"}, "new", "pass"),
        ({"op": "==", "left": {"ct": {"key": "state", "dir": "reply"}}, "right": "new"}, "new", "maybe"),
        ({"op": "==", "left": SADDR, "right": "192.168.77.10"}, "reply", "pass"),
        ({"op": "==", "left": SADDR, "right": "192.168.77.11"}, "reply", "drop"),
        ({"op": "==", "left": SADDR, "right": "192.168.77.10"}, "new", "maybe"),  # a WAN client: anyone
        ({"op": "==", "left": SPORT, "right": {"range": [8000, 8099]}}, "reply", "pass"),
        ({"op": "==", "left": SPORT, "right": 80}, "reply", "drop"),
        ({"op": "==", "left": SPORT, "right": 80}, "new", "maybe"),
    ],
)
def test_conntrack_of_a_reply(match: dict[str, Any], probe: str, expected: str) -> None:
    chosen = {"reply": FORWARD_REPLY, "masq": MASQUERADE_REPLY, "new": FORWARD}[probe]
    assert outcome([{"match": match}, {"accept": None}], chosen) == expected


def gateway_spec(tmp_path: Path, body: str) -> GatewaySpec:
    path = tmp_path / "portfwd.toml"
    path.write_text('[gateway]\nwan = "wan"\nlan = "lan"\n' + body)
    spec = planner.load(path).gateway
    assert spec is not None
    return spec


def test_gateway_findings_probe_both_ways_and_merge_identical_lines(tmp_path: Path) -> None:
    spec = gateway_spec(
        tmp_path,
        '[[gateway.forward]]\nport = 8080\nto = "192.168.77.10:80"\nprotocol = "tcp+udp"\n'
        '[[gateway.forward]]\nport = "8000-8001"\nto = "192.168.77.10:9000-9001"\n',
    )
    assert [(p.what, p.iif, p.state, p.l4proto, p.saddr, p.sport, p.dnat, p.snat) for p in gwfirewall.probes(spec)] == [
        ("gateway.forward[0] (tcp)", "wan", "new", "tcp", None, None, True, False),
        ("gateway.forward[0] (udp)", "wan", "new", "udp", None, None, True, False),
        ("gateway.forward[0] (replies)", "lan", "established", "tcp", "192.168.77.10", (80, 80), True, False),
        ("gateway.forward[0] (replies)", "lan", "established", "udp", "192.168.77.10", (80, 80), True, False),
        ("gateway.forward[1]", "wan", "new", "tcp", None, None, True, False),
        ("gateway.forward[1] (replies)", "lan", "established", "tcp", "192.168.77.10", (9000, 9001), True, False),
        ("masquerade", "lan", "new", None, None, None, False, False),
        ("masquerade (replies)", "wan", "established", None, None, None, False, True),
    ]  # fmt: skip
    tail = "and an accept in portfwd's table cannot override that; run: "
    opt_in = " (or set gateway.open_other_tables = true)"
    lines = [gwfirewall.line(b) for b in gwfirewall.findings(spec, one_rule([], "drop"))]
    assert lines == [
        f"gateway.forward[0] (tcp): table inet filter chain forward drops it (policy drop), {tail}nft add rule inet filter forward ct status dnat accept{opt_in}",
        f"gateway.forward[0] (udp): table inet filter chain forward drops it (policy drop), {tail}nft add rule inet filter forward ct status dnat accept{opt_in}",
        f"gateway.forward[0] (replies): table inet filter chain forward drops it (policy drop), {tail}nft add rule inet filter forward ct state established,related accept{opt_in}",
        f"gateway.forward[1]: table inet filter chain forward drops it (policy drop), {tail}nft add rule inet filter forward ct status dnat accept{opt_in}",
        f"gateway.forward[1] (replies): table inet filter chain forward drops it (policy drop), {tail}nft add rule inet filter forward ct state established,related accept{opt_in}",
        f"masquerade: table inet filter chain forward drops it (policy drop), {tail}nft add rule inet filter forward 'iifname \"lan\" oifname \"wan\" accept'{opt_in}",
        f"masquerade (replies): table inet filter chain forward drops it (policy drop), {tail}nft add rule inet filter forward ct state established,related accept{opt_in}",
    ]  # fmt: skip
    # a drop rule the admin wrote: reported with the rule and its handle, never with the opt-in
    lines = [gwfirewall.line(b) for b in gwfirewall.findings(spec, listing("blocklist"))]
    assert lines[0] == (
        "gateway.forward[0] (tcp): table inet filter chain forward may drop it (rule 3: ip saddr @blocklist drop), "
        f"{tail}nft insert rule inet filter forward position 3 ct status dnat accept"
    )
    assert all(opt_in not in text for text in lines)


def test_merged_findings_still_open_apart(tmp_path: Path) -> None:
    spec = gateway_spec(
        tmp_path,
        'masquerade = false\n[[gateway.forward]]\nport = 8080\nto = "192.168.77.10:80"\nprotocol = "tcp+udp"\n',
    )
    docker = {"nftables": [
        {"table": {"family": "ip", "name": "filter", "handle": 1}},
        {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    ]}  # fmt: skip
    found = gwfirewall.findings(spec, docker)
    assert [(b.probe.what, [a.probe.l4proto for a in b.alike]) for b in found] == [
        ("gateway.forward[0] (tcp)", []),
        ("gateway.forward[0] (udp)", []),
        ("gateway.forward[0] (replies)", ["udp"]),  # one line: the same iptables command for both
    ]
    assert gwfirewall.line(found[2], True).endswith(
        "run: iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    )
    assert [row.split(" comment ")[0] for row in opening(found).splitlines()] == [
        'add rule ip filter FORWARD iifname "wan" oifname "lan" ip daddr 192.168.77.10 tcp dport 80 accept',
        'add rule ip filter FORWARD iifname "wan" oifname "lan" ip daddr 192.168.77.10 udp dport 80 accept',
        'add rule ip filter FORWARD iifname "lan" oifname "wan" ip saddr 192.168.77.10 tcp sport 80 accept',
        'add rule ip filter FORWARD iifname "lan" oifname "wan" ip saddr 192.168.77.10 udp sport 80 accept',
    ]
