"""The text side of othertables.py's findings: a listed rule shown short, and the accepts that fix a drop.

Kept apart from the evaluator because it answers a different question: othertables.py decides
whether another table's forward chain drops a packet and must never write anything; this module
writes what a person runs (`fix()`) or what portfwd loads with the opt-in (`opening()`), and finds
and removes exactly those rules again by their comment (`opened()`, `closing()`). All pure: text
out, the caller runs nft.

Whose decision a drop is decides what is written. A chain's policy drop is a default: `fix()`
appends the accept (`nft add rule`), after every rule the admin wrote, and `opening()` does the
same, for certain findings only. A drop rule is the admin's own (a blocklist, say): `fix()` names
the accept that would go before it (`nft insert rule ... position HANDLE`, which inserts before
that handle) for a person to judge, and `opening()` never writes it.

Tables managed by iptables-nft (docker's FORWARD policy drop is the common case) get iptables
commands from `fix()`, and `opening()` adds only native rules iptables-nft 1.8.9 can still parse:
a `ct status dnat` or `ct state` rule there makes `iptables-save` refuse the whole table
("incompatible"), so a reply is let through by its source address and port instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # othertables imports render() from here: only the types go the other way
    from portfwd.kernel.othertables import Blocked, Probe

COMMENT_PREFIX = "portfwd gateway: "
COMMENT_MAX = 128  # nft refuses longer rule comments


# --------------------------------------------------------------------------- rendering


def _statement(statement: Any) -> tuple[str, Any] | None:
    if isinstance(statement, dict) and len(statement) == 1:
        kind, body = next(iter(statement.items()))
        if isinstance(kind, str):
            return kind, body
    return None


def _value(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        kind, body = next(iter(value.items()))
        if kind == "set" and isinstance(body, list):
            return "{ " + ", ".join(_value(item) for item in body) + " }"
        if kind == "range" and isinstance(body, list):
            return "-".join(_value(item) for item in body)
        if kind == "prefix" and isinstance(body, dict):
            return f"{body.get('addr')}/{body.get('len')}"
        if kind == "meta" and isinstance(body, dict):
            return f"meta {body.get('key')}"
        if kind == "ct" and isinstance(body, dict):
            return f"ct {body.get('key')}"
        if kind == "payload" and isinstance(body, dict):
            return f"{body.get('protocol')} {body.get('field')}"
        if kind == "&" and isinstance(body, list):
            return " & ".join(_value(item) for item in body)
        return str(kind)
    if isinstance(value, list):
        return ",".join(_value(item) for item in value)
    return str(value)


def render(rule: dict[str, Any], limit: int = 80) -> str:
    """A short nft-like rendering of a listed rule, for messages (`iifname "eth0" drop`)."""
    parts: list[str] = []
    expr = rule.get("expr")
    for statement in expr if isinstance(expr, list) else []:
        parsed = _statement(statement)
        if parsed is None:
            continue
        kind, body = parsed
        if kind == "match" and isinstance(body, dict):
            left = body.get("left")
            key = left.get("meta", {}).get("key") if isinstance(left, dict) else None
            name = str(key) if key in ("iifname", "oifname", "iif", "oif") else _value(left)
            right = body.get("right")
            shown = (
                f'"{right}"'
                if key in ("iifname", "oifname", "iif", "oif") and isinstance(right, str)
                else _value(right)
            )
            op = body.get("op")
            parts.append(f"{name} {shown}" if op in ("==", "in", None) else f"{name} {op} {shown}")
        elif kind in ("jump", "goto") and isinstance(body, dict):
            parts.append(f"{kind} {body.get('target')}")
        elif kind == "xt" and isinstance(body, dict):
            parts.append(f"xt {body.get('type')} {body.get('name')}")
        elif kind != "counter":
            parts.append(kind)
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- the fixes


def _ports(probe: Probe) -> str:
    if probe.dport is None:
        return ""
    first, last = probe.dport
    return str(first) if first == last else f"{first}-{last}"


def _rule_text(item: Blocked) -> str | None:
    """The accept rule for `item` as nft text, or None when none can be written for its table."""
    probe = item.probe
    ifaces = f'iifname "{probe.iif}" oifname "{probe.oif}" '
    if probe.state == "established":
        if not item.iptables:
            return "ct state established,related accept"
        if probe.l4proto is None or probe.sport is None:
            return None  # iptables-nft cannot parse `ct state`; nothing narrower is known
        first, last = probe.sport
        ports = str(first) if first == last else f"{first}-{last}"
        saddr = f"{probe.family} saddr {probe.saddr} " if probe.saddr is not None else ""
        return f"{ifaces}{saddr}{probe.l4proto} sport {ports} accept"
    ports = _ports(probe)
    proto = ""
    if probe.l4proto is not None:
        proto = f"{probe.l4proto} dport {ports} " if ports else f"meta l4proto {probe.l4proto} "
    daddr = f"{probe.family} daddr {probe.daddr} " if probe.daddr is not None else ""
    if probe.dnat:
        if not item.iptables:
            return "ct status dnat accept"
        if not daddr or not proto:
            return None  # iptables-nft cannot parse `ct status`; nothing narrower is known
        return f"{ifaces}{daddr}{proto}accept"
    if daddr:
        return f"{daddr}{proto}accept"
    return f"{ifaces}{proto}accept"


def _shell(word: str) -> str:
    safe = all(ch.isalnum() or ch in " ._:/,-=@+" for ch in word)
    return word if safe else "'" + word.replace("'", "'\"'\"'") + "'"


def _iptables(item: Blocked) -> str:
    probe = item.probe
    binary = "iptables" if item.family == "ip" else "ip6tables"
    if item.at is not None:  # before the rule that drops it (iptables counts rules from 1)
        parts = [binary, "-I", _shell(item.at.chain), str(item.at.number)]
    else:
        parts = [binary, "-A" if item.policy else "-I", _shell(item.chain)]
    if probe.state == "established":
        return " ".join([*parts, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"])
    if probe.dnat:  # one rule for every forward, as `ct status dnat accept` is
        return " ".join([*parts, "-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT"])
    if probe.daddr is None:
        parts += ["-i", _shell(probe.iif), "-o", _shell(probe.oif)]
    else:
        parts += ["-d", probe.daddr]
    if probe.l4proto is not None:
        parts += ["-p", probe.l4proto]
        if probe.dport is not None:
            parts += ["--dport", _ports(probe).replace("-", ":")]
    return " ".join([*parts, "-j", "ACCEPT"])


def fix(item: Blocked) -> str:
    """The command a user runs to let `item.probe` through `item`'s chain, in one line.

    A policy drop gets the accept appended (`nft add rule inet filter forward ct status dnat
    accept`), so every rule already in the chain still runs first; a drop rule (or a `return`
    that hands the packet to the policy early) gets it inserted just before that rule
    (`nft insert rule inet filter forward position 7 ...`). For a table managed by iptables-nft,
    the iptables command (`-A`, or `-I CHAIN NUMBER`), so that iptables can still list the table.
    """
    rule = _rule_text(item)
    if item.iptables or rule is None:
        return _iptables(item)
    head = f"{item.family} {_shell(item.table)}"
    if item.at is not None:
        position = "" if item.at.handle is None else f" position {item.at.handle}"
        return f"nft insert rule {head} {_shell(item.at.chain)}{position} {_shell(rule)}"
    verb = "add" if item.policy else "insert"
    return f"nft {verb} rule {head} {_shell(item.chain)} {_shell(rule)}"


def openable(item: Blocked) -> bool:
    """Whether `opening()` writes the accept for `item`: a certain drop by the chain's policy, past
    every rule of the chain, with a rule its table can hold. Everything else is left to people."""
    return item.appendable and _rule_text(item) is not None


def _comment(what: Sequence[str]) -> str:
    text = COMMENT_PREFIX + what[0] + (f" and {len(what) - 1} more" if len(what) > 1 else "")
    text = text.replace('"', "'")
    return text if len(text) <= COMMENT_MAX else text[: COMMENT_MAX - 3] + "..."


def opening(items: Sequence[Blocked]) -> str:
    """An nft batch (`nft -f -`) appending one accept rule per distinct fix, commented for `opened()`.

    Only certain drops by a chain's policy are opened, at the chain's end (`add rule`): a drop
    rule, a policy reached early, or a drop that is only possible is someone's decision, and is
    left out. Policy drops in a table managed by iptables-nft that no iptables-readable rule can
    describe appear as a `#` comment line naming the iptables command to run.
    """
    wanted: dict[tuple[str, str, str, str], list[str]] = {}
    skipped: list[str] = []
    for item in (one for merged in items for one in (merged, *merged.alike)):
        if not item.appendable:
            continue
        rule = _rule_text(item)
        if rule is None:
            line = f"# {item.family} {item.table} {item.chain} is iptables-nft's: run {_iptables(item)}"
            if line not in skipped:
                skipped.append(line)
            continue
        whats = wanted.setdefault((item.family, item.table, item.chain, rule), [])
        if item.probe.what not in whats:
            whats.append(item.probe.what)
    lines = [
        f'add rule {family} {table} {chain} {rule} comment "{_comment(whats)}"'
        for (family, table, chain, rule), whats in wanted.items()
    ]
    return "".join(line + "\n" for line in [*skipped, *lines])


def opened(
    listing: dict[str, Any], own: tuple[str, str] = ("inet", "portfwd")
) -> list[tuple[str, str, str, int]]:
    """(family, table, chain, handle) of the rules `opening()` inserted outside `own` (by comment)."""
    found: list[tuple[str, str, str, int]] = []
    items = listing.get("nftables") if isinstance(listing, dict) else None
    for item in items if isinstance(items, list) else []:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        comment, handle = rule.get("comment"), rule.get("handle")
        family, table, chain = rule.get("family"), rule.get("table"), rule.get("chain")
        if not (isinstance(comment, str) and comment.startswith(COMMENT_PREFIX)):
            continue
        if isinstance(handle, bool) or not isinstance(handle, int):
            continue
        if (
            isinstance(family, str)
            and isinstance(table, str)
            and isinstance(chain, str)
            and (family, table) != own
        ):
            found.append((family, table, chain, handle))
    return found


def closing(rules: Iterable[tuple[str, str, str, int]]) -> str:
    """An nft batch deleting `rules` (from `opened()`) by handle."""
    return "".join(
        f"delete rule {family} {table} {chain} handle {handle}\n" for family, table, chain, handle in rules
    )
