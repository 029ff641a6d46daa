"""What the gateway needs the other tables' forward chains to let through, and the openings
portfwd makes there when `open_other_tables = true`.

An accept in table inet portfwd cannot override a drop in another table's forward chain (the
usual `inet filter` with `policy drop`, or docker's iptables FORWARD policy): the gateway would
say "applied" and carry nothing. `findings()` evaluates the live ruleset (othertables.py) for
each packet the gateway forwards, both ways: the first packet of each flow and the replies in
it; the CLI and the service report each finding in one line with the command that fixes it, or,
with the opt-in, append those accepts where a chain's policy drops them (commented, so that
`close()` removes exactly them when the gateway goes). A drop rule someone wrote is reported and
never opened.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from portfwd.kernel import nft, openings, othertables
from portfwd.kernel.gwplan import protocols
from portfwd.kernel.othertables import Blocked, Probe
from portfwd.specs import GatewaySpec


def _proto(name: str) -> Literal["tcp", "udp"]:
    return "udp" if name == "udp" else "tcp"


def probes(config: GatewaySpec) -> list[Probe]:
    """The packets of each kind of flow the gateway forwards (after its DNAT): the first one, and
    a reply (each forward's `(replies)` probe, one per protocol, worded alike)."""
    wan, lan = config.wan, config.lan
    out: list[Probe] = []
    for index, rule in enumerate(config.forward):
        what = f"gateway.forward[{index}]"
        several = len(protocols(rule)) > 1  # say which protocol when a rule has two
        first = rule.port.first if rule.pinhole else rule.to.ports.first
        span = len(rule.port) if rule.pinhole or len(rule.to.ports) > 1 else 1
        family: Literal["ip", "ip6"] = "ip6" if rule.pinhole else "ip"
        ports = (first, first + span - 1)
        replies: list[Probe] = []
        for proto in protocols(rule):
            out.append(
                Probe(
                    f"{what} ({proto})" if several else what,
                    family,
                    wan,
                    lan,
                    _proto(proto),
                    rule.to.host,
                    ports,
                    dnat=not rule.pinhole,
                )
            )
            replies.append(  # the LAN host answering the WAN client
                Probe(
                    f"{what} (replies)",
                    family,
                    lan,
                    wan,
                    _proto(proto),
                    None,
                    None,
                    dnat=not rule.pinhole,
                    state="established",
                    saddr=rule.to.host,
                    sport=ports,
                )
            )
        out.extend(replies)
    for index, trigger in enumerate(config.trigger):
        replies = []
        for proto, opened in trigger.open:
            dport = (opened.first, opened.last)
            out.append(
                Probe(f"gateway.trigger[{index}]", "ip", wan, lan, _proto(proto), None, dport, dnat=True)
            )
            replies.append(
                Probe(
                    f"gateway.trigger[{index}] (replies)",
                    "ip",
                    lan,
                    wan,
                    _proto(proto),
                    None,
                    None,
                    dnat=True,
                    state="established",
                    sport=dport,
                )
            )
        out.extend(replies)
    if config.masquerade:
        out.append(Probe("masquerade", "ip", lan, wan, None, None, None, dnat=False))
        out.append(
            Probe("masquerade (replies)", "ip", wan, lan, None, None, None, False, "established", snat=True)
        )
    return out


def findings(config: GatewaySpec, listing: dict[str, Any]) -> list[Blocked]:
    """Where another table's forward chain drops (or may drop) what the gateway forwards, one per
    distinct `line()` in probe order (a forward's tcp and udp replies usually read alike); the
    findings merged away ride along in `alike`, since their openings may still differ."""
    found: dict[str, Blocked] = {}
    for item in othertables.blocked(listing, probes(config)):
        text = line(item)
        first = found.setdefault(text, item)
        if first is not item:
            found[text] = replace(first, alike=(*first.alike, item))
    return list(found.values())


def line(item: Blocked, opening: bool = False) -> str:
    """One finding for people: who, where, why, and the command that fixes it (and, unless
    portfwd is `opening` them already, the setting that lets portfwd do it, where it would:
    a certain policy drop)."""
    where = f"table {item.family} {item.table} chain {item.chain}"
    verb = "drops" if item.certain else "may drop"
    return (
        f"{item.probe.what}: {where} {verb} it ({item.because}), and an accept in portfwd's table cannot "
        f"override that; run: {openings.fix(item)}"
        + ("" if opening or not openings.openable(item) else " (or set gateway.open_other_tables = true)")
    )


def open_(items: list[Blocked]) -> list[str]:
    """Append the accepts `items` need where a chain's policy certainly drops them; returns what
    was opened, one line each. Drop rules, uncertain drops and a fix portfwd cannot make (in a
    table iptables-nft manages) are left to the re-check to report. Raises GatewayError."""
    text = openings.opening(items)
    rules = [row for row in text.splitlines() if row and not row.startswith("#")]
    if rules:
        nft.batch(text, "open the other tables' forward chains")
    return [row.split(" comment ", 1)[0].removeprefix("add rule ") for row in rules]


def close() -> int:
    """Remove the accepts portfwd inserted into other tables; returns how many. Raises GatewayError."""
    found = openings.opened(nft.ruleset())
    if found:
        nft.batch(openings.closing(found), "remove the accepts portfwd added to other tables")
    return len(found)
