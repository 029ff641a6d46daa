"""The gateway config as one nftables ruleset in portfwd's own table: pure, no nft calls.

`plan()` takes the config and what the box looks like (`Interfaces`) and returns nft text.
Forwards become map lookups (`dnat ip to tcp dport map @dnat_tcp`), so the per-packet cost
does not grow with the number of forwarded ports; rules with a source allow list get their own
map behind an `ip saddr @allow_N` match.

The rules hold no address of the box where the kernel can tell instead, so they stay right when
the network is renumbered under them:
- WAN DNAT matches packets addressed to the WAN interface itself (`fib daddr . iif type local`),
  not every packet that arrives on it (which used to catch traffic routed to other hosts);
- hairpin matches LAN packets to any address of this host that is not on the LAN side
  (`fib daddr type local` and `fib daddr . iif type != local`);
- masquerade matches by interface (LAN in, WAN out), not by the LAN prefix.
With `[gateway.ha]`, LAN traffic leaves with the virtual WAN address (snat, not masquerade),
and invalid flows are dropped rather than forwarded bare or answered (kernel/ha.py for the
rest). Only the router's own access to its forwards (a nat output chain, where there is no input
interface to ask) needs the WAN addresses: they are a named set, `wan_addresses`, which
`portfwd run` keeps current (kernel/gateway.py).

IPv6 is not translated. `[[gateway.forward]]` with an IPv6 target is a pinhole: with the IPv6
firewall on, inbound IPv6 from the WAN to the LAN is dropped except replies (established,
related), the ICMPv6 errors and echo requests RFC 4890 asks a router to pass, and the pinholes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from portfwd.specs import GatewayForwardSpec, GatewaySpec

TABLE = "portfwd"
FAMILY = "inet"
Network = ipaddress.IPv4Network
Network6 = ipaddress.IPv6Network
#: ICMPv6 a LAN host must get from the WAN for IPv6 to work (RFC 4890 4.3.1) plus echo requests.
ICMP6_PASSED = "destination-unreachable, packet-too-big, time-exceeded, parameter-problem, echo-request"
#: The nat output hook takes a number in nft 1.0.6 (`dstnat` is refused there).
OUTPUT_PRIORITY = -100
FLOWTABLE = "fastpath"


@dataclass(frozen=True, slots=True)
class Interfaces:
    """What the plan needs to know about the box.

    `wan_addresses` fill the router's own access set; `lan_networks` (and `lan_networks6` for
    pinholes) are what targets are checked against; `flowtables` says whether the kernel has them.
    """

    wan_addresses: tuple[str, ...]
    lan_networks: tuple[Network, ...]
    lan_networks6: tuple[Network6, ...] = ()
    flowtables: bool = False


def trigger_mark(index: int) -> str:
    """The packet mark (and map key) of trigger `index`: portfwd's marks are 0x70f00 + index."""
    return f"0x{0x70F00 + index:x}"


def _elements(rule: GatewayForwardSpec, index: int) -> list[str]:
    """`wan_port : lan_address . lan_port`, one per port (a range keeps its offset).

    Each element carries its rule's name as a comment, so `nft list` shows where it came from
    and an nft error on one element can be traced back to the config rule (`nft.explain`).
    """
    out = []
    for offset, port in enumerate(rule.port.ports()):
        target = rule.to.ports.first if len(rule.to.ports) == 1 else rule.to.ports.first + offset
        out.append(f'{port} comment "gateway.forward[{index}]" : {rule.to.host} . {target}')
    return out


def protocols(rule: GatewayForwardSpec) -> list[str]:
    """The rule's transport protocols, as nft names them."""
    return [proto for proto, on in (("tcp", rule.protocol.has_tcp), ("udp", rule.protocol.has_udp)) if on]


def _map(name: str, elements: list[str]) -> str:
    return (
        f"  map {name} {{ type inet_service : ipv4_addr . inet_service; "
        f"elements = {{ {', '.join(elements)} }} }}"
    )


def _ports(proto_ports: tuple[str, Any]) -> str:
    proto, ports = proto_ports
    return f"{proto} . {ports.first}" if len(ports) == 1 else f"{proto} . {ports.first}-{ports.last}"


def _range(ports: Any) -> str:
    return str(ports.first) if len(ports) == 1 else f"{ports.first}-{ports.last}"


def check(config: GatewaySpec, interfaces: Interfaces) -> list[str]:
    """Problems the plan cannot express, one line each (targets outside the LAN, no LAN address)."""
    problems = []
    needs_v4 = config.masquerade or any(not rule.pinhole for rule in config.forward) or config.trigger
    if needs_v4 and not interfaces.lan_networks:
        problems.append(f"gateway.lan: interface {config.lan} has no IPv4 address; give it one first")
    for index, rule in enumerate(config.forward):
        address = ipaddress.ip_address(rule.to.host)
        networks: tuple[Network | Network6, ...] = (
            interfaces.lan_networks6 if rule.pinhole else interfaces.lan_networks
        )
        if not config.allow_external_target and not any(address in net for net in networks):
            nets = ", ".join(map(str, networks)) or "none"
            where = f"{config.lan} IPv6" if rule.pinhole else config.lan
            problems.append(
                f"gateway.forward[{index}].to: {rule.to.host} is not on the LAN ({where}: {nets}); "
                "set allow_external_target = true if that is intended"
            )
    return problems


def notes(config: GatewaySpec, interfaces: Interfaces) -> list[str]:
    """What the plan leaves out and why, one line each (the rest still applies)."""
    out = []
    if config.flowtable and not interfaces.flowtables:
        out.append(
            "gateway.flowtable: this kernel has no nftables flowtables (CONFIG_NF_FLOW_TABLE); "
            "established flows take the normal forward path"
        )
    return out


def _triggers(
    config: GatewaySpec, lines: list[str], wan: str, lan: str, hairpin_match: str
) -> tuple[list[str], list[str]]:
    """Port triggering in the kernel (TESTBED §5a): per trigger, a dynamic map mark -> LAN host.

    An outbound packet to the trigger port writes its source into the map; inbound packets to
    the opened ports are DNATed to whatever the map holds, and refresh it. The element expires
    after idle_timeout without traffic, which closes the ports. The first host keeps the ports
    while it stays active (nft's `update` cannot replace a value). With hairpin, LAN hosts reach
    the opened ports through the public address too.
    """
    nat: list[str] = []
    forward: list[str] = []
    for index, trigger in enumerate(config.trigger):
        mark = trigger_mark(index)
        host, out, opened = f"trig_host_{index}", f"trig_out_{index}", f"trig_open_{index}"
        timeout = max(1, round(trigger.idle_timeout))
        interval = "type inet_proto . inet_service; flags interval"
        lines.append(f"  map {host} {{ type mark : ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}")
        lines.append(f"  set {out} {{ {interval}; elements = {{ {_ports(trigger.trigger)} }} }}")
        elements = ", ".join(_ports(item) for item in trigger.open)
        lines.append(f"  set {opened} {{ {interval}; elements = {{ {elements} }} }}")
        comment = f'comment "gateway.trigger[{index}]"'
        if trigger.mode == "kernel":  # last-wins: portfwd's conntrack watcher writes the holder
            forward.append(
                f"iifname {lan} oifname {wan} meta l4proto . th dport @{out} meta mark set {mark}"
                f" update @{host} {{ meta mark : ip saddr }} counter {comment}"
            )
        forward.append(
            f"iifname {wan} oifname {lan} ct status dnat meta l4proto . th dport @{opened}"
            f" meta mark set {mark} update @{host} {{ meta mark : ip daddr }} counter {comment}"
        )
        nat.append(
            f"iifname {wan} fib daddr . iif type local meta l4proto . th dport @{opened} meta mark set {mark}"
            f" counter dnat ip to meta mark map @{host} {comment}"
        )
        if config.hairpin:
            nat.append(
                f"iifname {lan} {hairpin_match} meta l4proto . th dport @{opened} meta mark set {mark}"
                f' counter dnat ip to meta mark map @{host} comment "hairpin gateway.trigger[{index}]"'
            )
    return nat, forward


def _ipv6_firewall(config: GatewaySpec, lines: list[str], wan: str, lan: str) -> list[str]:
    """Forward-chain rules: IPv6 replies, needed ICMPv6 and pinholes in; the rest from the WAN dropped."""
    inbound = f"iifname {wan} oifname {lan}"
    rules = [
        f'{inbound} meta nfproto ipv6 ct state established,related accept comment "ipv6 replies"',
        f'{inbound} icmpv6 type {{ {ICMP6_PASSED} }} accept comment "ipv6 icmp"',
    ]
    for index, rule in enumerate(config.forward):
        if not rule.pinhole:
            continue
        source = ""
        if rule.allow:
            name = f"allow6_{index}"
            nets = ", ".join(str(net) for net in rule.allow)
            lines.append(f"  set {name} {{ type ipv6_addr; flags interval; elements = {{ {nets} }} }}")
            source = f" ip6 saddr @{name}"
        for proto in protocols(rule):
            rules.append(
                f"{inbound} ip6 daddr {rule.to.host}{source} {proto} dport {_range(rule.port)}"
                f' counter accept comment "gateway.forward[{index}]"'
            )
    rules.append(f'{inbound} meta nfproto ipv6 counter drop comment "ipv6 inbound"')
    return rules


def plan(config: GatewaySpec, interfaces: Interfaces) -> str:
    """The ruleset for table inet portfwd, as nft text.

    Text, not JSON: nft 1.0.6's JSON parser rejects the concatenated map type
    (`ipv4_addr . inet_service`) that its own JSON listing prints, and that map is what keeps
    the per-packet cost flat.
    """
    wan, lan = f'"{config.wan}"', f'"{config.lan}"'
    to_wan = f"iifname {wan} fib daddr . iif type local"
    hairpin_match = "fib daddr type local fib daddr . iif type != local"
    lines = [f"table {FAMILY} {TABLE} {{"]
    addresses = ", ".join(interfaces.wan_addresses)
    lines.append(
        "  set wan_addresses { type ipv4_addr;"
        + (f" elements = {{ {addresses} }};" if addresses else "")
        + " }"
    )
    prerouting: list[str] = []
    hairpin: list[str] = []
    output: list[str] = []
    shared: dict[str, list[str]] = {"tcp": [], "udp": []}
    for index, rule in enumerate(config.forward):
        if rule.pinhole:
            continue
        for proto in protocols(rule):
            if not rule.allow:
                shared[proto].extend(_elements(rule, index))
                continue
            name, allow = f"dnat_{index}_{proto}", f"allow_{index}"
            lines.append(_map(name, _elements(rule, index)))
            if f"  set {allow} " not in "\n".join(lines):
                nets = ", ".join(str(net) for net in rule.allow)
                lines.append(f"  set {allow} {{ type ipv4_addr; flags interval; elements = {{ {nets} }} }}")
            prerouting.append(
                f"{to_wan} ip saddr @{allow} counter dnat ip to {proto} dport map @{name}"
                f' comment "gateway.forward[{index}]"'
            )
    for proto, elements in shared.items():
        if not elements:
            continue
        lines.append(_map(f"dnat_{proto}", elements))
        comment = f'comment "gateway.forward {proto}"'
        prerouting.append(f"{to_wan} counter dnat ip to {proto} dport map @dnat_{proto} {comment}")
        output.append(
            f"ip daddr @wan_addresses counter dnat ip to {proto} dport map @dnat_{proto}"
            f' comment "router {proto}"'
        )
        if config.hairpin:
            hairpin.append(
                f"iifname {lan} {hairpin_match} counter"
                f' dnat ip to {proto} dport map @dnat_{proto} comment "hairpin"'
            )
    postrouting: list[str] = []
    wan_vip, lan_vip = _virtual(config, interfaces)
    if config.masquerade:
        out = f"snat ip to {wan_vip}" if wan_vip else "masquerade"
        postrouting.append(
            f'iifname {lan} oifname {wan} meta nfproto ipv4 counter {out} comment "masquerade"'
        )
    if config.hairpin and (hairpin or config.trigger):
        out = f"snat ip to {lan_vip}" if lan_vip else "masquerade"
        postrouting.append(
            f'iifname {lan} oifname {lan} ct status dnat meta nfproto ipv4 counter {out} comment "hairpin"'
        )
    triggered, trigger_forward = _triggers(config, lines, wan, lan, hairpin_match)
    forward = [*trigger_forward]
    if config.ha is not None:  # a flow the other router's state has not reached yet: not forwarded bare
        forward.insert(0, 'ct state invalid counter drop comment "ha"')
    if config.flowtable and interfaces.flowtables:
        lines.append(
            f"  flowtable {FLOWTABLE} {{ hook ingress priority filter; devices = {{ {wan}, {lan} }}; }}"
        )
        # Not the flows of port triggers: their rules must see every packet to keep the holder.
        forward.append(
            f"meta l4proto {{ tcp, udp }} ct state established meta mark & 0xfff00 != 0x70f00"
            f' flow add @{FLOWTABLE} comment "flowtable"'
        )
    forward.append('ct status dnat counter accept comment "dnat"')
    if config.ipv6_firewall:
        forward.extend(_ipv6_firewall(config, lines, wan, lan))
    chains = [
        ("prerouting", "type nat hook prerouting priority dstnat", [*prerouting, *triggered, *hairpin]),
        ("output", f"type nat hook output priority {OUTPUT_PRIORITY}", output),
        ("postrouting", "type nat hook postrouting priority srcnat", postrouting),
        ("forward", "type filter hook forward priority filter", forward),
    ]
    if config.ha is not None:  # nor answered by this router itself with a reset
        chains.append(
            (
                "input",
                "type filter hook input priority filter",
                ['ct state invalid counter drop comment "ha"'],
            )
        )
    for name, hook, rules in chains:
        lines.append(f"  chain {name} {{")
        lines.append(f"    {hook}; policy accept;")
        lines.extend(f"    {rule}" for rule in rules)
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _virtual(config: GatewaySpec, interfaces: Interfaces) -> tuple[str, str]:
    """With `[gateway.ha]`: the virtual WAN and LAN addresses (a LAN one is in a LAN network).

    Flows leave from the virtual address, not from masquerade's pick (the router's own, primary
    address): the other router can then carry them on after a failover, and masquerade's
    clearing of flows when an address goes does not bite.
    """
    if config.ha is None:
        return "", ""
    wan = lan = ""
    for vip in config.ha.virtual_addresses:
        if any(vip.ip in net for net in interfaces.lan_networks):
            lan = lan or str(vip.ip)
        else:
            wan = wan or str(vip.ip)
    return wan, lan


def virtual_wan(config: GatewaySpec, interfaces: Interfaces | None) -> tuple[str, ...]:
    """The virtual WAN address LAN traffic leaves with under `[gateway.ha]` (none without)."""
    wan, _ = _virtual(config, interfaces or Interfaces((), ()))
    return (wan,) if wan else ()


def wan_addresses_batch(addresses: tuple[str, ...]) -> str:
    """An nft batch that makes `wan_addresses` hold exactly `addresses` (one transaction)."""
    batch = f"flush set {FAMILY} {TABLE} wan_addresses\n"
    if addresses:
        batch += f"add element {FAMILY} {TABLE} wan_addresses {{ {', '.join(addresses)} }}\n"
    return batch
