"""What the gateway needs the other tables' forward chains to let through, and the openings
portfwd makes there when `open_other_tables = true`.

An accept in table inet portfwd cannot override a drop in another table's forward chain (the
usual `inet filter` with `policy drop`, or docker's iptables FORWARD policy): the gateway would
say "applied" and carry nothing. `findings()` evaluates the live ruleset (othertables.py) for
each packet the gateway forwards; the CLI and the service report each finding in one line with
the command that fixes it, or, with the opt-in, insert those accepts (commented, so that
`close()` removes exactly them when the gateway goes).
"""

from __future__ import annotations

from typing import Any, Literal

from portfwd.kernel import nft, openings, othertables
from portfwd.kernel.gwplan import protocols
from portfwd.kernel.othertables import Blocked, Probe
from portfwd.specs import GatewaySpec


def _proto(name: str) -> Literal["tcp", "udp"]:
    return "udp" if name == "udp" else "tcp"


def probes(config: GatewaySpec) -> list[Probe]:
    """The first packet of each kind of flow the gateway forwards (after its DNAT)."""
    wan, lan = config.wan, config.lan
    out: list[Probe] = []
    for index, rule in enumerate(config.forward):
        what = f"gateway.forward[{index}]"
        several = len(protocols(rule)) > 1  # say which protocol when a rule has two
        first = rule.port.first if rule.pinhole else rule.to.ports.first
        span = len(rule.port) if rule.pinhole or len(rule.to.ports) > 1 else 1
        family: Literal["ip", "ip6"] = "ip6" if rule.pinhole else "ip"
        for proto in protocols(rule):
            dport = (first, first + span - 1)
            out.append(
                Probe(
                    f"{what} ({proto})" if several else what,
                    family,
                    wan,
                    lan,
                    _proto(proto),
                    rule.to.host,
                    dport,
                    dnat=not rule.pinhole,
                )
            )
    for index, trigger in enumerate(config.trigger):
        for proto, opened in trigger.open:
            dport = (opened.first, opened.last)
            out.append(
                Probe(f"gateway.trigger[{index}]", "ip", wan, lan, _proto(proto), None, dport, dnat=True)
            )
    if config.masquerade:
        out.append(Probe("masquerade", "ip", lan, wan, None, None, None, dnat=False))
    return out


def findings(config: GatewaySpec, listing: dict[str, Any]) -> list[Blocked]:
    """Where another table's forward chain drops (or may drop) what the gateway forwards."""
    return othertables.blocked(listing, probes(config))


def line(item: Blocked, opening: bool = False) -> str:
    """One finding for people: who, where, why, and the command that fixes it (and, unless
    portfwd is `opening` them already, the setting that lets portfwd do it)."""
    where = f"table {item.family} {item.table} chain {item.chain}"
    verb = "drops" if item.certain else "may drop"
    return (
        f"{item.probe.what}: {where} {verb} it ({item.because}), and an accept in portfwd's table cannot "
        f"override that; run: {openings.fix(item)}"
        + ("" if opening else " (or set gateway.open_other_tables = true)")
    )


def open_(items: list[Blocked]) -> list[str]:
    """Insert the accepts `items` need; returns what was opened, one line each (a fix portfwd
    cannot make, in a table iptables-nft manages, is left to the re-check to report). Raises
    GatewayError."""
    text = openings.opening(items)
    rules = [row for row in text.splitlines() if row and not row.startswith("#")]
    if rules:
        nft.batch(text, "open the other tables' forward chains")
    return [row.split(" comment ", 1)[0].removeprefix("insert rule ") for row in rules]


def close() -> int:
    """Remove the accepts portfwd inserted into other tables; returns how many. Raises GatewayError."""
    found = openings.opened(nft.ruleset())
    if found:
        nft.batch(openings.closing(found), "remove the accepts portfwd added to other tables")
    return len(found)
