"""Live NAT sessions of the gateway, from the kernel's connection tracking table.

`conntrack -L --dst-nat -o xml` lists every DNATed flow with its original tuple (the WAN
client and the public port it asked for) and its reply tuple (the LAN host that answers).
Each flow is attributed to the `[[gateway.forward]]` rule, or the trigger, whose WAN port it
hit. Ages need `net.netfilter.nf_conntrack_timestamp = 1`, which `portfwd run` turns on while
its gateway is applied, and restores on exit to the value it found: that value is written to the
state directory first, so a crash and a restart do not take portfwd's own "1" for the original.

When the gateway goes (`remove`, or exit), the flows it translated are deleted from the table
(`forget`): with the rules gone, a flow still tracked would keep its NAT binding and stay
ESTABLISHED, carrying packets the box no longer means to translate.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portfwd.addr import HostPorts, is_loopback
from portfwd.specs import GatewaySpec, RuleSpec
from portfwd.status import GatewaySessionRow

TIMESTAMP = Path("/proc/sys/net/netfilter/nf_conntrack_timestamp")
#: The timestamp setting found before portfwd turned it on, in the state directory.
SAVED_TIMESTAMP = "conntrack-timestamp"
#: `conntrack -D` calls made at most by one `forget` (one per port and target in use).
MAX_DELETES = 1000
#: Rows kept per refresh; a busy router can track far more flows than a status table shows.
MAX_SESSIONS = 500


@dataclass(frozen=True, slots=True)
class Claim:
    """Which rule owns a flow: `name` for flows to `proto` ports `first`..`last` that are
    answered by `target` (any address when "": a redirect, a trigger's holder) from a port in
    `target_first`..`target_last` (any when 0)."""

    name: str
    proto: str
    first: int
    last: int
    target: str = ""
    target_first: int = 0
    target_last: int = 0
    listen: str = ""  #: the address the client asked for ("": any of this host's)

    def owns(self, proto: str, dport: int, source: str, sport: int, destination: str = "") -> bool:
        """Whether a flow to `destination`:`dport` answered from `source`:`sport` is this rule's."""
        if self.proto != proto or not self.first <= dport <= self.last:
            return False
        if self.listen and destination and _canonical(destination) != _canonical(self.listen):
            return False
        if self.target and _canonical(source) != _canonical(self.target):
            return False
        return not self.target_first or self.target_first <= sport <= self.target_last


def _canonical(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def timestamps(on: bool | None = None) -> bool | None:
    """Read (and with `on`, set) whether conntrack stamps flows; None when not available."""
    try:
        before = TIMESTAMP.read_text().strip() == "1"
        if on is not None and on != before:
            TIMESTAMP.write_text("1\n" if on else "0\n")
        return before
    except OSError:
        return None


def stamp(directory: str) -> bool | None:
    """Turn stamping on, first writing the value found to `directory` (unless a file from a run
    that did not end cleanly is there: then the live value is portfwd's own).

    Returns True when it was off (portfwd turned it on), False when already on, None when the
    kernel has no such switch or it cannot be set.
    """
    saved = Path(directory, SAVED_TIMESTAMP)
    before = timestamps()
    if before is None:
        return None
    if before:
        return saved.exists()  # on: by an earlier portfwd that did not end cleanly, or by the admin
    try:
        if not saved.exists():
            os.makedirs(directory, mode=0o700, exist_ok=True)
            saved.write_text("0\n")
        TIMESTAMP.write_text("1\n")
    except OSError:
        return None
    return True


def unstamp(directory: str) -> None:
    """Put back the stamping setting `stamp` saved in `directory`, and forget it."""
    saved = Path(directory, SAVED_TIMESTAMP)
    try:
        value = saved.read_text().strip()
    except OSError:
        return
    if value in ("0", "1"):
        timestamps(on=value == "1")
    saved.unlink(missing_ok=True)


def forget(
    claims: list[Claim],
    lan_networks: tuple[ipaddress.IPv4Network, ...] = (),
    masqueraded_to: tuple[str, ...] = (),
) -> int:
    """Delete the flows portfwd translated; returns how many conntrack deleted.

    DNATed flows its rules own (the claims: the port asked for, the target that answers), one
    `conntrack -D` per (port, target) in use, filtered by both, so all of them go however many
    there are; with `lan_networks`, masqueraded flows from those networks that left with one of
    the addresses `masqueraded_to` (the WAN's, or the virtual one), one call per pair. Nothing
    else on the box is touched: not docker's flows, not another instance's, not a VPN's
    masquerade.
    """
    binary = shutil.which("conntrack")
    if binary is None:
        return 0
    calls: dict[tuple[str, ...], None] = {}
    for row in parse(_run([binary, "-L", "--dst-nat", "-o", "xml"]), claims, limit=None):
        proto, _, dst, _, dport = row["original"]
        source, sport = row["reply"]
        family = ("-f", "ipv6") if ":" in dst else ()
        calls[(*family, "--dst-nat", "-p", proto, "--orig-dst", dst, "--orig-port-dst", str(dport),
               "--reply-src", source, "--reply-port-src", str(sport))] = None  # fmt: skip
    if lan_networks and masqueraded_to:
        for network in lan_networks:
            for address in masqueraded_to:
                calls[("--src-nat", "-s", str(network), "--reply-dst", address)] = None
    deleted = 0
    for args in list(calls)[:MAX_DELETES]:
        deleted += _deleted(_run([binary, "-D", *args], stderr=True))
    return deleted


def _within(address: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(address) in network
    except ValueError:
        return False


def _run(argv: list[str], stderr: bool = False) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stderr if stderr else result.stdout


def _deleted(stderr: str) -> int:
    """The count in conntrack's "N flow entries have been deleted." line (0 when absent)."""
    for line in stderr.splitlines():
        words = line.split()
        if "deleted." in words and "flow" in words:
            index = words.index("flow")
            return _int(words[index - 1]) if index else 0
    return 0


def session_rows(flows: list[dict[str, Any]]) -> list[GatewaySessionRow]:
    """`sessions()`'s flows as the status rows the gateway and the kernel relays show."""
    return [
        GatewaySessionRow(
            row["rule"],
            row["proto"],
            row["client"],
            row["public_port"],
            row["target"],
            row["state"],
            row["age"],
        )
        for row in flows
    ]


def sessions(claims: list[Claim]) -> list[dict[str, Any]]:
    """The DNATed flows now, one dict per flow (rule, proto, client, target, state, age)."""
    binary = shutil.which("conntrack")
    if binary is None:
        return []
    return parse(_run([binary, "-L", "--dst-nat", "-o", "xml"]), claims)


def _flows(text: str) -> list[dict[str, Any]]:
    """conntrack's XML listing, one dict per flow: the original tuple and the reply's ends."""
    try:
        root = ET.fromstring(text) if text.strip() else None
    except ET.ParseError:
        return []
    out: list[dict[str, Any]] = []
    for flow in root.iter("flow") if root is not None else ():
        metas = {meta.get("direction"): meta for meta in flow.findall("meta")}
        original, reply, independent = metas.get("original"), metas.get("reply"), metas.get("independent")
        if original is None or reply is None:
            continue
        proto = original.find("layer4")
        proto_name = proto.get("protoname", "") if proto is not None else ""
        state = independent.findtext("state") if independent is not None else None
        if state is None and independent is not None:
            state = "UNREPLIED" if independent.find("unreplied") is not None else "ASSURED"
        age = independent.findtext("deltatime") if independent is not None else None
        src, dst = original.findtext("layer3/src") or "", original.findtext("layer3/dst") or ""
        sport, dport = _int(original.findtext("layer4/sport")), _int(original.findtext("layer4/dport"))
        out.append(
            {
                "original": (proto_name, src, dst, sport, dport),
                "reply_src": reply.findtext("layer3/src") or "",
                "reply_sport": _int(reply.findtext("layer4/sport")),
                "reply_dst": reply.findtext("layer3/dst") or "",
                "state": state or "",
                "age": _int(age) if age is not None else None,
            }
        )
    return out


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse(text: str, claims: list[Claim], limit: int | None = MAX_SESSIONS) -> list[dict[str, Any]]:
    """conntrack's XML listing to rows; flows that match no claim are left out. At most `limit`
    rows (a status table's worth; None: all, to clear them)."""
    rows: list[dict[str, Any]] = []
    for flow in _flows(text):
        proto, src, dst, sport, dport = flow["original"]
        owner = next(
            (
                claim.name
                for claim in claims
                if claim.owns(proto, dport, flow["reply_src"], flow["reply_sport"], dst)
            ),
            None,
        )
        if owner is None:
            continue
        rows.append(
            {
                "rule": owner,
                "proto": proto,
                "client": _endpoint(src, sport),
                "public_port": dport,
                "target": _endpoint(flow["reply_src"], flow["reply_sport"]),
                "state": flow["state"],
                "age": flow["age"],
                "original": flow["original"],
                "reply": (flow["reply_src"], flow["reply_sport"]),
            }
        )
        if limit is not None and len(rows) >= limit:
            break
    return rows


def claims(gateway: GatewaySpec) -> list[Claim]:
    """Which rule owns which flows: each forward (by its name or index) by its WAN ports and
    LAN target, each trigger by its opened ports. IPv6 pinholes translate nothing: no claim."""
    out: list[Claim] = []
    for index, rule in enumerate(gateway.forward):
        if rule.pinhole:
            continue
        name = rule.name or f"gateway.forward[{index}]"
        last = rule.to.ports.first + len(rule.port) - 1 if len(rule.to.ports) > 1 else rule.to.ports.first
        for proto, on in (("tcp", rule.protocol.has_tcp), ("udp", rule.protocol.has_udp)):
            if on:
                out.append(
                    Claim(
                        name, proto, rule.port.first, rule.port.last, rule.to.host, rule.to.ports.first, last
                    )
                )
    for index, trigger in enumerate(gateway.trigger):
        name = trigger.name or f"gateway.trigger[{index}]"
        out += [Claim(name, proto, ports.first, ports.last) for proto, ports in trigger.open]
    return out


def rule_claims(rules: Iterable[RuleSpec]) -> list[Claim]:
    """Which kernel relay owns which flows: its listen ports, answered by its target (any local
    address for a loopback target, which the kernel redirects) from the target's ports; a
    route's target too."""
    out: list[Claim] = []
    for rule in rules:
        listen = rule.listen
        if not isinstance(listen, HostPorts):
            continue
        for target in (rule.connect, *(route.connect for route in rule.route)):
            if not isinstance(target, HostPorts):
                continue
            here = is_loopback(target.host) or target.host in ("0.0.0.0", "::")  # redirected
            host = "" if here else target.host
            asked = "" if listen.host in ("", "0.0.0.0", "::") else listen.host
            last = target.ports.first + len(listen.ports) - 1 if len(target.ports) > 1 else target.ports.first
            for proto, on in (("tcp", rule.protocol.has_tcp), ("udp", rule.protocol.has_udp)):
                if on:
                    out.append(
                        Claim(
                            rule.label,
                            proto,
                            listen.ports.first,
                            listen.ports.last,
                            host,
                            target.ports.first,
                            last,
                            asked,
                        )
                    )
    return out


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0
