"""`relay = "kernel"`: a `[[forward]]` rule compiled into nftables NAT instead of relayed in userspace.

Why: once the first packet of a flow is translated, conntrack carries every later packet inside
the kernel, with no copy to userspace, no socket pair and no context switch per read; no
userspace relay (not even splice) is faster. This module is pure (rules in, nft text out);
relaytable.py's `apply()` replaces the instance's own table in one nft transaction, as `nft.py`
does for the gateway. One table per portfwd instance (`table inet <table>`), so its `remove()`
is one `delete table`.

What each rule becomes, per protocol and per address family it can carry:

- listen on `*`: packets to any address of this host (`meta nfproto ipvN fib daddr type local`),
  both families; on 0.0.0.0 / `::` the same for IPv4 / IPv6 only, as the userspace relay binds
  them; a specific address: `ip daddr X` / `ip6 daddr X`.
- a local target (a loopback address, `localhost`, 0.0.0.0 / ::): `redirect` in prerouting
  (clients on other hosts) and in the nat output chain (clients on this host). A target that is
  the listen address itself is DNATed to that address instead, which keeps the address exact.
- a remote target: `dnat`, plus `masquerade` in postrouting for exactly these flows (conntrack
  says: DNATed, originally to our listen port and address, now answered by our target from our
  target port), so the target needs no route back to the client and no other DNAT on the box
  is masqueraded.
- a port range keeps its offset through a map from listen port to target port.
- deny, then allow (named interval sets, both families) refuse the first packet (a TCP reset,
  as a userspace rule closes a refused client at once; UDP is dropped, as in userspace); then
  per-source routes (named sets, first match wins), then the rule's own target, as in
  `acl.AccessPolicy`.
- counters: four named counters per rule, their comments its label (`comment()`) plus a
  suffix: new flows, refused first packets, bytes up and bytes down, IP headers included
  (relaytable.py's `counts()` reads them from `listing()`, which lists only the counters); a
  fifth while the rule drains.
- an operator's mode (the web API's pause and drain), first in the rule's NAT chains, which see
  only a flow's first packet, so live flows never notice: paused, a new flow's first packet is
  dropped (a TCP client retries its SYN, 1 s, 3 s, 7 s later, and gets through after the
  resume: it waited, as in a userspace rule's backlog, though Linux gives up after about two
  minutes of retries); draining, it is refused as a denied client is (TCP reset, UDP dropped)
  and counted as `draining`. A local UDP sender sees the drop as EPERM from sendto().

Theory of operation: every packet does the same work whatever the number of rules. Each hook's
base chain holds one lookup per protocol in a verdict map (`_LOOKUPS`): nat prerouting and
output by destination port (`tcp dport vmap @pre_tcp`), postrouting (masquerade) and the two
count chains (filter prerouting and output, after NAT; `iif != "lo"` on prerouting, as a
loopback packet was counted on output) by the flow's original destination port (`ct status
dnat ct original proto-dst vmap @count_tcp`). The map jumps to the rule's own chain (`rule_N`,
`rule_N_out` when local clients need another match, `masq_N`, `count_N`), which does the exact
match, as the rule's lines did in one long chain before. Map intervals may not overlap, so a
port several rules share (different listen addresses) jumps to a chain that jumps to each of
their chains in rule order (first match wins, as before; `_segments()`).

Caveats, all seen on this kernel (6.18, nft 1.0.6):

- Redirect semantics (as iptables REDIRECT): a packet from another host is redirected to the
  primary address of the interface it came in on, a local one to 127.0.0.1 / ::1. The server
  must listen on the wildcard address (or on both of those), not on the loopback address alone.
- There is no listening socket: nothing shows in `ss -l`, a port conflict with a real listener
  is not detected (the NAT wins), and nothing refuses a client when the target is down (the
  target's own RST or ICMP reaches the client).
- Forwarding to another host needs net.ipv4.ip_forward=1 (net.ipv6.conf.all.forwarding=1 for
  IPv6): see `needs_forwarding()`. A forward-hook filter of another table (a `policy drop`
  firewall) still applies to these flows.
- Clients on this host that connect to a loopback address cannot reach a remote target: a packet
  from 127.0.0.1 may not leave the box (route_localnet), so the output chain leaves loopback
  destinations alone for remote targets; local clients use one of the host's other addresses.
- Masquerade makes the target see this host's address, not the client's (the kernel relay is
  not transparent). UDP and TCP idle times are conntrack's (nf_conntrack_udp_timeout*, ...).
- nft 1.0.6 refuses `priority dstnat` on a nat output chain (`priority -100` is used), takes
  `typeof ct original proto-dst` as "invalid" and refuses it in a concatenation (variable size),
  so the maps are `type inet_service : verdict`, one per protocol.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from portfwd.addr import HostPorts, PortRange, UnixPath
from portfwd.errors import RuntimeFailure
from portfwd.specs import HealthSpec, Network, RuleSpec

FAMILY = "inet"
#: Limit of an nft comment, in bytes.
COMMENT_MAX = 128
LOCALHOST = ("localhost", "localhost.")
#: Suffixes of the comments on a rule's guard (deny/allow) and per-direction count rules.
DENIED, UP, DOWN, DRAINING, PAUSED = " (denied)", " (up)", " (down)", " (draining)", " (paused)"
#: The operator's modes (web/actions.py's MODES) a plan can hold for a rule.
PAUSED_MODE, DRAINING_MODE = "paused", "draining"
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_DEFAULTS = RuleSpec(label="", name=None, listen=HostPorts("", PortRange(1, 1)), connect=UnixPath("/"))

Version = Literal[4, 6]


class KernelRelayError(RuntimeFailure):
    """A kernel relay plan cannot be built, loaded or removed; the message names the rule."""


# --------------------------------------------------------------------------- what fits


def _version(host: str) -> Version | None:
    """4 or 6 for an IP literal, None for anything else (a name, the wildcard)."""
    try:
        return 4 if ipaddress.ip_address(host).version == 4 else 6
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    if host.lower() in LOCALHOST:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _target_problem(target: object, key: str) -> str | None:
    if isinstance(target, UnixPath):
        return f"{key}: a Unix socket target needs userspace"
    assert isinstance(target, HostPorts)
    if "%" in target.host:
        return f"{key}: a scoped IPv6 address (%zone) needs userspace"
    if _version(target.host) is None and target.host.lower() not in LOCALHOST:
        return (
            f"{key}: host name {target.host!r} needs userspace (the kernel resolves no names); "
            "write an IP address"
        )
    return None


def _features(rule: RuleSpec, where: str) -> str | None:
    """The first userspace-only feature the rule uses (non-default value), as a line."""
    checks: tuple[tuple[bool, str], ...] = (
        (rule.proxy_protocol != 0, "proxy_protocol needs userspace"),
        (rule.accept_proxy or bool(rule.trusted_proxies), "accept_proxy needs userspace"),
        (bool(rule.backends), "several backends need userspace (for now)"),
        (rule.health != HealthSpec(), "health checks need userspace (for now)"),
        (rule.balance != _DEFAULTS.balance, "balance needs userspace (for now)"),
        (rule.max_connections != 0, "max_connections needs userspace"),
        (rule.max_connections_per_source != 0, "max_connections_per_source needs userspace"),
        (rule.rate is not None, "rate needs userspace"),
        (rule.bandwidth != 0, "bandwidth needs userspace"),
        (rule.bandwidth_per_connection != 0, "bandwidth_per_connection needs userspace"),
        (rule.idle_timeout is not None, "idle_timeout needs userspace (the kernel keeps conntrack's)"),
        (
            rule.udp_idle_timeout != _DEFAULTS.udp_idle_timeout,
            "udp_idle_timeout needs userspace (the kernel keeps conntrack's UDP timeouts)",
        ),
        (rule.udp_max_flows != _DEFAULTS.udp_max_flows, "udp_max_flows needs userspace"),
        (rule.transparent, "transparent needs userspace (the kernel relay masquerades)"),
        (rule.dual_stack, "dual_stack needs userspace"),
    )
    for used, why in checks:
        if used:
            return f"{where}: {why}"
    return None


def unsuitable(rule: RuleSpec) -> str | None:
    """Why `rule` cannot be a kernel relay (one line naming the key, for `portfwd check`), or None.

    Refused: Unix sockets on either side, a host name as a target (a route's too), a scoped IPv6
    address, listen and target of different families (no NAT64), a loopback listen with a remote
    target (needs route_localnet), routes to a backend, and every userspace-only setting with a
    value other than its default. Settings that have no meaning without a socket in the middle
    (`connect_timeout`, `backlog`, `reuseport`, `tcp_keepalive`, `relay`) are ignored: the
    client and the target talk end to end, with their own timeouts and keepalives.
    """
    where = rule.where
    if isinstance(rule.listen, UnixPath):
        return f"{where}.listen: a Unix socket listener needs userspace"
    if "%" in rule.listen.host:
        return f"{where}.listen: a scoped IPv6 address (%zone) needs userspace"
    if not rule.listen.is_any and _version(rule.listen.host) is None:
        return f"{where}.listen: host name {rule.listen.host!r} needs userspace; write an IP address or *"
    if (problem := _features(rule, where)) is not None:
        return problem
    targets: list[tuple[str, object]] = [(f"{where}.connect", rule.connect)]
    for index, route in enumerate(rule.route):
        key = f"{where}.route[{index}]"
        if route.backend is not None:
            return f"{key}.backend: routes to a backend need userspace (for now)"
        targets.append((f"{key}.connect", route.connect))
    listen = rule.listen
    for key, target in targets:
        if (problem := _target_problem(target, key)) is not None:
            return problem
        assert isinstance(target, HostPorts)
        if len(target.ports) not in (1, len(listen.ports)):
            return f"{key}: a port range must be as long as the listen range ({listen.ports})"
        if not listen.is_any and _is_loopback(listen.host) and not _is_local(listen, target):
            return (
                f"{key}: a loopback-only listen with a remote target needs userspace "
                "(the kernel would need net.ipv4.conf.*.route_localnet=1)"
            )
        if not listen.is_any and not _carries(target, _version(listen.host) or 0):
            return f"{key}: the listen address and the target are of different IP versions (no NAT64)"
    for index, route in enumerate(rule.route):
        assert isinstance(route.connect, HostPorts)
        for net in route.source:
            if not _carries(route.connect, net.version):
                return (
                    f"{where}.route[{index}].source: {net} is IPv{net.version} but the route's target "
                    f"{route.connect} is not (no NAT64)"
                )
    return None


def needs_forwarding(rules: Sequence[RuleSpec]) -> bool:
    """True when a rule has a remote target: flows from other hosts are then routed through
    this host, which needs net.ipv4.ip_forward=1 (net.ipv6.conf.all.forwarding=1 for IPv6)."""
    for rule in rules:
        if not isinstance(rule.listen, HostPorts):
            continue
        for target in (rule.connect, *(route.connect for route in rule.route)):
            if isinstance(target, HostPorts) and not _is_local(rule.listen, target):
                return True
    return False


# --------------------------------------------------------------------------- the plan


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_wildcard(listen: HostPorts) -> bool:
    """True when a rule listens on every local address, as the userspace relay binds them: `*`
    (both IP versions), `0.0.0.0` (every IPv4 one) or `::` (every IPv6 one)."""
    return listen.is_any or _is_unspecified(listen.host)


def _is_here(host: str) -> bool:
    """True for a target on this host whatever the listen address: loopback, `localhost`, or
    0.0.0.0 / :: (a connect() there reaches this host)."""
    return _is_loopback(host) or _is_unspecified(host)


def _is_local(listen: HostPorts, target: HostPorts) -> bool:
    """True when the target is on this host: a loopback address, or the listen address itself."""
    return _is_here(target.host) or (not _is_wildcard(listen) and target.host == listen.host)


def _carries(target: HostPorts, version: int) -> bool:
    """True when `target` can take flows of this IP version (`localhost` takes both)."""
    return target.host.lower() in LOCALHOST or _version(target.host) == version


def comment(rule: RuleSpec) -> str:
    """The nft comment of a rule's nft rules: its label, made safe for nft (no quotes, <= 128 bytes)."""
    text = "".join(char if char.isprintable() and char not in '"\\' else "_" for char in rule.label)
    room = COMMENT_MAX - max(map(len, (DENIED, UP, DOWN, DRAINING, PAUSED)))  # the suffixes go after it
    return text.encode()[:room].decode(errors="ignore") or "forward"


def _ports(ports: PortRange) -> str:
    return str(ports.first) if len(ports) == 1 else f"{ports.first}-{ports.last}"


def _elements(networks: Iterable[Network], version: int) -> list[str]:
    """The networks of one IP version, merged: nft refuses overlapping intervals in a set."""
    if version == 4:
        v4 = [net for net in networks if isinstance(net, ipaddress.IPv4Network)]
        return [str(net) for net in ipaddress.collapse_addresses(v4)]
    v6 = [net for net in networks if isinstance(net, ipaddress.IPv6Network)]
    return [str(net) for net in ipaddress.collapse_addresses(v6)]


@dataclass(frozen=True, slots=True)
class _Flow:
    """One target of one rule (its own, or a route's), for one protocol and IP version."""

    index: int
    key: str  #: "" for the rule's own target, "_rN" for route N (names its port map)
    listen: HostPorts
    target: HostPorts
    proto: str
    version: Version

    @property
    def ip(self) -> str:
        return "ip" if self.version == 4 else "ip6"

    @property
    def nfproto(self) -> str:
        return "ipv4" if self.version == 4 else "ipv6"

    @property
    def local(self) -> bool:
        return _is_local(self.listen, self.target)

    @property
    def redirect(self) -> bool:
        """Targets on this host are redirected; a target equal to the listen address is DNATed to it."""
        return _is_here(self.target.host)

    @property
    def port_map(self) -> str | None:
        """The listen->target port map's name, when the target is a range (offset kept)."""
        return f"ports_{self.index}{self.key}" if len(self.target.ports) > 1 else None

    def nat(self) -> str:
        """The NAT statement: redirect or DNAT, to one port or through the port map."""
        if self.port_map is not None:
            port = f" : {self.proto} dport map @{self.port_map}"
        else:
            port = f":{self.target.ports.first}"
        if self.redirect:
            return f"redirect to{port}" if self.port_map is not None else f"redirect to {port}"
        host = self.target.host if self.version == 4 else f"[{self.target.host}]"
        return f"dnat {self.ip} to {host}{port}"

    def conntrack(self) -> str:
        """Matches every packet of these flows, both ways, by their conntrack entry, once the
        dispatch map has matched the rest (`_LOOKUPS`: DNATed, to one of our listen ports).

        Originally to our listen address (unless any), answered from our target port (and
        address, unless redirected: then the kernel picked the address).
        """
        parts = [f"meta nfproto {self.nfproto} meta l4proto {self.proto}"]
        if not _is_wildcard(self.listen):
            parts.append(f"ct original {self.ip} daddr {self.listen.host}")
        if not self.redirect:
            parts.append(f"ct reply {self.ip} saddr {self.target.host}")
        parts.append(f"ct reply proto-src {_ports(self.target.ports)}")
        return " ".join(parts)


@dataclass
class _Compiled:
    """One rule in nft: its sets and maps, and the bodies of its own chains (a line per nft rule)."""

    protos: list[str]
    declarations: list[str] = field(default_factory=list)
    prerouting: list[str] = field(default_factory=list)  #: first packets from other hosts
    output: list[str] = field(default_factory=list)  #: first packets from this host
    masquerade: list[str] = field(default_factory=list)  #: first packets of its flows to other hosts
    count: list[str] = field(default_factory=list)  #: every packet of its flows, each way


def _rule_versions(rule: RuleSpec, listen: HostPorts) -> list[Version]:
    """The IP versions a rule carries: its listen address's, or (`*`) its targets'."""
    if not listen.is_any:
        version = _version(listen.host)
        assert version is not None
        return [version]
    targets = [
        target for target in (rule.connect, *(r.connect for r in rule.route)) if isinstance(target, HostPorts)
    ]
    versions: tuple[Version, ...] = (4, 6)
    return [each for each in versions if any(_carries(target, each) for target in targets)]


def _set(compiled: _Compiled, name: str, version: int, elements: list[str]) -> None:
    kind = "ipv4_addr" if version == 4 else "ipv6_addr"
    body = f" elements = {{ {', '.join(elements)} }};" if elements else ""
    compiled.declarations.append(f"  set {name} {{ type {kind}; flags interval;{body} }}")


def _compile(index: int, rule: RuleSpec, mode: str = "") -> _Compiled:
    listen = rule.listen
    assert isinstance(listen, HostPorts)
    label = comment(rule)
    tag = f'comment "{label}"'
    protos = [proto for proto, on in (("tcp", rule.protocol.has_tcp), ("udp", rule.protocol.has_udp)) if on]
    compiled = _Compiled(protos)
    targets: list[tuple[str, HostPorts, str | None]] = []  # (key, target, source set prefix)
    for number, route in enumerate(rule.route):
        assert isinstance(route.connect, HostPorts)
        targets.append((f"_r{number}", route.connect, f"route_{index}_{number}"))
    assert isinstance(rule.connect, HostPorts)
    targets.append(("", rule.connect, None))
    for key, target, _ in targets:
        if len(target.ports) > 1:
            pairs = ", ".join(
                f"{port} : {target.ports.first + offset}" for offset, port in enumerate(listen.ports.ports())
            )
            compiled.declarations.append(
                f"  map ports_{index}{key} {{ type inet_service : inet_service; elements = {{ {pairs} }}; }}"
            )
    # What relaytable.counts() reads: named counters, listed without the rest of the table.
    for kind, suffix in (("flows", ""), ("denied", DENIED), ("up", UP), ("down", DOWN)):
        compiled.declarations.append(f'  counter {kind}_{index} {{ comment "{label}{suffix}"; }}')
    if mode == DRAINING_MODE:
        compiled.declarations.append(f'  counter draining_{index} {{ comment "{label}{DRAINING}"; }}')
    wildcard = _is_wildcard(listen)
    loopback_listen = not wildcard and _is_loopback(listen.host)
    for version in _rule_versions(rule, listen):
        ip = "ip" if version == 4 else "ip6"
        nfproto = "ipv4" if version == 4 else "ipv6"
        prefix = f"meta nfproto {nfproto} fib daddr type local" if wildcard else f"{ip} daddr {listen.host}"
        # Sets once per version; rules per protocol below.
        guards: list[str] = []
        deny = _elements(rule.deny, version)
        if deny:
            _set(compiled, f"deny_{index}_{version}", version, deny)
            guards.append(f"{ip} saddr @deny_{index}_{version}")
        if rule.allow:
            allow = _elements(rule.allow, version)
            _set(compiled, f"allow_{index}_{version}", version, allow)
            guards.append(f"{ip} saddr != @allow_{index}_{version}")
        routed: list[tuple[str, HostPorts, str]] = []
        for key, target, source_set in targets:
            if not _carries(target, version):
                continue
            if source_set is None:
                routed.append((key, target, ""))
                continue
            route = rule.route[int(key[2:])]
            sources = _elements(route.source, version)
            if not sources:
                continue
            _set(compiled, f"{source_set}_{version}", version, sources)
            routed.append((key, target, f"{ip} saddr @{source_set}_{version} "))
        # Local clients of a wildcard rule whose every target here is remote never reach a
        # loopback destination (a packet from 127.0.0.1 may not leave the box): the NAT lines
        # leave those alone, and so do the mode and guard lines, which refuse only what the
        # rule would otherwise relay.
        loopbacks = "127.0.0.0/8" if version == 4 else "::1"
        remote_only = wildcard and not any(
            _Flow(index, key, listen, target, "tcp", version).local for key, target, _ in routed
        )
        for proto in protos:
            match = f"{prefix} {proto} dport {_ports(listen.ports)}"
            local = f"{prefix} {ip} daddr != {loopbacks} {proto} dport {_ports(listen.ports)}"
            refuse = "reject with tcp reset" if proto == "tcp" else "drop"  # as userspace refuses
            held: list[str] = []
            if mode == PAUSED_MODE:
                held.append(f'drop comment "{label}{PAUSED}"')
            elif mode == DRAINING_MODE:
                held.append(f'counter name draining_{index} {refuse} comment "{label}{DRAINING}"')
            held += [
                f'{guard} counter name denied_{index} {refuse} comment "{label}{DENIED}"' for guard in guards
            ]
            for action in held:
                if not loopback_listen:
                    compiled.prerouting.append(f"{match} {action}")
                compiled.output.append(f"{local if remote_only else match} {action}")
            for key, target, source in routed:
                flow = _Flow(index, key, listen, target, proto, version)
                line = f"{match} {source}counter name flows_{index} {flow.nat()} {tag}"
                if not loopback_listen:
                    compiled.prerouting.append(line)
                if wildcard and not flow.local:
                    compiled.output.append(f"{local} {source}counter name flows_{index} {flow.nat()} {tag}")
                else:
                    compiled.output.append(line)
                tracked = flow.conntrack()
                if not flow.local:
                    compiled.masquerade.append(f"{tracked} counter masquerade {tag}")
                for direction, kind, suffix in (("original", "up", UP), ("reply", "down", DOWN)):
                    counter = f'counter name {kind}_{index} comment "{label}{suffix}"'
                    compiled.count.append(f"ct direction {direction} {tracked} {counter}")
    return compiled


# --------------------------------------------------------------------------- O(1) dispatch

#: The dispatch maps, by what they are keyed on, and the base-chain line that looks each up:
#: nat chains by the packet's destination port, the others by the flow's original one (the
#: listen port: conntrack keeps it after the DNAT).
_LOOKUPS = {
    "pre": "{proto} dport vmap @pre_{proto}",
    "out": "{proto} dport vmap @out_{proto}",
    "masq": "meta l4proto {proto} ct status dnat ct original proto-dst vmap @masq_{proto}",
    "count_in": 'meta l4proto {proto} iif != "lo" ct status dnat ct original proto-dst vmap @count_{proto}',
    "count_out": "meta l4proto {proto} ct status dnat ct original proto-dst vmap @count_{proto}",
}


def _segments(entries: Sequence[tuple[PortRange, str]]) -> list[tuple[PortRange, tuple[str, ...]]]:
    """Disjoint port intervals, each with the chains (in rule order) of the rules whose ports
    cover it; neighbours with the same chains merged. The intervals of a map may not overlap,
    but rules of different listen addresses may share ports."""
    starts: dict[int, list[int]] = {}
    ends: dict[int, list[int]] = {}
    for order, (ports, _) in enumerate(entries):
        starts.setdefault(ports.first, []).append(order)
        ends.setdefault(ports.last + 1, []).append(order)
    bounds = sorted(starts.keys() | ends.keys())
    active: set[int] = set()
    found: list[tuple[PortRange, tuple[str, ...]]] = []
    for here, after in itertools.pairwise(bounds):
        active.difference_update(ends.get(here, ()))
        active.update(starts.get(here, ()))
        if not active:
            continue
        chains = tuple(entries[order][1] for order in sorted(active))
        if found and found[-1][0].last == here - 1 and found[-1][1] == chains:
            found[-1] = (PortRange(found[-1][0].first, after - 1), chains)
        else:
            found.append((PortRange(here, after - 1), chains))
    return found


def _dispatch(
    kind: str, proto: str, entries: Sequence[tuple[PortRange, str]], declarations: list[str]
) -> list[tuple[str, list[str]]]:
    """Declare the map `<kind>_<proto>` (port -> jump to the rule's chain); return the chains
    it needs for ports that several rules share (they jump to each rule's chain in turn)."""
    shared: list[tuple[str, list[str]]] = []
    elements: list[str] = []
    segments = _segments(entries)
    for ports, chains in segments:
        target = chains[0]
        if len(chains) > 1:
            target = f"{kind}_{proto}_{ports.first}"
            shared.append((target, [f"jump {chain}" for chain in chains]))
        elements.append(f"{_ports(ports)} : jump {target}")
    interval = " flags interval;" if any(len(ports) > 1 for ports, _ in segments) else ""
    listed = ", ".join(elements)
    declarations.append(
        f"  map {kind}_{proto} {{ type inet_service : verdict;{interval} elements = {{ {listed} }}; }}"
    )
    return shared


def plan(rules: Sequence[RuleSpec], table: str, modes: Mapping[str, str] | None = None) -> str:
    """The ruleset of `table inet <table>` for these rules, as nft text; `modes`: the operator's
    mode of a rule by label ("paused", "draining"; absent or "" takes clients).

    Raises KernelRelayError for a bad table name or a rule `unsuitable()` refuses.
    """
    check_table(table)
    declarations: list[str] = []
    chains: list[tuple[str, list[str]]] = []  # the rules' own chains, then the shared ports' ones
    entries: dict[tuple[str, str], list[tuple[PortRange, str]]] = {}  # (kind, proto) -> in rule order
    for index, rule in enumerate(rules):
        if (problem := unsuitable(rule)) is not None:
            raise KernelRelayError(problem)
        compiled = _compile(index, rule, (modes or {}).get(rule.label, ""))
        declarations.extend(compiled.declarations)
        name = f"rule_{index}"
        names: dict[str, str] = {}
        if compiled.prerouting:
            chains.append((name, compiled.prerouting))
            names["pre"] = name
        if compiled.output:
            if compiled.output != compiled.prerouting:
                names["out"] = f"{name}_out" if compiled.prerouting else name
                chains.append((names["out"], compiled.output))
            else:
                names["out"] = name
        for kind, body in (("masq", compiled.masquerade), ("count", compiled.count)):
            if body:  # (a route to the rule's own target tracks the same flows: once is enough)
                names[kind] = f"{kind}_{index}"
                chains.append((names[kind], list(dict.fromkeys(body))))
        assert isinstance(rule.listen, HostPorts)
        for proto in compiled.protos:
            for kind, chain in names.items():
                entries.setdefault((kind, proto), []).append((rule.listen.ports, chain))
    hooks: dict[str, list[str]] = {name: [] for name in _LOOKUPS}
    for (kind, proto), found in sorted(entries.items(), key=lambda item: (item[0][0], item[0][1] != "tcp")):
        chains.extend(_dispatch(kind, proto, found, declarations))
        for hook in (kind,) if kind != "count" else ("count_in", "count_out"):
            hooks[hook].append(_LOOKUPS[hook].format(proto=proto))
    lines = [f"table {FAMILY} {table} {{", *declarations]
    bases = (
        ("prerouting", "type nat hook prerouting priority dstnat", hooks["pre"]),
        # nft 1.0.6 refuses `priority dstnat` on a nat output chain: its number, -100.
        ("output", "type nat hook output priority -100", hooks["out"]),
        ("postrouting", "type nat hook postrouting priority srcnat", hooks["masq"]),
        # After NAT, so a flow's first packet is already marked DNATed; loopback packets were
        # counted on output and are not counted again when they come back in on lo.
        ("count_in", "type filter hook prerouting priority filter", hooks["count_in"]),
        ("count_out", "type filter hook output priority filter", hooks["count_out"]),
    )
    for name, body in [(name, [f"{hook}; policy accept;", *body]) for name, hook, body in bases] + chains:
        lines += [f"  chain {name} {{", *(f"    {line}" for line in body), "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def check_table(table: str) -> None:
    """Raise KernelRelayError unless `table` is an nft identifier portfwd may name."""
    if not _TABLE_NAME.match(table):
        raise KernelRelayError(
            f"table name {table!r} is not an nft identifier", hint="use letters, digits and _ (at most 64)"
        )


def document(ruleset: str, table: str) -> str:
    """Replace `table inet <table>` with `ruleset` in one nft transaction (one file = one batch)."""
    check_table(table)
    return f"table {FAMILY} {table} {{}}\ndelete table {FAMILY} {table}\n{ruleset}"
