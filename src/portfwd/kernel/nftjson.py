"""An `nft -j list ruleset` read for othertables.py's walk: its tables (base chains on the
forward hook, rules, sets), and the tri-state values of its expressions (addresses, numbers,
intervals, interface names) against a probe.

Pure: JSON in, values out; hand-written for the reason othertables.py gives. Apart from the
walk so each part stays one concern (STYLE.md).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Tri = bool | None  # None: Unknown

PROTOCOLS = {
    "icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "dccp": 33, "gre": 47, "esp": 50, "ah": 51,
    "icmpv6": 58, "ipv6-icmp": 58, "comp": 108, "sctp": 132, "udplite": 136,
}  # fmt: skip
NFPROTO = {"ipv4": 2, "ipv6": 10}
IPTABLES_TABLES = {"filter", "mangle", "raw", "security", "nat"}
IPTABLES_CHAINS = {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}


# --------------------------------------------------------------------------- tri-state logic


def tri_and(left: Tri, right: Tri) -> Tri:
    """Both: False wins, then Unknown."""
    if left is False or right is False:
        return False
    if left is None or right is None:
        return None
    return True


def tri_or(values: Iterable[Tri]) -> Tri:
    """Any: True wins, then Unknown."""
    result: Tri = False
    for value in values:
        if value is True:
            return True
        if value is None:
            result = None
    return result


def tri_not(value: Tri) -> Tri:
    """Not: Unknown stays Unknown."""
    return None if value is None else not value


# --------------------------------------------------------------------------- the ruleset


@dataclass(slots=True)
class Table:
    """One table of the ruleset: its base chains on the forward hook, its rules by chain, its sets."""

    family: str
    name: str
    base: list[tuple[str, str]] = field(default_factory=list)  # (chain, policy)
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    has_xt: bool = False

    @property
    def iptables(self) -> bool:
        """Managed by iptables-nft: it uses xt expressions or looks like iptables' own tables."""
        if self.family not in ("ip", "ip6"):
            return False
        builtin = self.name in IPTABLES_TABLES and all(chain in IPTABLES_CHAINS for chain, _ in self.base)
        return self.has_xt or (builtin and bool(self.base))


def text_of(value: Any) -> str | None:
    """A JSON value that must be text, else None."""
    return value if isinstance(value, str) else None


def read_tables(listing: Any) -> dict[tuple[str, str], Table]:
    """The ruleset's tables by (family, name); what is not understood is left out."""
    items = listing.get("nftables") if isinstance(listing, dict) else None
    tables: dict[tuple[str, str], Table] = {}
    if not isinstance(items, list):
        return tables
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            continue
        kind, body = next(iter(item.items()))
        if not isinstance(body, dict):
            continue
        family, table = text_of(body.get("family")), text_of(body.get("table"))
        if kind == "table":
            table = text_of(body.get("name"))
        if family is None or table is None:
            continue
        entry = tables.setdefault((family, table), Table(family, table))
        name = text_of(body.get("name"))
        if kind == "chain" and name is not None:
            entry.rules.setdefault(name, [])
            if body.get("hook") == "forward" and "type" in body:
                entry.base.append((name, text_of(body.get("policy")) or "accept"))
        elif kind in ("set", "map") and name is not None:
            entry.sets[name] = body
        elif kind == "rule":
            chain = text_of(body.get("chain"))
            if chain is not None:
                entry.rules.setdefault(chain, []).append(body)
                expr = body.get("expr")
                if isinstance(expr, list) and any(isinstance(s, dict) and "xt" in s for s in expr):
                    entry.has_xt = True
    return tables


def applies(table_family: str, probe_family: str) -> bool:
    """Whether a table of this family sees packets of the probe's (inet sees both)."""
    return table_family == "inet" or table_family == probe_family


# --------------------------------------------------------------------------- values


Interval = tuple[int, int, int]  # (space, low, high): space tells IPv4 from IPv6 from plain numbers


def address(value: Any) -> Interval | None:
    """An address or prefix as an interval of its family's space; None: not one."""
    if not isinstance(value, str):
        return None
    try:
        if "/" in value:
            net = ipaddress.ip_network(value, strict=False)
            return (net.version, int(net.network_address), int(net.broadcast_address))
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    return (addr.version, int(addr), int(addr))


def number(value: Any, names: dict[str, int] | None = None) -> int | None:
    """A number, or a name `names` gives one (a protocol's); None: neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        if names is not None:
            return names.get(value)
    return None


def interval(element: Any, domain: str) -> Interval | None:
    """An element (scalar, range, prefix, elem wrapper) as an interval of the domain; None: not understood."""
    if isinstance(element, dict) and isinstance(element.get("elem"), dict):
        element = element["elem"].get("val")
    if isinstance(element, dict) and len(element) == 1:
        kind, body = next(iter(element.items()))
        if kind == "range" and isinstance(body, list) and len(body) == 2:
            low, high = interval(body[0], domain), interval(body[1], domain)
            if low is None or high is None or low[0] != high[0]:
                return None
            return (low[0], low[1], high[2])
        if kind == "prefix" and isinstance(body, dict) and domain == "addr":
            return address(f"{body.get('addr')}/{body.get('len')}")
        return None
    if domain == "addr":
        return address(element)
    names = PROTOCOLS if domain == "proto" else NFPROTO if domain == "nfproto" else None
    value = number(element, names)
    return None if value is None else (0, value, value)


def covers(probe: Interval, elements: Sequence[Interval | None]) -> Tri:
    """True when the elements cover all of `probe`, False when none touches it, else Unknown."""
    space, low, high = probe
    spans = sorted((max(a, low), min(b, high)) for s, a, b in (e for e in elements if e) if s == space)
    spans = [(a, b) for a, b in spans if a <= b]
    if not spans:
        return None if any(e is None for e in elements) else False
    cursor = low
    for a, b in spans:
        if a > cursor:
            break
        cursor = max(cursor, b + 1)
    return True if cursor > high else None


def iface(name: str, pattern: Any) -> Tri:
    """Whether interface `name` matches an nft interface pattern (`eth*` is a wildcard, `eth\\*` is not)."""
    if isinstance(pattern, dict) and isinstance(pattern.get("elem"), dict):
        pattern = pattern["elem"].get("val")
    if not isinstance(pattern, str):
        return None
    if pattern.endswith("\\*"):
        return name == pattern[:-2] + "*"
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return name == pattern
