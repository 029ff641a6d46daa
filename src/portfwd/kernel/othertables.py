"""Whether another nftables table's forward hook drops what portfwd's gateway forwards.

An `accept` in table inet portfwd ends only portfwd's own chain: every other base chain on the
forward hook still sees the packet, and a `drop` there (a policy drop, usually) is final. This
module reads `nft -j list ruleset` and, for each packet the gateway needs (a `Probe`: the first
packet of a flow, or a reply in one), says which chains would drop it, why, and where (`Blocked`:
the chain's policy, or the rule that drops it); openings.py turns those findings into the commands
that let the packets through and the accepts portfwd appends itself. It is pure: JSON in, findings
out.

It is hand-written because nothing else evaluates an nftables ruleset against a packet: the
kernel does it only for real packets, nft and libnftables parse and print but never evaluate,
and python3-nftables is a binding to those.

Theory of operation. Every match is tri-state: True, False or Unknown (None) when the rule looks
at something the probe does not fix (the client's address, a mark, a rate limit) or at an
expression this module does not understand. A chain is walked once per probe, and the walk
keeps the set of outcomes that some assignment of the Unknown matches could produce: "some path
accepts", "some path drops (and why)", "some path falls off the end / returns". An Unknown rule
adds its verdict as a possibility and lets the walk go on; a True rule ends the walk. The "main
path" is the one where no Unknown rule matched: its drop reason is the one reported when it
drops. A packet is blocked when some path drops; certainly blocked when no path accepts.
Regular chains reached by `jump`/`goto` are walked the same way (memoised, depth 16, no loops).
A drop is placed: a rule (its chain, handle and position: an accept must go before it), or the
base chain's policy, reached either past the chain's last rule (an accept appended to the chain
is seen, after every rule the admin wrote) or early, by a `return` or a `goto` into a chain that
falls through (then the accept must go before that rule).

Conntrack as the probe sees it: a new probe is the first packet of its flow (ct state new,
direction original, status only dnat when the gateway translated it); an established probe is a
reply in a confirmed flow (ct state established, direction reply, status confirmed and seen-reply,
dnat/snat as the probe says, assured Unknown: it depends on how far the flow has got).

A table is marked as iptables-nft's (`Blocked.iptables`: xt expressions, or iptables' own table
and chain names) so that its fix can be written for iptables, which must still list the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from portfwd.kernel import nftjson
from portfwd.kernel.nftjson import NFPROTO, PROTOCOLS, Interval, Tri
from portfwd.kernel.openings import render

MAX_DEPTH = 16

PORTED = {"tcp", "udp", "sctp", "dccp", "udplite"}
# Statements with side effects only: they neither stop a rule from matching nor end the chain.
IGNORED = {
    "counter", "log", "mangle", "set", "map", "ct helper", "ct timeout", "ct expectation",
    "notrack", "dup", "secmark", "last", "flow",
}  # fmt: skip
XT_HARMLESS_TARGETS = {"LOG", "NFLOG", "MARK", "CONNMARK", "TCPMSS", "CT", "NOTRACK", "CLASSIFY", "TRACE"}


@dataclass(frozen=True, slots=True)
class Probe:
    """A packet portfwd's gateway needs the forward hook to accept: the first one of a flow
    (`state="new"`), or a reply in one (`state="established"`)."""

    what: str  # who needs it, for messages: "gateway.forward[0]", "masquerade", "hairpin"
    family: Literal["ip", "ip6"]
    iif: str
    oif: str
    l4proto: Literal["tcp", "udp"] | None  # None: any (masquerade)
    daddr: str | None  # the destination after DNAT, None: unknown/any
    dport: tuple[int, int] | None  # destination port range after DNAT, None: any
    dnat: bool  # ct status has dnat
    state: Literal["new", "established"] = "new"  # established: a reply (ct direction reply)
    saddr: str | None = None  # the source, None: unknown/any (a client is anyone)
    sport: tuple[int, int] | None = None  # source port range, None: any
    snat: bool = False  # ct status has snat (a reply to a masqueraded flow)


@dataclass(frozen=True, slots=True)
class RuleAt:
    """Where a rule is: its chain, its handle (None if the listing had none) and its 1-based
    position in that chain (what iptables calls the rule number)."""

    chain: str
    handle: int | None
    number: int


@dataclass(frozen=True, slots=True)
class Blocked:
    """Another table's forward base chain that drops `probe` (surely, or unless an Unknown rule matches)."""

    probe: Probe
    family: str
    table: str
    chain: str
    certain: bool
    because: str  # "policy drop", or 'rule 7: iifname "eth0" drop'
    iptables: bool = False  # the table is managed by iptables-nft: fix it with iptables
    policy: bool = False  # the drop is the chain's policy, not a rule someone wrote
    at: RuleAt | None = None  # the rule an accept must come before; None: the chain's end (or unknown)
    alike: tuple[Blocked, ...] = ()  # findings merged into this one: they read the same, open apart

    @property
    def appendable(self) -> bool:
        """Certainly dropped by the policy after every rule of the chain: an appended accept fixes it
        and leaves every rule the admin wrote in front of it."""
        return self.certain and self.policy and self.at is None


CT_STATES = ("new", "established", "related", "invalid", "untracked")
CT_STATUS_ABSENT = ("confirmed", "seen-reply", "assured", "expected", "dying")


@dataclass(slots=True)
class _Context:
    probe: Probe
    table: nftjson.Table

    def elements(self, right: Any) -> list[Any] | None:
        """The elements a right-hand side stands for; None: a set whose contents cannot be trusted."""
        if isinstance(right, str) and right.startswith("@"):
            named = self.table.sets.get(right[1:])
            if named is None:
                return None
            flags = named.get("flags")
            if isinstance(flags, list) and ("dynamic" in flags or "timeout" in flags):
                return None
            found = named.get("elem", [])
            return list(found) if isinstance(found, list) else None
        if isinstance(right, dict) and "set" in right:
            found = right["set"]
            return list(found) if isinstance(found, list) else [found]
        return [right]

    # ---------------------------------------------------------------- left-hand sides

    def bits(self, key: str) -> tuple[dict[str, Tri], bool]:
        """The probe's ct state/status bits by name, and whether that list is the whole word."""
        probe = self.probe
        if key == "state":
            return {state: state == probe.state for state in CT_STATES}, True
        status: dict[str, Tri] = dict.fromkeys(CT_STATUS_ABSENT, False)
        status["dnat"] = probe.dnat
        status["snat"] = probe.snat
        if probe.state == "established":
            # a reply: the flow was confirmed when its first packet left, and conntrack marks
            # seen-reply before the forward hook; assured depends on the protocol's progress
            status.update({"confirmed": True, "seen-reply": True, "assured": None})
        return status, False

    def dependency(self, protocol: str) -> Tri | str:
        """Whether the probe has header `protocol`, and the value domain of its fields ("" if none)."""
        probe = self.probe
        if protocol in ("ip", "ip6"):
            return probe.family == protocol
        if protocol == "th":
            return None if probe.l4proto is None else probe.l4proto in PORTED
        if protocol in PROTOCOLS:
            if (protocol == "icmp" and probe.family == "ip6") or (
                protocol == "icmpv6" and probe.family == "ip"
            ):
                return False
            return None if probe.l4proto is None else probe.l4proto == protocol
        return "unknown"

    def match(self, body: Any) -> Tri:
        if not isinstance(body, dict):
            return None
        op = body.get("op", "==")
        left, right = body.get("left"), body.get("right")
        if not isinstance(left, dict) or len(left) != 1 or not isinstance(op, str):
            return None
        kind, spec = next(iter(left.items()))
        if not isinstance(spec, dict) and kind != "&":
            return None
        probe = self.probe
        if kind == "&":
            return self.masked(spec, op, right)
        if kind == "ct" and "dir" not in spec and spec.get("key") in ("state", "status"):
            return self.flags(str(spec["key"]), op, right)
        if kind == "ct" and "dir" not in spec and spec.get("key") == "direction":
            direction = "original" if probe.state == "new" else "reply"
            found = self.compare("==", right, lambda element: element == direction)
            return found if op in ("==", "in") else nftjson.tri_not(found) if op == "!=" else None
        if kind == "meta":
            key = spec.get("key")
            if key in ("iifname", "oifname", "iif", "oif"):
                name = probe.iif if key in ("iifname", "iif") else probe.oif
                return self.compare(op, right, lambda element: nftjson.iface(name, element))
            if key == "l4proto":
                if probe.l4proto is None:
                    return None
                return self.numeric(op, right, (0, PROTOCOLS[probe.l4proto]), "proto")
            if key == "nfproto":
                return self.numeric(
                    op, right, (0, NFPROTO["ipv4" if probe.family == "ip" else "ipv6"]), "nfproto"
                )
            return None
        if kind == "payload":
            protocol, name = spec.get("protocol"), spec.get("field")
            if not isinstance(protocol, str) or not isinstance(name, str):
                return None
            present = self.dependency(protocol)
            if isinstance(present, str):
                return None
            if present is False:
                return False
            return nftjson.tri_and(present, self.field(protocol, name, op, right))
        return None

    def field(self, protocol: str, name: str, op: str, right: Any) -> Tri:
        probe = self.probe
        if protocol in ("ip", "ip6") and name in ("daddr", "saddr"):
            address = probe.daddr if name == "daddr" else probe.saddr
            found = None if address is None else nftjson.address(address)
            return None if found is None else self.numeric(op, right, (found[0], found[1]), "addr", found[2])
        if (protocol, name) in (("ip", "protocol"), ("ip6", "nexthdr")):
            if probe.l4proto is None:
                return None
            return self.numeric(op, right, (0, PROTOCOLS[probe.l4proto]), "proto")
        ports = probe.dport if name == "dport" else probe.sport if name == "sport" else None
        if protocol in PORTED | {"th"} and ports is not None:
            first, last = ports
            return self.numeric(op, right, (0, first), "port", last)
        return None  # an address or port the probe leaves open (a client is anyone), flags, ...

    # ---------------------------------------------------------------- comparisons

    def compare(self, op: str, right: Any, member: Any) -> Tri:
        elements = self.elements(right)
        if elements is None:
            return None
        found = nftjson.tri_or(member(element) for element in elements)
        if op in ("==", "in"):
            return found
        if op == "!=":
            return nftjson.tri_not(found)
        return None

    def numeric(
        self, op: str, right: Any, start: tuple[int, int], domain: str, end: int | None = None
    ) -> Tri:
        space, low = start
        probe: Interval = (space, low, low if end is None else end)
        if op in ("<", ">", "<=", ">="):
            bound = nftjson.interval(right, domain)
            if bound is None:
                return None
            edge = bound[1]
            ceiling = 2**128
            span = {"<": (0, edge - 1), "<=": (0, edge), ">": (edge + 1, ceiling), ">=": (edge, ceiling)}[op]
            return nftjson.covers(probe, [(bound[0], *span)])
        elements = self.elements(right)
        if elements is None:
            return None
        found = nftjson.covers(probe, [nftjson.interval(element, domain) for element in elements])
        if op in ("==", "in"):
            return found
        if op == "!=":
            return nftjson.tri_not(found)
        return None

    def flags(self, key: str, op: str, right: Any) -> Tri:
        bits, complete = self.bits(key)
        if op == "in" or (op == "==" and isinstance(right, list)):
            names = right if isinstance(right, list) else [right]
            if op == "==":
                return self.exact(bits, complete, names)
            return nftjson.tri_or(bits.get(name) if isinstance(name, str) else None for name in names)
        if op not in ("==", "!="):
            return None
        elements = self.elements(right)
        if elements is None:
            return None
        found = nftjson.tri_or(
            self.exact(bits, complete, element if isinstance(element, list) else [element])
            for element in elements
        )
        return found if op == "==" else nftjson.tri_not(found)

    @staticmethod
    def exact(bits: dict[str, Tri], complete: bool, names: list[Any]) -> Tri:
        """Whether the ct word is exactly the bits `names`."""
        if not all(isinstance(name, str) for name in names):
            return None
        result: Tri = True if complete else None
        for name in names:
            result = nftjson.tri_and(result, bits.get(name))
        for name, value in bits.items():
            if name not in names:
                result = nftjson.tri_and(result, nftjson.tri_not(value))
        return result

    def masked(self, spec: Any, op: str, right: Any) -> Tri:
        """`ct status & dnat == dnat`: the bits under the mask equal `right`'s."""
        if not isinstance(spec, list) or len(spec) != 2 or op not in ("==", "!="):
            return None
        ct, mask = spec
        if not isinstance(ct, dict) or not isinstance(ct.get("ct"), dict):
            return None
        key = ct["ct"].get("key")
        if key not in ("state", "status") or "dir" in ct["ct"]:
            return None
        bits, _ = self.bits(str(key))
        masks = mask if isinstance(mask, list) else [mask]
        wanted = right if isinstance(right, list) else [] if right == 0 else [right]
        result: Tri = True
        for name in masks:
            if not isinstance(name, str):
                return None
            bit = bits.get(name)
            result = nftjson.tri_and(result, bit if name in wanted else nftjson.tri_not(bit))
        return result if op == "==" else nftjson.tri_not(result)


# --------------------------------------------------------------------------- rules and chains


Verdict = tuple[str, str]  # ("accept"|"drop"|"queue"|"return"|"continue"|"jump"|"goto", target)
VERDICTS = {"accept", "drop", "reject", "queue", "return", "continue", "jump", "goto"}


def _verdict(kind: str, body: Any) -> Verdict | None:
    if kind not in VERDICTS:
        return None
    if kind in ("jump", "goto"):
        target = body.get("target") if isinstance(body, dict) else None
        return (kind, target) if isinstance(target, str) else None
    return ("drop" if kind == "reject" else kind, "")


def _statement(statement: Any) -> tuple[str, Any] | None:
    if isinstance(statement, dict) and len(statement) == 1:
        kind, body = next(iter(statement.items()))
        if isinstance(kind, str):
            return kind, body
    return None


def _rule(context: _Context, rule: dict[str, Any]) -> list[tuple[Tri, Verdict]]:
    """The rule as alternatives (condition, verdict); a verdict map gives one per element."""
    expr = rule.get("expr")
    if not isinstance(expr, list):
        return []
    condition: Tri = True
    for statement in expr:
        parsed = _statement(statement)
        if parsed is None:
            condition = nftjson.tri_and(condition, None)
            continue
        kind, body = parsed
        if kind == "match":
            condition = nftjson.tri_and(condition, context.match(body))
        elif kind in VERDICTS:
            verdict = _verdict(kind, body)
            return [(condition if verdict else nftjson.tri_and(condition, None), verdict or ("queue", ""))]
        elif kind == "vmap":
            return [(nftjson.tri_and(condition, when), verdict) for when, verdict in _vmap(context, body)]
        elif kind == "xt" and isinstance(body, dict) and body.get("type") == "target":
            if body.get("name") in ("REJECT", "DROP"):
                return [(condition, ("drop", ""))]
            if body.get("name") not in XT_HARMLESS_TARGETS:
                condition = nftjson.tri_and(condition, None)
        elif kind not in IGNORED:
            condition = nftjson.tri_and(condition, None)  # limit, quota, xt match, ct count, ...
        if condition is False:
            return []
    return []


def _vmap(context: _Context, body: Any) -> list[tuple[Tri, Verdict]]:
    if not isinstance(body, dict):
        return [(None, ("queue", ""))]
    key, data = body.get("key"), body.get("data")
    pairs = context.elements(data) if isinstance(data, (str, dict)) else None
    if pairs is None:
        return [(None, ("queue", ""))]  # a verdict map we cannot read: any verdict is possible
    out: list[tuple[Tri, Verdict]] = []
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2 or _statement(pair[1]) is None:
            out.append((None, ("queue", "")))
            continue
        kind, verdict_body = _statement(pair[1]) or ("", None)
        verdict = _verdict(kind, verdict_body) or ("queue", "")
        out.append((context.match({"op": "==", "left": key, "right": pair[0]}), verdict))
    return out


@dataclass(frozen=True, slots=True)
class _Why:
    """Why a path drops, for people, and where: the rule (None: the base chain's policy)."""

    text: str
    at: RuleAt | None = None
    policy: bool = False


LEFT = "return"  # the main path left the chain early: a `return`, or a `goto` that fell through


@dataclass(slots=True)
class _Outcome:
    accept: bool = False  # some path accepts
    drops: list[_Why] = field(default_factory=list)  # why some paths drop, in order
    fall: bool = False  # some path returns to the caller
    main: str | _Why | None = None  # the main path: "accept", "fall" (past the last rule), LEFT, or a drop
    left: RuleAt | None = None  # with main LEFT: the rule of this chain where it left
    settled: bool = False

    def settle(self, main: str | _Why, left: RuleAt | None = None) -> None:
        if not self.settled:
            self.main, self.left, self.settled = main, left, True


def _unknown(reason: _Why) -> _Outcome:
    return _Outcome(accept=True, drops=[reason], fall=True, main="fall", settled=True)


@dataclass(slots=True)
class _Walker:
    context: _Context
    base: str
    memo: dict[str, _Outcome] = field(default_factory=dict)

    def walk(self, chain: str, depth: int, stack: tuple[str, ...]) -> _Outcome | None:
        if chain in self.memo:
            return self.memo[chain]
        rules = self.context.table.rules.get(chain)
        if rules is None or depth > MAX_DEPTH or chain in stack:
            return None
        out = _Outcome()
        for number, rule in enumerate(rules, 1):
            for condition, verdict in _rule(self.context, rule):
                if condition is False:
                    continue
                at = RuleAt(chain, _handle(rule), number)
                if self.take(out, condition, verdict, rule, at, depth, stack):
                    self.memo[chain] = out
                    return out
        out.fall = True
        out.settle("fall")
        self.memo[chain] = out
        return out

    def take(
        self,
        out: _Outcome,
        condition: Tri,
        verdict: Verdict,
        rule: dict[str, Any],
        at: RuleAt,
        depth: int,
        stack: tuple[str, ...],
    ) -> bool:
        """Add one rule's possible outcome; True when no path goes on past it."""
        kind, target = verdict
        definite = condition is True
        reason = _Why(_reason(rule, at.chain, self.base), at)
        if kind == "accept":
            out.accept = True
            if definite:
                out.settle("accept")
        elif kind in ("drop", "queue"):
            out.drops.append(reason)
            out.accept = out.accept or kind == "queue"
            if definite:
                out.settle(reason)
        elif kind == "return":
            out.fall = True
            if definite:
                out.settle(LEFT, at)
        elif kind in ("jump", "goto"):
            sub = self.walk(target, depth + 1, (*stack, at.chain)) or _unknown(
                _Why(f"{reason.text} (not followed)", at)
            )
            out.accept = out.accept or sub.accept
            out.drops.extend(sub.drops)
            out.fall = out.fall or (kind == "goto" and sub.fall)
            through = sub.main in ("fall", LEFT)  # the sub-chain hands the packet back
            if definite and kind == "goto" and through:
                out.settle(LEFT, at)
            elif definite and not through:
                out.settle(sub.main or "fall")
            return definite and (kind == "goto" or not sub.fall)
        else:
            return False
        return definite

    def verdict(self, policy: str) -> tuple[bool, _Why] | None:
        """(certain, why) when the base chain may drop the probe, else None."""
        out = self.walk(self.base, 0, ()) or _unknown(_Why("the chain could not be read"))
        if out.fall:
            if policy == "drop":
                out.drops.append(_Why("policy drop", policy=True))
            else:
                out.accept = True
        if not out.drops:
            return None
        main = out.main if isinstance(out.main, _Why) else None
        if out.main in ("fall", LEFT) and policy == "drop":
            main = _Why("policy drop", out.left if out.main == LEFT else None, policy=True)
        return (not out.accept, main or out.drops[0])


def _handle(rule: dict[str, Any]) -> int | None:
    handle = rule.get("handle")
    return handle if isinstance(handle, int) and not isinstance(handle, bool) else None


def _reason(rule: dict[str, Any], chain: str, base: str) -> str:
    where = "" if chain == base else f" in chain {chain}"
    return f"rule {rule.get('handle', '?')}{where}: {render(rule)}"


# --------------------------------------------------------------------------- the public verbs


def blocked(
    listing: dict[str, Any], probes: Sequence[Probe], own: tuple[str, str] = ("inet", "portfwd")
) -> list[Blocked]:
    """Every (probe, other table's forward base chain) where that chain may drop the probe.

    `listing` is `nft -j list ruleset` parsed. Never raises on odd JSON: what it cannot read
    counts as Unknown, which at worst turns a finding into certain=False.
    """
    found: list[Blocked] = []
    tables = nftjson.read_tables(listing)
    for probe in probes:
        for (family, name), table in tables.items():
            if (family, name) == own or not nftjson.applies(family, probe.family):
                continue
            for chain, policy in table.base:
                context = _Context(probe, table)
                result = _Walker(context, chain).verdict(policy)
                if result is not None:
                    certain, why = result
                    found.append(
                        Blocked(
                            probe, family, name, chain, certain, why.text, table.iptables, why.policy, why.at
                        )
                    )
    return found
