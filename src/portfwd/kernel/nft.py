"""The gateway config as one nftables ruleset in portfwd's own table, and the nft calls around it.

`plan()` is pure: config + the interfaces' addresses in, nft text out. Forwards
become map lookups (`dnat ip to tcp dport map @dnat_tcp`), so the per-packet cost
does not grow with the number of forwarded ports. Rules with a source allow list get their own
map behind an `ip saddr @allow_N` match. `apply()` replaces the whole table in one nft
transaction (add, delete, add again, then the contents): either all of it takes effect or none,
and nothing outside table `inet portfwd` is touched.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from portfwd.errors import RuntimeFailure
from portfwd.specs import GatewayForwardSpec, GatewaySpec

TABLE = "portfwd"
FAMILY = "inet"
Network = ipaddress.IPv4Network


class GatewayError(RuntimeFailure):
    """The gateway plan cannot be built or applied; the message names the rule or interface."""


@dataclass(frozen=True, slots=True)
class Interfaces:
    """What the plan needs to know about the box: the WAN addresses and the LAN networks."""

    wan_addresses: tuple[str, ...]
    lan_networks: tuple[Network, ...]


def _elements(rule: GatewayForwardSpec, index: int) -> list[str]:
    """`wan_port : lan_address . lan_port`, one per port (a range keeps its offset).

    Each element carries its rule's name as a comment, so `nft list` shows where it came from
    and an nft error on one element can be traced back to the config rule (`explain`).
    """
    out = []
    for offset, port in enumerate(rule.port.ports()):
        target = rule.to.ports.first if len(rule.to.ports) == 1 else rule.to.ports.first + offset
        out.append(f'{port} comment "gateway.forward[{index}]" : {rule.to.host} . {target}')
    return out


def _protocols(rule: GatewayForwardSpec) -> list[str]:
    return [proto for proto, on in (("tcp", rule.protocol.has_tcp), ("udp", rule.protocol.has_udp)) if on]


def _map(name: str, elements: list[str]) -> str:
    return (
        f"  map {name} {{ type inet_service : ipv4_addr . inet_service; "
        f"elements = {{ {', '.join(elements)} }} }}"
    )


def check(config: GatewaySpec, interfaces: Interfaces) -> list[str]:
    """Problems the plan cannot express, one line each (targets outside the LAN, no LAN address)."""
    problems = []
    if not interfaces.lan_networks:
        problems.append(f"gateway.lan: interface {config.lan} has no IPv4 address; give it one first")
    for index, rule in enumerate(config.forward):
        address = ipaddress.IPv4Address(rule.to.host)
        if not config.allow_external_target and not any(address in net for net in interfaces.lan_networks):
            nets = ", ".join(map(str, interfaces.lan_networks)) or "none"
            problems.append(
                f"gateway.forward[{index}].to: {rule.to.host} is not on the LAN ({config.lan}: {nets}); "
                "set allow_external_target = true if that is intended"
            )
    return problems


def _ports(proto_ports: tuple[str, Any]) -> str:
    proto, ports = proto_ports
    return f"{proto} . {ports.first}" if len(ports) == 1 else f"{proto} . {ports.first}-{ports.last}"


def trigger_mark(index: int) -> str:
    """The packet mark (and map key) of trigger `index`: portfwd's marks are 0x70f00 + index."""
    return f"0x{0x70F00 + index:x}"


def hand_over(index: int, host: str) -> None:
    """Give trigger `index`'s ports to `host` now (last-wins), replacing any holder. Raises GatewayError."""
    mark = trigger_mark(index)
    name = f"trig_host_{index}"
    # nft 1.0.6 has no "replace element" (and no "destroy"): delete the holder if there is one,
    # then add. Between the two, an inbound packet is simply not forwarded.
    _nft("delete", "element", FAMILY, TABLE, name, f"{{ {mark} }}")
    batch = f"add element {FAMILY} {TABLE} {name} {{ {mark} : {host} }}\n"
    result = _nft("-f", "-", payload=batch)
    if result.returncode != 0:
        raise GatewayError(f"cannot hand trigger {index} to {host}: {_one_line(result.stderr)}")


def _triggers(config: GatewaySpec, lines: list[str], wan: str, lan: str) -> tuple[list[str], list[str]]:
    """Port triggering in the kernel (TESTBED §5a): per trigger, a dynamic map mark -> LAN host.

    An outbound packet to the trigger port writes its source into the map; inbound packets to
    the opened ports are DNATed to whatever the map holds, and refresh it. The element expires
    after idle_timeout without traffic, which closes the ports. The first host keeps the ports
    while it stays active (nft's `update` cannot replace a value).
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
            f"iifname {wan} meta l4proto . th dport @{opened} meta mark set {mark}"
            f" counter dnat ip to meta mark map @{host} {comment}"
        )
    return nat, forward


def plan(config: GatewaySpec, interfaces: Interfaces) -> str:
    """The ruleset for table inet portfwd, as nft text.

    Text, not JSON: nft 1.0.6's JSON parser rejects the concatenated map type
    (`ipv4_addr . inet_service`) that its own JSON listing prints, and that map is what keeps
    the per-packet cost flat.
    """
    wan, lan = f'"{config.wan}"', f'"{config.lan}"'
    lines = [f"table {FAMILY} {TABLE} {{"]
    prerouting: list[str] = []
    hairpin: list[str] = []
    shared: dict[str, list[str]] = {"tcp": [], "udp": []}
    for index, rule in enumerate(config.forward):
        for proto in _protocols(rule):
            if not rule.allow:
                shared[proto].extend(_elements(rule, index))
                continue
            name, allow = f"dnat_{index}_{proto}", f"allow_{index}"
            lines.append(_map(name, _elements(rule, index)))
            if f"  set {allow} " not in "\n".join(lines):
                nets = ", ".join(str(net) for net in rule.allow)
                lines.append(f"  set {allow} {{ type ipv4_addr; flags interval; elements = {{ {nets} }} }}")
            prerouting.append(
                f"iifname {wan} ip saddr @{allow} counter dnat ip to {proto} dport map @{name}"
                f' comment "gateway.forward[{index}]"'
            )
    wan_addresses = ", ".join(interfaces.wan_addresses)
    for proto, elements in shared.items():
        if not elements:
            continue
        lines.append(_map(f"dnat_{proto}", elements))
        comment = f'comment "gateway.forward {proto}"'
        prerouting.append(f"iifname {wan} counter dnat ip to {proto} dport map @dnat_{proto} {comment}")
        if config.hairpin and wan_addresses:
            hairpin.append(
                f"iifname {lan} ip daddr {{ {wan_addresses} }} counter"
                f' dnat ip to {proto} dport map @dnat_{proto} comment "hairpin"'
            )
    lan_nets = ", ".join(str(net) for net in interfaces.lan_networks)
    postrouting: list[str] = []
    if config.masquerade and lan_nets:
        postrouting.append(f'oifname {wan} ip saddr {{ {lan_nets} }} counter masquerade comment "masquerade"')
    if hairpin and lan_nets:
        postrouting.append(
            f'oifname {lan} ip saddr {{ {lan_nets} }} ct status dnat counter masquerade comment "hairpin"'
        )
    triggered, trigger_forward = _triggers(config, lines, wan, lan)
    chains = [
        ("prerouting", "type nat hook prerouting priority dstnat", [*prerouting, *triggered, *hairpin]),
        ("postrouting", "type nat hook postrouting priority srcnat", postrouting),
        (
            "forward",
            "type filter hook forward priority filter",
            [*trigger_forward, 'ct status dnat counter accept comment "dnat"'],
        ),
    ]
    for name, hook, rules in chains:
        lines.append(f"  chain {name} {{")
        lines.append(f"    {hook}; policy accept;")
        lines.extend(f"    {rule}" for rule in rules)
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def document(ruleset: str) -> str:
    """Replace table inet portfwd with `ruleset` in one nft transaction (one file = one batch)."""
    return f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n{ruleset}"


# --------------------------------------------------------------------------- nft calls


def _nft(*args: str, payload: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("nft")
    if binary is None:
        raise GatewayError("nft is not installed", hint="apt-get install nftables")
    try:
        return subprocess.run([binary, *args], input=payload, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GatewayError(f"nft could not run: {exc}") from exc


def _one_line(stderr: str) -> str:
    lines = [
        line.strip()
        for line in stderr.replace("\u2018", "'").replace("\u2019", "'").splitlines()
        if line.strip()
    ]
    errors = [line for line in lines if "Error" in line] or lines or ["unknown error"]
    return errors[0]


_NFT_ERROR = re.compile(r"^/dev/stdin:(\d+):(\d+)-(\d+): Error: (.+)$", re.MULTILINE)
_COMMENT = re.compile(r'comment "([^"]+)"')
_NAMED = (
    (re.compile(r"\ballow_(\d+)\b"), "gateway.forward[{}].allow"),
    (re.compile(r"\bdnat_(\d+)_"), "gateway.forward[{}]"),
    (re.compile(r"\btrig_open_(\d+)\b"), "gateway.trigger[{}].open"),
    (re.compile(r"\btrig_out_(\d+)\b"), "gateway.trigger[{}].trigger"),
    (re.compile(r"\btrig_host_(\d+)\b"), "gateway.trigger[{}]"),
)


def explain(text: str, stderr: str) -> tuple[str, str] | None:
    """(config rule, what nft said) for nft's first error in the document `text`, if traceable.

    nft reports `/dev/stdin:LINE:FIRST-LAST: Error: ...`; the line and columns point into the
    document. The rule is the comment of the map element under the columns, else the rule
    line's own comment, else the set or map name (`allow_2` is gateway.forward[2].allow).
    """
    found = _NFT_ERROR.search(stderr)
    if found is None:
        return None
    number, first, last, message = int(found[1]), int(found[2]), int(found[3]), found[4].strip()
    lines = text.splitlines()
    if not 1 <= number <= len(lines):
        return None
    line = lines[number - 1]
    culprit = line[first - 1 : last].strip()
    what = f"{message} ({culprit})" if culprit else message
    start, end = line.rfind("{ ", 0, first), line.find(" }", last)
    if start != -1 and end != -1:
        element_start = max(line.rfind(", ", start, first) + 2, start + 2)
        element_end = line.find(", ", last)
        element = line[element_start : element_end if element_end != -1 and element_end < end else end]
        if comment := _COMMENT.search(element):
            return comment[1], what
    for pattern, template in _NAMED:
        if named := pattern.search(line):
            return template.format(named[1]), what
    if comment := _COMMENT.search(line):
        return comment[1], what
    return None


def apply(ruleset: str, *, check_only: bool = False) -> None:
    """Load the plan atomically (or only check it).

    Raises GatewayError naming the config rule nft refused (or nft's first error line).
    """
    args = ["-c", "-f", "-"] if check_only else ["-f", "-"]
    text = document(ruleset)
    result = _nft(*args, payload=text)
    if result.returncode != 0:
        explained = explain(text, result.stderr)
        if explained is not None:
            rule, what = explained
            raise GatewayError(f"{rule}: nft refused it: {what}; nothing changed, the previous ruleset stays")
        raise GatewayError(f"nft refused the ruleset; nothing changed: {_one_line(result.stderr)}")


def live() -> dict[str, Any] | None:
    """portfwd's table as nft lists it now (JSON), or None when it is not there."""
    result = _nft("-j", "list", "table", FAMILY, TABLE)
    if result.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def remove() -> bool:
    """Delete table inet portfwd (only it). Returns False when it was not there."""
    if live() is None:
        return False
    result = _nft("delete", "table", FAMILY, TABLE)
    if result.returncode != 0:
        raise GatewayError(f"nft could not delete table {FAMILY} {TABLE}: {_one_line(result.stderr)}")
    return True


FORWARDING = (
    ("IPv4", "/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward"),
    ("IPv6", "/proc/sys/net/ipv6/conf/all/forwarding", "net.ipv6.conf.all.forwarding"),
)
IPV6_DISABLED = "/proc/sys/net/ipv6/conf/all/disable_ipv6"


def forwarding_problems(
    enable: bool,
    switches: tuple[tuple[str, str, str], ...] = FORWARDING,
    ipv6_disabled: str = IPV6_DISABLED,
) -> list[str]:
    """What to do about the kernel not routing IPv4 (and IPv6); with `enable`, switch them on.

    portfwd's DNAT rules are IPv4, so IPv6 forwarding off is only worth a line: IPv6 hosts
    behind the gateway are not reached, which a user expecting them should know. A box with
    IPv6 switched off altogether gets no IPv6 line.
    """
    problems = []
    for family, path, key in switches:
        if family == "IPv6" and _reads_one(ipv6_disabled):
            continue
        try:
            with open(path, encoding="ascii") as handle:
                if handle.read().strip() == "1":
                    continue
            if enable:
                with open(path, "w", encoding="ascii") as handle:
                    handle.write("1\n")
                continue
        except FileNotFoundError:
            if family == "IPv6":
                continue  # a kernel without IPv6
            problems.append(f"cannot read {path}: the kernel has no {family} forwarding switch")
            continue
        except OSError as exc:
            problems.append(f"cannot read or set {path}: {exc.strerror}")
            continue
        problems.append(f"{family} forwarding is off: run sysctl -w {key}=1, or set enable_forwarding = true")
    return problems


def _reads_one(path: str) -> bool:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip() == "1"
    except OSError:
        return False


def interfaces(config: GatewaySpec) -> Interfaces:
    """Read the WAN addresses and LAN networks with `ip -j addr`. Raises GatewayError for a missing one."""

    def addresses(name: str, field: str) -> list[ipaddress.IPv4Interface]:
        try:
            result = subprocess.run(
                ["ip", "-j", "-4", "addr", "show", "dev", name], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GatewayError(f"cannot run ip: {exc}", hint="apt-get install iproute2") from exc
        if result.returncode != 0:
            raise GatewayError(f"no interface {name!r} on this machine", field=field, hint="see ip link")
        out = []
        for link in json.loads(result.stdout or "[]"):
            for info in link.get("addr_info", []):
                out.append(ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}"))
        return out

    wan = addresses(config.wan, "gateway.wan")
    lan = addresses(config.lan, "gateway.lan")
    return Interfaces(tuple(str(item.ip) for item in wan), tuple(item.network for item in lan))


def prepare(config: GatewaySpec) -> str:
    """Read the interfaces, check the plan against them, and return the ruleset. Raises GatewayError."""
    found = interfaces(config)
    problems = check(config, found)
    if problems:
        raise GatewayError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return plan(config, found)


def counters(listing: dict[str, Any]) -> list[dict[str, Any]]:
    """Packets and bytes per commented rule of portfwd's table (`nft -j list table` output)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for item in listing.get("nftables", []):
        rule = item.get("rule")
        if not isinstance(rule, dict):
            continue
        comment = str(rule.get("comment") or "")
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                key = (str(rule.get("chain")), comment)
                row = rows.setdefault(key, {"chain": key[0], "rule": comment, "packets": 0, "bytes": 0})
                row["packets"] += int(expr["counter"].get("packets", 0))
                row["bytes"] += int(expr["counter"].get("bytes", 0))
    return list(rows.values())


def trigger_holders(listing: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """Which LAN host holds each trigger now, and the seconds left: {index: (host, expires)}."""
    held: dict[int, tuple[str, int]] = {}
    for item in listing.get("nftables", []):
        table_map = item.get("map")
        if not isinstance(table_map, dict) or not str(table_map.get("name", "")).startswith("trig_host_"):
            continue
        index = int(str(table_map["name"]).rsplit("_", 1)[1])
        for element in table_map.get("elem", []):
            if isinstance(element, list) and len(element) == 2:
                key, host = element
                expires = key.get("elem", {}).get("expires", 0) if isinstance(key, dict) else 0
                held[index] = (str(host), int(expires))
    return held


def fingerprint() -> str | None:
    """portfwd's table as `nft -s` lists it (no counters), minus the trigger maps' live elements.

    Two calls return the same text unless someone changed the table: what `portfwd run` compares
    to notice drift. None when the table is not loaded.
    """
    result = _nft("-s", "list", "table", FAMILY, TABLE)
    if result.returncode != 0:
        return None
    return _without_live_elements(result.stdout)


def _without_live_elements(listing: str) -> str:
    kept: list[str] = []
    in_trigger_map = skipping = False
    for line in listing.splitlines():
        stripped = line.strip()
        if stripped.startswith("map trig_host_"):
            in_trigger_map = True
        elif in_trigger_map and stripped == "}":
            in_trigger_map = False
        if in_trigger_map and stripped.startswith("elements = {"):
            skipping = True
        if not skipping:
            kept.append(line)
        if skipping and stripped.endswith("}"):
            skipping = False
    return "\n".join(kept)


def diff(ruleset: str) -> list[str] | None:
    """Unified diff from the live table to `ruleset`, both as nft lists them; None if not loaded.

    The plan is loaded into a throwaway network namespace (`unshare --net`) and listed there,
    so both sides are in nft's own canonical form and only real differences show.
    """
    live_text = fingerprint()
    if live_text is None:
        return None
    unshare = shutil.which("unshare")
    binary = shutil.which("nft")
    if unshare is None or binary is None:
        raise GatewayError("cannot diff: needs unshare (util-linux) and nft")
    script = f"{binary} -f - && {binary} -s list table {FAMILY} {TABLE}"
    try:
        result = subprocess.run(
            [unshare, "--net", "sh", "-c", script], input=ruleset, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GatewayError(f"cannot diff: {exc}") from exc
    if result.returncode != 0:
        raise GatewayError(f"cannot diff against the live table: {_one_line(result.stderr)}")
    planned = _without_live_elements(result.stdout)
    return list(
        difflib.unified_diff(
            live_text.splitlines(), planned.splitlines(), "live table", "this plan", lineterm="", n=1
        )
    )
