"""The nft and ip calls around the gateway's table: apply, read, compare, remove.

The plan itself is pure and lives in gwplan.py. `apply()` replaces the whole table in one nft
transaction (add, delete, add again, then the contents): either all of it takes effect or none,
and nothing outside table `inet portfwd` is touched.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import os
import re
import shutil
import subprocess
from typing import Any

from portfwd.errors import RuntimeFailure
from portfwd.kernel.gwplan import (
    FAMILY,
    TABLE,
    Interfaces,
    check,
    notes,
    plan,
    trigger_mark,
    wan_addresses_batch,
)
from portfwd.specs import GatewaySpec


class GatewayError(RuntimeFailure):
    """The gateway plan cannot be built or applied; the message names the rule or interface."""


def hand_over(index: int, host: str) -> None:
    """Give trigger `index`'s ports to `host` now (last-wins), replacing any holder. Raises GatewayError."""
    mark = trigger_mark(index)
    name = f"trig_host_{index}"
    # nft 1.0.6 has no "replace element" (and no "destroy"): delete the holder if there is one,
    # then add. Between the two, an inbound packet is simply not forwarded.
    run("delete", "element", FAMILY, TABLE, name, f"{{ {mark} }}")
    batch = f"add element {FAMILY} {TABLE} {name} {{ {mark} : {host} }}\n"
    result = run("-f", "-", payload=batch)
    if result.returncode != 0:
        raise GatewayError(f"cannot hand trigger {index} to {host}: {one_line(result.stderr)}")


def document(ruleset: str) -> str:
    """Replace table inet portfwd with `ruleset` in one nft transaction (one file = one batch)."""
    return f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n{ruleset}"


# --------------------------------------------------------------------------- nft calls


def run(
    *args: str, payload: str | None = None, error: type[RuntimeFailure] = GatewayError
) -> subprocess.CompletedProcess[str]:
    """`nft ARGS` (the gateway's and the kernel relays' one way to call it). Raises `error`
    when nft is missing or cannot run; its own refusals are in the result."""
    binary = shutil.which("nft")
    if binary is None:
        raise error("nft is not installed", hint="apt-get install nftables")
    try:
        return subprocess.run([binary, *args], input=payload, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"nft could not run: {exc}") from exc


def one_line(stderr: str) -> str:
    """nft's first error line (quotes made plain), for a one-line message."""
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
    (re.compile(r"\ballow6?_(\d+)\b"), "gateway.forward[{}].allow"),
    (re.compile(r"\bdnat_(\d+)_"), "gateway.forward[{}]"),
    (re.compile(r"\btrig_open_(\d+)\b"), "gateway.trigger[{}].open"),
    (re.compile(r"\btrig_out_(\d+)\b"), "gateway.trigger[{}].trigger"),
    (re.compile(r"\btrig_host_(\d+)\b"), "gateway.trigger[{}]"),
)


def error_at(text: str, stderr: str) -> tuple[str, int, int, str, str] | None:
    """nft's first error in the document `text` it read from stdin: (the document's line, the
    first and last column nft points at, its message, the text under those columns); None when
    stderr names no line of the document.

    nft reports `/dev/stdin:LINE:FIRST-LAST: Error: ...`; the gateway's and the kernel relays'
    explainers each trace the line to the config rule it came from.
    """
    found = _NFT_ERROR.search(stderr)
    if found is None:
        return None
    number, first, last, message = int(found[1]), int(found[2]), int(found[3]), found[4].strip()
    lines = text.splitlines()
    if not 1 <= number <= len(lines):
        return None
    line = lines[number - 1]
    return line, first, last, message, line[first - 1 : last].strip()


def explain(text: str, stderr: str) -> tuple[str, str] | None:
    """(config rule, what nft said) for nft's first error in the document `text`, if traceable.

    The rule is the comment of the map element under the columns, else the rule line's own
    comment, else the set or map name (`allow_2` is gateway.forward[2].allow).
    """
    error = error_at(text, stderr)
    if error is None:
        return None
    line, first, last, message, culprit = error
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
    result = run(*args, payload=text)
    if result.returncode != 0:
        explained = explain(text, result.stderr)
        if explained is not None:
            rule, what = explained
            raise GatewayError(f"{rule}: nft refused it: {what}; nothing changed, the previous ruleset stays")
        raise GatewayError(f"nft refused the ruleset; nothing changed: {one_line(result.stderr)}")


def _absent(result: subprocess.CompletedProcess[str]) -> bool:
    """Whether a failed `nft list table` means the table is not there (None) or something else
    (no permission: raised, so that nobody reads "not loaded" for "cannot look")."""
    if "No such file or directory" in result.stderr:
        return True
    raise GatewayError(f"cannot read table {FAMILY} {TABLE}: {one_line(result.stderr)}", hint="run as root")


def live() -> dict[str, Any] | None:
    """portfwd's table as nft lists it now (JSON), or None when it is not there."""
    result = run("-j", "list", "table", FAMILY, TABLE)
    if result.returncode != 0 and _absent(result):
        return None
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def remove() -> bool:
    """Delete table inet portfwd (only it). Returns False when it was not there."""
    if live() is None:
        return False
    result = run("delete", "table", FAMILY, TABLE)
    if result.returncode != 0:
        raise GatewayError(f"nft could not delete table {FAMILY} {TABLE}: {one_line(result.stderr)}")
    return True


FORWARDING = (
    ("IPv4", "/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward"),
    ("IPv6", "/proc/sys/net/ipv6/conf/all/forwarding", "net.ipv6.conf.all.forwarding"),
)
IPV6_DISABLED = "/proc/sys/net/ipv6/conf/all/disable_ipv6"


#: The forwarding switches portfwd turned on, in the state directory: put back at exit.
SAVED_FORWARDING = "forwarding-switched-on"


def forwarding_problems(
    enable: bool,
    switches: tuple[tuple[str, str, str], ...] = FORWARDING,
    ipv6_disabled: str = IPV6_DISABLED,
    saved: str | None = None,
    remedy: str = ", or set enable_forwarding = true",
) -> list[str]:
    """What to do about the kernel not routing IPv4 (and IPv6); with `enable`, switch them on.
    `remedy`: what else the line suggests (the gateway's own switch; a kernel relay has none).

    A switch portfwd turns on is written down in the file `saved` (the state directory's
    SAVED_FORWARDING), so that `restore_forwarding` turns it off again when the gateway goes:
    the IPv6 firewall goes with portfwd's table, and forwarding left on without it would open
    the LAN. A box with IPv6 switched off altogether gets no IPv6 line.
    """
    problems = []
    for family, path, key in switches:
        if family == "IPv6" and reads_one(ipv6_disabled):
            continue
        try:
            with open(path, encoding="ascii") as handle:
                if handle.read().strip() == "1":
                    continue
            if enable:
                if saved is not None:
                    os.makedirs(os.path.dirname(saved), mode=0o700, exist_ok=True)
                    with open(saved, "a", encoding="ascii") as record:
                        record.write(path + "\n")
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
        problems.append(f"{family} forwarding is off: run sysctl -w {key}=1{remedy}")
    return problems


def restore_forwarding(saved: str) -> list[str]:
    """Turn off the forwarding switches `forwarding_problems` turned on (recorded in `saved`),
    and forget them; returns the sysctl paths it turned off."""
    try:
        with open(saved, encoding="ascii") as record:
            paths = [line.strip() for line in record if line.strip() in {path for _, path, _ in FORWARDING}]
    except OSError:
        return []
    done = []
    for path in dict.fromkeys(paths):
        try:
            with open(path, "w", encoding="ascii") as handle:
                handle.write("0\n")
            done.append(path)
        except OSError:
            continue
    with contextlib.suppress(OSError):
        os.unlink(saved)
    return done


def reads_one(path: str) -> bool:
    """Whether a /proc/sys switch reads 1 (False when it cannot be read)."""
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip() == "1"
    except OSError:
        return False


def _addresses(name: str, field: str) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """The addresses of interface `name` (IPv6 ones of global scope only), by `ip -j addr`."""
    try:
        result = subprocess.run(
            ["ip", "-j", "addr", "show", "dev", name], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GatewayError(f"cannot run ip: {exc}", hint="apt-get install iproute2") from exc
    if result.returncode != 0:
        raise GatewayError(f"no interface {name!r} on this machine", field=field, hint="see ip link")
    out: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    for link in json.loads(result.stdout or "[]"):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet6" and info.get("scope") != "global":
                continue
            if info.get("family") in ("inet", "inet6"):
                out.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}"))
    return out


_FLOWTABLES: list[bool] = []


def flowtables_supported() -> bool:
    """Whether this kernel has nftables flowtables: one is made in a throwaway network namespace."""
    if not _FLOWTABLES:
        unshare, binary = shutil.which("unshare"), shutil.which("nft")
        probe = "table inet probe {\n flowtable f { hook ingress priority filter; devices = { lo }; }\n}\n"
        ok = False
        if unshare is not None and binary is not None:
            try:
                ok = (
                    subprocess.run(
                        [unshare, "--net", binary, "-f", "-"],
                        input=probe,
                        capture_output=True,
                        text=True,
                        timeout=30,
                    ).returncode
                    == 0
                )
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _FLOWTABLES.append(ok)
    return _FLOWTABLES[0]


def interfaces(config: GatewaySpec) -> Interfaces:
    """Read the WAN addresses and LAN networks with `ip -j addr`. Raises GatewayError for a missing one."""
    wan = _addresses(config.wan, "gateway.wan")
    lan = _addresses(config.lan, "gateway.lan")
    return Interfaces(
        tuple(str(item.ip) for item in wan if item.version == 4),
        tuple(item.network for item in lan if isinstance(item, ipaddress.IPv4Interface)),
        tuple(item.network for item in lan if isinstance(item, ipaddress.IPv6Interface)),
        flowtables=config.flowtable and flowtables_supported(),
    )


def prepare(config: GatewaySpec) -> tuple[str, list[str]]:
    """Read the interfaces, check the plan against them, and return the ruleset and its notes.

    Raises GatewayError for the first problem.
    """
    found = interfaces(config)
    problems = check(config, found)
    if problems:
        raise GatewayError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return plan(config, found), notes(config, found)


def set_wan_addresses(addresses: tuple[str, ...]) -> None:
    """Make the live table's `wan_addresses` set hold `addresses` (one transaction). Raises GatewayError."""
    result = run("-f", "-", payload=wan_addresses_batch(addresses))
    if result.returncode != 0:
        raise GatewayError(f"cannot update the WAN addresses: {one_line(result.stderr)}")


def batch(text: str, doing: str) -> None:
    """Run an nft batch (one transaction). Raises GatewayError saying what it was `doing`."""
    result = run("-f", "-", payload=text)
    if result.returncode != 0:
        raise GatewayError(f"cannot {doing}: {one_line(result.stderr)}")


def ruleset() -> dict[str, Any]:
    """The whole ruleset as nft lists it (JSON), to see what other tables do; empty when unreadable."""
    result = run("-j", "list", "ruleset")
    if result.returncode != 0:
        return {}
    try:
        data = json.loads(result.stdout or "{}")
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


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
    result = run("-s", "list", "table", FAMILY, TABLE)
    if result.returncode != 0 and _absent(result):
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


def diff(ruleset: str, devices: tuple[str, ...] = ()) -> list[str] | None:
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
    # The interfaces the plan names exist there too, as dummies: a flowtable needs its devices.
    script = (
        'for dev in "$@"; do ip link add "$dev" type dummy 2>/dev/null; done; '
        f"{binary} -f - && {binary} -s list table {FAMILY} {TABLE}"
    )
    try:
        result = subprocess.run(
            [unshare, "--net", "sh", "-c", script, "sh", *devices],
            input=ruleset,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GatewayError(f"cannot diff: {exc}") from exc
    if result.returncode != 0:
        raise GatewayError(f"cannot diff against the live table: {one_line(result.stderr)}")
    planned = _without_live_elements(result.stdout)
    return list(
        difflib.unified_diff(
            live_text.splitlines(), planned.splitlines(), "live table", "this plan", lineterm="", n=1
        )
    )
