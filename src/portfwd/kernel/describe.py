"""The gateway as `portfwd check` and `portfwd gateway plan` show it: problems, a summary, notes.

Plain lines from the spec and from what `ip` and `nft` report (the CLI prints them), so the
kernel layer that applies the ruleset is the one that says what is wrong with it.
"""

from __future__ import annotations

from portfwd.kernel import gwfirewall, gwplan, nft
from portfwd.specs import GatewaySpec


def problems(spec: GatewaySpec) -> tuple[gwplan.Interfaces | None, list[str]]:
    """The interfaces found on this machine (None: one is missing) and every problem, one line each."""
    try:
        found = nft.interfaces(spec)
    except nft.GatewayError as exc:
        return None, [exc.line()]
    return found, gwplan.check(spec, found)


def notes(spec: GatewaySpec, found: gwplan.Interfaces) -> list[str]:
    """Warnings: what the ruleset leaves out on this machine, and what other tables would stop
    (read only where nft can list the ruleset, as root)."""
    blocked = [
        gwfirewall.line(item, spec.open_other_tables) for item in gwfirewall.findings(spec, nft.ruleset())
    ]
    return [*gwplan.notes(spec, found), *blocked]


def summary(spec: GatewaySpec, found: gwplan.Interfaces) -> str:
    """The gateway in one line: WAN and LAN with their addresses, and how many rules."""
    return (
        f"gateway: {spec.wan} ({', '.join(found.wan_addresses) or 'no address'}) -> "
        f"{spec.lan} ({', '.join(map(str, (*found.lan_networks, *found.lan_networks6)))}): "
        f"{len(spec.forward)} forward(s), {len(spec.trigger)} trigger(s); "
        "portfwd gateway plan prints the ruleset"
    )


def plan_notes(changes: list[str] | None, warnings: list[str]) -> list[str]:
    """The comment lines `gateway plan` prints under the ruleset nft -c accepted.

    `changes` is `nft.diff`'s answer (None: the table is not loaded), `warnings` what
    `nft.forwarding_problems` found.
    """
    if changes is None:
        notes = ["# nft -c accepts this ruleset; not loaded now"]
    elif not changes:
        notes = ["# nft -c accepts this ruleset; the live table inet portfwd is the same"]
    else:
        notes = ["# nft -c accepts this ruleset; the live table inet portfwd differs (- live, + this plan):"]
        notes.extend(f"# {line}" for line in changes)
    notes.extend(f"# warning: {problem}" for problem in warnings)
    return notes
