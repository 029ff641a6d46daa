"""The forward rules as `portfwd check` shows them: which relay each gets, who may use it.

Plain rows from the specs (the CLI draws them), so the relay layer that decides the relay path
is the one that explains it.
"""

from __future__ import annotations

from portfwd.relay.forwarder import RelayPath
from portfwd.relay.native import available as native_available
from portfwd.relay.native import native_reason
from portfwd.relay.splice import splice_available
from portfwd.specs import RuleSpec

#: The columns of `describe`'s rows.
COLUMNS = ("rule", "listen", "connect", "protocol", "access", "relay")


def relay_path(rule: RuleSpec, splice_ok: bool) -> RelayPath:
    """The TCP relay a rule gets: splice when possible and not refused, else the Protocol pair
    (also for a bandwidth limit: splice moves bytes in the kernel, past any pacing)."""
    if rule.bandwidth or rule.bandwidth_per_connection:
        return "protocol"
    return "splice" if splice_ok and rule.relay != "protocol" else "protocol"


def targets_text(rule: RuleSpec) -> str:
    """Where a rule goes: its target, or its backends and how they are balanced."""
    if not rule.backends:
        return str(rule.connect)
    names = ", ".join(
        str(backend.connect)
        + (f" weight {backend.weight}" if backend.weight != 1 else "")
        + (" backup" if backend.backup else "")
        for backend in rule.backends
    )
    return f"{names} ({rule.balance})" if len(rule.backends) > 1 else names


def describe(rules: tuple[RuleSpec, ...]) -> list[tuple[str, str, str, str, str, str]]:
    """Rows for `portfwd check`: name, listen, connect, protocol, access, relay."""
    rows: list[tuple[str, str, str, str, str, str]] = []
    splice = splice_available()
    for rule in rules:
        access = []
        if rule.allow:
            access.append("allow " + ", ".join(map(str, rule.allow)))
        if rule.deny:
            access.append("deny " + ", ".join(map(str, rule.deny)))
        for route in rule.route:
            to = (
                str(route.connect)
                if route.backend is None
                else f"backend {rule.backends[route.backend].name}"
            )
            access.append(f"{', '.join(map(str, route.source))} -> {to}")
        if rule.max_connections:
            access.append(f"at most {rule.max_connections} at once")
        if rule.max_connections_per_source:
            access.append(f"at most {rule.max_connections_per_source} at once per address")
        if rule.rate:
            access.append(f"at most {rule.rate[0]} new per {rule.rate[1]:g}s per address")
        if rule.bandwidth:
            access.append(f"{_bits(rule.bandwidth)} each way for the rule")
        if rule.bandwidth_per_connection:
            access.append(f"{_bits(rule.bandwidth_per_connection)} each way per connection")
        if rule.accept_proxy:
            access.insert(0, "PROXY header from " + ", ".join(map(str, rule.trusted_proxies)))
        relay: str = relay_path(rule, splice) if rule.protocol.has_tcp else "udp"
        if rule.relay == "kernel":
            relay = "kernel (nftables NAT)"
        elif relay == "splice" and native_available() and native_reason(rule) is None:
            relay = "splice (C engine)"
        if rule.proxy_protocol:
            relay += f", PROXY v{rule.proxy_protocol} header"
        if rule.transparent:
            relay += ", from the client's address"
        if rule.health.interval:
            health = rule.health
            relay += f", checked every {health.interval:g}s (rise {health.rise}, fall {health.fall})"
        rows.append(
            (
                rule.label,
                str(rule.listen),
                targets_text(rule),
                rule.protocol.value,
                "; ".join(access) or "everyone",
                relay,
            )
        )
    return rows


def _bits(rate: float) -> str:
    """Bytes a second as bits a second, as they were most likely written (`10Mbit`)."""
    bits = rate * 8
    for unit, size in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if bits >= size:
            return f"{bits / size:g}{unit}"
    return f"{bits:g}bit"
