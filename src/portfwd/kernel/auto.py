"""`relay = "auto"`: the kernel relay whenever it can do the rule's job, else portfwd's own.

The kernel path is the fastest there is (no copy, no context switch per read), so `auto` takes
it when nothing is lost by it. It is not taken, and `portfwd check` says why, when:
- the process cannot load nftables (not root, no CAP_NET_ADMIN, no nft) or will drop privileges
  (`user =`: the table could not be removed at exit);
- the rule uses a feature only userspace has (kernel/relay.py `unsuitable`);
- another table filters the input or forward hook (a policy drop, or a drop or reject rule):
  with NAT the filter sees the target's port and address instead of the listen side's, so a
  firewall written for the userspace relay could stop the kernel's flows;
- a remote target, which the kernel routes, while IP forwarding is off;
- the environment says `PORTFWD_AUTO_KERNEL=0`: an operator's switch to keep `auto` in userspace
  (the test suite sets it, so that only the tests of the kernel relay load nftables on the
  machine that runs them).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from portfwd.addr import HostPorts, is_loopback
from portfwd.kernel import nft
from portfwd.kernel import relay as kernel
from portfwd.specs import RuleSpec

CAP_NET_ADMIN = 12
#: The environment variable that, set to 0, keeps `relay = "auto"` out of the kernel.
SWITCH = "PORTFWD_AUTO_KERNEL"
FILTER_HOOKS = ("input", "forward")


@dataclass(frozen=True, slots=True)
class Box:
    """What the machine allows the kernel relay: read once per start or reload."""

    capable: bool  #: CAP_NET_ADMIN effective and nft installed
    filtering: str | None  #: the first other table's chain that filters input or forward
    forwarding: frozenset[int]  #: IP versions the kernel forwards (4, 6)
    allowed: bool = True  #: not switched off by PORTFWD_AUTO_KERNEL=0


def _capable() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << CAP_NET_ADMIN))
    except (OSError, ValueError, IndexError):
        return False
    return False


def filtering(listing: dict[str, Any]) -> str | None:
    """The first base chain of another table on the input or forward hook that can drop."""
    items = listing.get("nftables", [])
    droppers: set[tuple[str, str]] = set()
    for item in items if isinstance(items, list) else []:
        rule = item.get("rule") if isinstance(item, dict) else None
        if isinstance(rule, dict) and any(
            isinstance(expr, dict) and ("drop" in expr or "reject" in expr) for expr in rule.get("expr", [])
        ):
            droppers.add((str(rule.get("family")), str(rule.get("table"))))
    for item in items if isinstance(items, list) else []:
        chain = item.get("chain") if isinstance(item, dict) else None
        if not isinstance(chain, dict) or chain.get("hook") not in FILTER_HOOKS:
            continue
        family, table = str(chain.get("family")), str(chain.get("table"))
        if table.startswith("portfwd"):
            continue
        if chain.get("policy", "accept") != "accept" or (family, table) in droppers:
            return f"table {family} {table} chain {chain.get('name')}"
    return None


def box() -> Box:
    """Read the machine: capabilities, nft, the other tables' filters, forwarding."""
    allowed = os.environ.get(SWITCH, "1") != "0"
    capable = sys.platform == "linux" and _capable() and shutil.which("nft") is not None
    found = filtering(nft.ruleset()) if capable and allowed else None
    forwarding = frozenset(
        version
        for version, path in ((4, nft.FORWARDING[0][1]), (6, nft.FORWARDING[1][1]))
        if nft.reads_one(path)
    )
    return Box(capable, found, forwarding, allowed)


def why_not(rule: RuleSpec, found: Box, user: str | None) -> str | None:
    """Why `relay = "auto"` does not give `rule` to the kernel (one line), or None: it does."""
    if not found.allowed:
        return f'{SWITCH}=0 keeps relay = "auto" in userspace'
    if not found.capable:
        return "the kernel relay needs root or CAP_NET_ADMIN, and nft"
    if user is not None:
        return "user = drops the capability the kernel relay needs to remove its table at exit"
    if (problem := kernel.unsuitable(rule)) is not None:
        return problem.split(": ", 1)[-1]
    listen, target = rule.listen, rule.connect
    if (
        isinstance(listen, HostPorts)
        and isinstance(target, HostPorts)
        and is_loopback(target.host)
        and not (not listen.is_any and is_loopback(listen.host))
    ):
        return (
            "the kernel reaches a loopback target on the address a client came in to, so a server "
            "bound to the loopback address alone would not see clients from other hosts"
        )
    if found.filtering is not None:
        return f"{found.filtering} filters traffic, and the kernel relay would change what it sees"
    if kernel.needs_forwarding([rule]):
        listen = rule.listen
        version = 6 if isinstance(listen, HostPorts) and ":" in listen.host else 4
        if version not in found.forwarding:
            key = "net.ipv4.ip_forward" if version == 4 else "net.ipv6.conf.all.forwarding"
            return f"a remote target is routed by the kernel, and {key} is off"
    return None


def kernel_rules(rules: tuple[RuleSpec, ...], user: str | None) -> tuple[RuleSpec, ...]:
    """The rules the kernel relays: `relay = "kernel"` ones, and `auto` ones it can take."""
    if not any(rule.relay == "auto" for rule in rules):
        return tuple(rule for rule in rules if rule.relay == "kernel")
    found = box()
    return tuple(
        rule
        for rule in rules
        if rule.relay == "kernel" or (rule.relay == "auto" and why_not(rule, found, user) is None)
    )
