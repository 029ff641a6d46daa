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

from portfwd.addr import HostPorts
from portfwd.specs import GatewaySpec, RuleSpec

TIMESTAMP = Path("/proc/sys/net/netfilter/nf_conntrack_timestamp")
#: The timestamp setting found before portfwd turned it on, in the state directory.
SAVED_TIMESTAMP = "conntrack-timestamp"
#: `conntrack -D` calls made at most by one `forget` (one per port in use, one per LAN network).
MAX_DELETES = 1000
#: Rows kept per refresh; a busy router can track far more flows than a status table shows.
MAX_SESSIONS = 500


@dataclass(frozen=True, slots=True)
class Claim:
    """Which rule owns a WAN port: `name` for flows to `proto` ports `first`..`last`."""

    name: str
    proto: str
    first: int
    last: int


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


def forget(claims: list[Claim], lan_networks: tuple[ipaddress.IPv4Network, ...]) -> int:
    """Delete the flows the gateway translated; returns how many conntrack said it deleted.

    DNATed flows to a claimed port (forwards, triggers, hairpin, the router's own), one
    `conntrack -D` per port in use; masqueraded flows from the LAN's networks, one per network.
    """
    binary = shutil.which("conntrack")
    if binary is None:
        return 0
    listing = _run([binary, "-L", "--dst-nat", "-o", "xml"])
    ports = sorted({(row["proto"], int(row["public_port"])) for row in parse(listing, claims)})
    calls = [[binary, "-D", "--dst-nat", "-p", proto, "--orig-port-dst", str(port)] for proto, port in ports]
    calls += [[binary, "-D", "--src-nat", "-s", str(network)] for network in lan_networks]
    deleted = 0
    for call in calls[:MAX_DELETES]:
        deleted += _deleted(_run(call, stderr=True))
    return deleted


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


def sessions(claims: list[Claim]) -> list[dict[str, Any]]:
    """The DNATed flows now, one dict per flow (rule, proto, client, target, state, age)."""
    binary = shutil.which("conntrack")
    if binary is None:
        return []
    return parse(_run([binary, "-L", "--dst-nat", "-o", "xml"]), claims)


def parse(text: str, claims: list[Claim]) -> list[dict[str, Any]]:
    """conntrack's XML listing to rows; flows that match no claim are left out."""
    try:
        root = ET.fromstring(text) if text.strip() else None
    except ET.ParseError:
        return []
    rows: list[dict[str, Any]] = []
    for flow in root.iter("flow") if root is not None else ():
        metas = {meta.get("direction"): meta for meta in flow.findall("meta")}
        original, reply, independent = metas.get("original"), metas.get("reply"), metas.get("independent")
        if original is None or reply is None:
            continue
        proto = original.find("layer4")
        proto_name = proto.get("protoname", "") if proto is not None else ""
        dport = _int(original.findtext("layer4/dport"))
        owner = _owner(claims, proto_name, dport)
        if owner is None:
            continue
        state = independent.findtext("state") if independent is not None else None
        if state is None and independent is not None:
            state = "UNREPLIED" if independent.find("unreplied") is not None else "ASSURED"
        age = independent.findtext("deltatime") if independent is not None else None
        rows.append(
            {
                "rule": owner,
                "proto": proto_name,
                "client": f"{original.findtext('layer3/src')}:{original.findtext('layer4/sport')}",
                "public_port": dport,
                "target": f"{reply.findtext('layer3/src')}:{reply.findtext('layer4/sport')}",
                "state": state or "",
                "age": _int(age) if age is not None else None,
            }
        )
        if len(rows) >= MAX_SESSIONS:
            break
    return rows


def _owner(claims: list[Claim], proto: str, dport: int) -> str | None:
    for claim in claims:
        if claim.proto == proto and claim.first <= dport <= claim.last:
            return claim.name
    return None


def claims(gateway: GatewaySpec) -> list[Claim]:
    """Which rule owns which WAN ports: each forward (by its name or index), each trigger's opened ports."""
    out: list[Claim] = []
    for index, rule in enumerate(gateway.forward):
        name = rule.name or f"gateway.forward[{index}]"
        for proto, on in (("tcp", rule.protocol.has_tcp), ("udp", rule.protocol.has_udp)):
            if on:
                out.append(Claim(name, proto, rule.port.first, rule.port.last))
    for index, trigger in enumerate(gateway.trigger):
        name = trigger.name or f"gateway.trigger[{index}]"
        out += [Claim(name, proto, ports.first, ports.last) for proto, ports in trigger.open]
    return out


def rule_claims(rules: Iterable[RuleSpec]) -> list[Claim]:
    """Which kernel relay owns which listen ports (a flow's original destination port)."""
    out: list[Claim] = []
    for rule in rules:
        if not isinstance(rule.listen, HostPorts):
            continue
        for proto, on in (("tcp", rule.protocol.has_tcp), ("udp", rule.protocol.has_udp)):
            if on:
                out.append(Claim(rule.label, proto, rule.listen.ports.first, rule.listen.ports.last))
    return out


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0
