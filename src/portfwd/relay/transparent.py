"""Whether this host can run transparent rules: the privilege and the policy routing they need.

A transparent rule's upstream connections leave from the client's own address (relay/upstream.py
`bind_to_client`). The backend answers that address; for its answers to reach portfwd's socket
instead of being forwarded towards the client, the portfwd host needs, per address family:

- an nftables rule that marks packets belonging to a transparent socket
  (`socket transparent 1 meta mark set 0x1`, in a chain hooked at prerouting), and
- an `ip rule` sending that mark to a table whose only route is `local default dev lo`.

`problems` reads what it can (`/proc/self/status`, `ip -j rule/route`, `nft -j list ruleset`)
and returns one line per thing missing, with the commands that add it. It runs subprocesses, so
it is for `portfwd check` and rule start, never per connection.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from portfwd.addr import HostPorts
from portfwd.specs import RuleSpec

#: The mark, routing table and nft table the README's commands use (any consistent choice works).
MARK = 0x1
TABLE = "100"
NFT_TABLE = "portfwd_transparent"
#: A subprocess that takes longer than this is reported, not waited for.
TIMEOUT = 5.0

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13  # IP_TRANSPARENT accepts either

_ANY = {4: "0.0.0.0/0", 6: "::/0"}
#: nft families whose prerouting hook sees packets of each IP version.
_NFT_FAMILIES = {4: ("ip", "inet"), 6: ("ip6", "inet")}

Runner = Callable[[list[str]], tuple[int, str, str]]  # argv -> (returncode, stdout, stderr)


class ToolError(Exception):
    """A command could not tell: missing, refused, too slow, or said something unreadable."""


def run_command(argv: list[str]) -> tuple[int, str, str]:
    """Run `argv` with a bounded wait; raises ToolError when it is missing or does not answer."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError as exc:
        package = "nftables" if argv[0] == "nft" else "iproute2"
        raise ToolError(f"{argv[0]} is not installed (apt-get install {package})") from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"`{' '.join(argv)}` did not answer within {TIMEOUT:g}s") from exc
    except OSError as exc:
        raise ToolError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    return done.returncode, done.stdout, done.stderr


def capable(status: str) -> bool | None:
    """Whether /proc/<pid>/status text shows CAP_NET_ADMIN or CAP_NET_RAW effective (None: no line)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split(":", 1)[1].strip(), 16)
            return bool(effective & (1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW))
    return None


@dataclass(frozen=True, slots=True)
class MarkRule:
    """An `ip rule fwmark MARK[/MASK] lookup TABLE`."""

    mark: int
    mask: int
    table: str

    def matches(self, mark: int | None) -> bool:
        """Whether packets with `mark` (None: some mark nft cannot show) take this rule."""
        return mark is None or mark & self.mask == self.mark

    def __str__(self) -> str:
        mask = "" if self.mask == 0xFFFFFFFF else f"/{self.mask:#x}"
        return f"fwmark {self.mark:#x}{mask} lookup {self.table}"


def mark_rules(rules_json: str) -> list[MarkRule]:
    """The fwmark rules of `ip -j rule show` output, in priority order; raises ValueError."""
    found = []
    for rule in json.loads(rules_json or "[]"):
        if "fwmark" not in rule or "not" in rule or "table" not in rule:
            continue
        mask = int(rule.get("fwmask", "0xffffffff"), 16)
        found.append(MarkRule(int(rule["fwmark"], 16) & mask, mask, str(rule["table"])))
    return found


def routes_locally(routes_json: str) -> bool:
    """Whether `ip -j route show table N` output has `local default dev lo`; raises ValueError."""
    return any(
        route.get("type") == "local"
        and route.get("dst") in ("default", "0.0.0.0/0", "::/0")
        and route.get("dev") == "lo"
        for route in json.loads(routes_json or "[]")
    )


def socket_marks(ruleset_json: str) -> dict[str, list[int | None]]:
    """Per nft family, the marks that `socket transparent 1 ... meta mark set` rules give (None:
    a value this cannot read, e.g. iptables-nft's `-m socket -j MARK`). Only rules in a chain
    hooked at prerouting, or in a regular chain (one jumped to, as haproxy's DIVERT), count.
    Raises ValueError on output that is not nft's JSON.
    """
    items = json.loads(ruleset_json)["nftables"]
    hooks = {
        (chain["family"], chain["table"], chain["name"]): chain.get("hook")
        for item in items
        if (chain := item.get("chain")) is not None
    }
    found: dict[str, list[int | None]] = {}
    for item in items:
        rule = item.get("rule")
        if rule is None:
            continue
        if hooks.get((rule["family"], rule["table"], rule["chain"])) not in (None, "prerouting"):
            continue
        expressions = rule.get("expr", [])
        if not any(_transparent_match(expression) for expression in expressions):
            continue
        for expression in expressions:
            if marks := _marks_set(expression):
                found.setdefault(rule["family"], []).extend(marks)
    return found


def _transparent_match(expression: dict[str, Any]) -> bool:
    match = expression.get("match")
    if match is not None:
        left = match.get("left")
        return left == {"socket": {"key": "transparent"}} and match.get("right") in (1, True)
    xt = expression.get("xt")
    return isinstance(xt, dict) and xt.get("type") == "match" and xt.get("name") == "socket"


def _marks_set(expression: dict[str, Any]) -> list[int | None]:
    """The mark a statement sets ([]: it sets none; [None]: one this cannot read)."""
    mangle = expression.get("mangle")
    if mangle is not None and mangle.get("key") == {"meta": {"key": "mark"}}:
        value = mangle.get("value")
        if isinstance(value, int):
            return [value]
        if isinstance(value, dict) and isinstance(operands := value.get("|"), list):  # mark | 0x1
            return [next((operand for operand in operands if isinstance(operand, int)), None)]
        return [None]
    xt = expression.get("xt")
    if isinstance(xt, dict) and xt.get("type") == "target" and xt.get("name") == "MARK":
        return [None]
    return []


def families(rule: RuleSpec) -> set[int]:
    """The IP versions (4, 6) of a rule's targets; a host name counts as IPv4."""
    targets = [rule.connect, *(backend.connect for backend in rule.backends)]
    targets += [route.connect for route in rule.route]
    return {_version(target.host) for target in targets if isinstance(target, HostPorts)}


def _version(host: str) -> int:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).version
    except ValueError:
        return 4


def _named(rules: list[RuleSpec]) -> str:
    labels = ", ".join(rule.label for rule in rules)
    return f"transparent rule{'s' if len(rules) > 1 else ''} {labels}"


def nft_command(mark: int) -> str:
    """One shell command adding the nft table that marks packets of transparent sockets."""
    return (
        f"nft 'add table inet {NFT_TABLE}; add chain inet {NFT_TABLE} prerouting "
        "{ type filter hook prerouting priority mangle; policy accept; }; "
        f"add rule inet {NFT_TABLE} prerouting meta l4proto tcp socket transparent 1 meta mark set {mark:#x}'"
    )


def route_command(version: int, table: str) -> str:
    """The command adding the local default route to `table`."""
    ip = "ip" if version == 4 else "ip -6"
    return f"{ip} route add local {_ANY[version]} dev lo table {table}"


def problems(
    rules: Iterable[RuleSpec],
    *,
    user: str | None = None,
    run: Runner = run_command,
    status: Callable[[], str] | None = None,
) -> list[str]:
    """What keeps the transparent rules among `rules` from working here, one line each, naming
    the rules and the fix; [] when nothing is missing (or no rule is transparent).

    `user` is the config's `user =` (its privilege drop loses the capability). `run` and
    `status` (the text of /proc/self/status) are for tests. Raises nothing: a tool that is
    missing or refuses becomes a line.
    """
    chosen = [rule for rule in rules if rule.transparent]
    if not chosen:
        return []
    named = _named(chosen)
    if not sys.platform.startswith("linux"):
        return [f"{named}: transparent = true works on Linux only; remove it"]
    lines = _mismatched(chosen)
    if user is not None:
        lines.append(
            f"{named}: user = {user!r} drops every capability after binding, and each transparent "
            "connection needs CAP_NET_ADMIN; remove user = (run as root, or with CAP_NET_ADMIN)"
        )
    lines += _privilege(named, status)
    needed = {version: [rule for rule in chosen if version in families(rule)] for version in (4, 6)}
    routing: dict[int, Routing] = {}
    for version, users in needed.items():
        if users:
            try:
                routing[version] = read_routing(version, run)
            except ToolError as exc:
                lines.append(f"{_named(users)}: cannot read the IPv{version} policy routing: {exc}")
    try:
        marks: dict[str, list[int | None]] | None = _nft_marks(run)
    except ToolError as exc:
        marks = None
        lines.append(f"{named}: cannot tell whether packets of transparent sockets are marked: {exc}")
    marked = {
        version: None if marks is None else [m for f in _NFT_FAMILIES[version] for m in marks.get(f, [])]
        for version in needed
    }
    unmarked = [version for version, users in needed.items() if users and marked[version] == []]
    if unmarked:
        found = [rule for version in unmarked if version in routing for rule in routing[version].candidates]
        users = [rule for rule in chosen if families(rule) & set(unmarked)]
        versions = " and ".join(f"IPv{version}" for version in unmarked)
        lines.append(
            f"{_named(users)}: no nftables rule marks {versions} packets of transparent sockets "
            "(`socket transparent 1 meta mark set`), so the backends' answers would not reach "
            f"portfwd; run: {nft_command(found[0].mark if found else MARK)}"
        )
    for version, found_routing in routing.items():
        lines += _route_lines(version, _named(needed[version]), found_routing, marked[version])
    return lines


@dataclass(frozen=True, slots=True)
class Routing:
    """The fwmark rules of one IP version, and which of them reach a local default route."""

    fwmarks: tuple[MarkRule, ...]
    routed: tuple[MarkRule, ...]

    @property
    def candidates(self) -> tuple[MarkRule, ...]:
        """The rules to suggest a mark from: the routed ones first."""
        return self.routed + self.fwmarks


def read_routing(version: int, run: Runner = run_command) -> Routing:
    """Read the policy routing of IP `version` (4 or 6); raises ToolError."""
    ip = ["ip", f"-{version}", "-j"]
    code, out, err = run([*ip, "rule", "show"])
    if code != 0:
        raise ToolError(f"`ip -{version} rule show` failed: {' '.join(err.split())}")
    try:
        fwmarks = mark_rules(out)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ToolError(f"`ip -{version} -j rule show` printed something unexpected ({exc})") from exc
    routed = []
    for rule in fwmarks:
        code, out, _ = run([*ip, "route", "show", "table", rule.table])
        try:  # a table that does not exist: an error, and no route
            local = code == 0 and routes_locally(out)
        except (ValueError, TypeError, AttributeError):
            local = False
        if local:
            routed.append(rule)
    return Routing(tuple(fwmarks), tuple(routed))


def _route_lines(version: int, named: str, routing: Routing, marks: list[int | None] | None) -> list[str]:
    """What the ip rules of one version lack for packets marked `marks` (None: not known)."""
    default = routing.candidates[0].mark if routing.candidates else MARK
    wanted = marks or [default]
    if any(rule.matches(mark) for rule in routing.routed for mark in wanted):
        return []
    ip = "ip" if version == 4 else "ip -6"
    waiting = [rule for rule in routing.fwmarks if any(rule.matches(mark) for mark in wanted)]
    if waiting:
        rule = waiting[0]
        return [
            f"{named}: `{ip} rule` {rule}, but table {rule.table} has no local default route, so "
            f"the backends' IPv{version} answers would not reach portfwd; run: "
            f"{route_command(version, rule.table)}"
        ]
    mark = next((mark for mark in wanted if mark is not None), default)
    if routing.routed and marks:
        why = f"nftables marks them {mark:#x}, but `{ip} rule` routes only {routing.routed[0]}"
        table = routing.routed[0].table
        fix = f"{ip} rule add fwmark {mark:#x} lookup {table}"
    else:
        why = "no ip rule sends marked packets to a table with a local default route"
        fix = f"{ip} rule add fwmark {mark:#x} lookup {TABLE} && {route_command(version, TABLE)}"
    return [
        f"{named}: the backends' IPv{version} answers to client addresses would not reach portfwd: "
        f"{why}; run: {fix}"
    ]


def _mismatched(rules: list[RuleSpec]) -> list[str]:
    """Rules whose clients can never be the source of a connection to their targets: a listener
    on one specific address of the other IP version (a wildcard may take both)."""
    lines = []
    for rule in rules:
        if not isinstance(rule.listen, HostPorts):
            continue
        try:
            address = ipaddress.ip_address(rule.listen.host.split("%", 1)[0])
        except ValueError:  # "" (every address) or a name
            continue
        if address.is_unspecified:
            continue
        listen = 4 if address.version == 4 or address.ipv4_mapped is not None else 6
        if families(rule) == {10 - listen}:
            client, target = ("IPv4", "IPv6") if listen == 4 else ("IPv6", "IPv4")
            lines.append(
                f"{_named([rule])}: listens on {client} but connects to {target}, and a connection "
                f"cannot leave from an {client} client's address to an {target} target; "
                "give the listener and the targets the same IP version"
            )
    return lines


def _privilege(named: str, status: Callable[[], str] | None) -> list[str]:
    try:
        if status is not None:
            text = status()
        else:
            with open("/proc/self/status", encoding="ascii", errors="replace") as file:
                text = file.read()
    except OSError:
        return []
    if capable(text) is not False:
        return []
    return [
        f"{named}: this process has no CAP_NET_ADMIN, and each transparent connection needs it; "
        "run portfwd as root, or give it CAP_NET_ADMIN (systemd: AmbientCapabilities=CAP_NET_ADMIN)"
    ]


def _nft_marks(run: Runner) -> dict[str, list[int | None]]:
    code, out, err = run(["nft", "-j", "list", "ruleset"])
    if code != 0:
        words = next((line.strip() for line in err.splitlines() if line.strip()), f"exit status {code}")
        raise ToolError(f"`nft list ruleset` failed ({words}); run as root to check")
    try:
        return socket_marks(out)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ToolError(f"`nft -j list ruleset` printed something unexpected ({exc})") from exc
