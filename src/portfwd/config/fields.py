"""The config file's field types: pydantic validators that turn TOML values into portfwd's types.

Each validator raises a pydantic error that carries portfwd's own one-line message (`_fail`), so
`messages.py` can report it as written; the `Annotated` types at the end are what `models.py` uses.
"""

from __future__ import annotations

import ipaddress
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import PlainValidator
from pydantic_core import PydanticCustomError

from portfwd import sshalgorithms
from portfwd.addr import Endpoint, HostPorts, PortRange, parse_listen, parse_port_range, parse_target
from portfwd.duration import parse_duration
from portfwd.errors import ConfigError
from portfwd.tunnelspec import (
    Kind,
    StartupsSpec,
    TunnelForward,
    check_tokens,
    parse_destination,
    parse_forward,
    parse_startups,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _fail(message: str) -> PydanticCustomError:
    """A pydantic error whose whole text is portfwd's line (`messages.problem` prints it as is)."""
    return PydanticCustomError("portfwd", "{line}", {"line": message})


def parse_network(value: object) -> Network:
    """Parse a CIDR such as `192.168.0.0/16`, `2001:db8::/32`, or one address (a /32 or /128).

    Raises ConfigError for bad text or host bits set.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{value!r} is not a CIDR", hint='write a string such as "10.0.0.0/8"')
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(value.strip(), strict=False)
            raise ConfigError(f"{value!r} has host bits set", hint=f"write {fixed}") from exc
        raise ConfigError(
            f"{value!r} is not an IP network",
            hint='write a CIDR such as "10.0.0.0/8" or "2001:db8::/32"',
        ) from exc


def _translating(parse: typing.Callable[[Any], Any]) -> typing.Callable[[Any], Any]:
    """Wrap a parser so its ConfigError becomes a pydantic error carrying our one line."""

    def validate(value: Any) -> Any:
        try:
            return parse(value)
        except ConfigError as exc:
            raise _fail(exc.line()) from exc

    return validate


def _networks(value: Any) -> tuple[Network, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise _fail('must be a list of CIDRs; write ["10.0.0.0/8"]')
    out = []
    for item in items:
        try:
            out.append(parse_network(item))
        except ConfigError as exc:
            raise _fail(exc.line()) from exc
    return tuple(out)


def _name(value: Any) -> str:
    """A rule, tunnel or map name: printable text of 1-64 characters (it is logged and shown),
    not `.` or `..` (the web API's paths carry it)."""
    if not isinstance(value, str):
        raise _fail("must be text in quotes")
    if not 1 <= len(value) <= 64:
        raise _fail("must have 1 to 64 characters")
    if not value.isprintable():
        raise _fail(f"{value!r} has control or invisible characters; use printable text")
    if value in (".", ".."):  # a URL path segment a browser drops: the dashboard could not name it
        raise _fail(f"{value!r} is not a usable name (web addresses cannot carry it); choose another")
    return value


def _forwards(kind: Kind) -> typing.Callable[[Any], tuple[TunnelForward, ...]]:
    def parse(value: Any) -> tuple[TunnelForward, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise _fail(f'must be a list of specs; write {kind} = ["..."]')
        out = []
        for index, item in enumerate(items):
            try:
                out.append(parse_forward(kind, item))
            except ConfigError as exc:
                raise _fail(f"[{index}] {exc.line()}") from exc
        return tuple(out)

    return parse


def _strings(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) and item for item in items):
        raise _fail('must be a path or a list of paths; write ["~/.ssh/id_ed25519"]')
    return tuple(items)


def _known_hosts(value: Any) -> tuple[str, ...]:
    """Known-hosts files: paths, with ssh's % tokens (checked here, expanded at connect)."""
    paths = _strings(value)
    for path in paths:
        try:
            check_tokens(path, "known hosts file")
        except ConfigError as exc:
            raise _fail(exc.line()) from exc
    return paths


def _host_names(value: Any) -> tuple[str, ...]:
    """DNS names (`[web] hosts`): letters, digits, dots and hyphens, lower-cased."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise _fail('must be a list of DNS names; write ["portfwd.example.net"]')
    for item in items:
        label = item.rstrip(".")
        if not 1 <= len(label) <= 253 or not all(
            char.isascii() and (char.isalnum() or char in ".-") for char in label
        ):
            raise _fail(f"{item[:80]!r} is not a DNS name; use letters, digits, dots and hyphens")
    return tuple(item.lower().rstrip(".") for item in items)


def _seconds_or_off(value: Any) -> float:
    if value in (0, "0", "off", "no"):
        return 0.0
    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise _fail(exc.line() + " (or 0 to turn it off)") from exc


def _algorithms(kind: sshalgorithms.Kind) -> PlainValidator:
    """A validator for one SSH algorithm list (sshalgorithms.py holds the safe sets)."""
    return PlainValidator(_translating(lambda value: sshalgorithms.narrow(kind, value)))


def _strictness(value: Any) -> str:
    if value in ("yes", "accept-new"):
        return str(value)
    if value in ("no", "off", False):
        raise _fail('portfwd never skips host-key checks; use "yes" or "accept-new"')
    raise _fail(f'{value!r} is not a choice; use "yes" (known keys only) or "accept-new" (record the first)')


def _destination(value: Any) -> str:
    try:
        parse_destination(value)
    except ConfigError as exc:
        raise _fail(exc.line()) from exc
    return str(value).strip()


def _permits(value: Any) -> tuple[str, ...]:
    """`host:port`, `*:port`, `host:*` or `any` (permit_open / permit_listen entries)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise _fail('must be a list like ["db.internal:5432", "*:8022", "any"]')
    out = []
    for item in items:
        text = item.strip()
        if text == "any" or (text.startswith("unix:/") and len(text) > 6):
            out.append(text)
            continue
        host, _, port = text.rpartition(":")
        if not host or not (port == "*" or (port.isdigit() and 0 <= int(port) <= 65535)):
            raise _fail(
                f'{item!r} is not host:port; write "db.internal:5432", "*:8022", "0.0.0.0:*" or "any"'
            )
        out.append(text)
    return tuple(out)


def _interface(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.@-]{1,15}", value):
        raise _fail(f'{value!r} is not an interface name; write one such as "eth0"')
    return value


def _wan_ports(value: Any) -> PortRange:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise _fail('must be a port or a range; write "8080" or "8000-8010"')
    try:
        return parse_port_range(text)
    except ConfigError as exc:
        raise _fail(exc.line()) from exc


def _lan_target(value: Any) -> HostPorts:
    try:
        target = parse_target(value)
    except ConfigError as exc:
        raise _fail(exc.line()) from exc
    if not isinstance(target, HostPorts):
        raise _fail("the kernel forwards to an address, not a Unix socket; write host:port")
    try:
        address = ipaddress.ip_address(target.host)
    except ValueError:
        raise _fail(
            f"{target.host!r} is not an IP address: the kernel forwards to addresses, not names; "
            "write the LAN host's IPv4 address, or its IPv6 address for a pinhole"
        ) from None
    return HostPorts(str(address), target.ports)


def _proto_ports(value: Any) -> tuple[str, PortRange]:
    if not isinstance(value, str) or "/" not in value:
        raise _fail(f'{value!r} is not protocol/port; write "tcp/6667" or "udp/7000-7010"')
    proto, _, ports = value.strip().partition("/")
    if proto not in ("tcp", "udp"):
        raise _fail(f'{value!r}: the protocol must be tcp or udp; write "tcp/6667"')
    try:
        return proto, parse_port_range(ports)
    except ConfigError as exc:
        raise _fail(f"{value!r}: {exc.line()}") from exc


def _proto_ports_list(value: Any) -> tuple[tuple[str, PortRange], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise _fail('must be a list; write ["tcp/7000-7010", "udp/7100"]')
    return tuple(_proto_ports(item) for item in items)


def _external_port(value: Any) -> int:
    if value == "any":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _fail(f'{value!r} is not a port; write a number in 1-65535 or "any"')
    return value


def _ipv4(value: Any) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise _fail(f"{value!r} is not an IPv4 address; write the router's LAN address") from None


def _peer(value: Any) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise _fail(
            f"{value!r} is not an IPv4 address; write the other router's address on the sync link"
        ) from None


def _virtual_addresses(value: Any) -> tuple[ipaddress.IPv4Interface, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise _fail('must be a list of address/prefix; write ["203.0.113.1/24", "192.168.1.1/24"]')
    out = []
    for item in items:
        if not isinstance(item, str) or "/" not in item:
            raise _fail(f"{item!r} is not address/prefix; write it as 203.0.113.1/24")
        try:
            out.append(ipaddress.IPv4Interface(item))
        except ValueError:
            raise _fail(f"{item!r} is not an IPv4 address/prefix; write it as 203.0.113.1/24") from None
    return tuple(out)


_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _rate(value: Any) -> tuple[int, float]:
    """`"20/s"`, `"300/m"`, `"1000/h"` or `"5/10s"`: (connections, per seconds)."""
    match = (
        re.fullmatch(r"([1-9][0-9]{0,8})/([1-9][0-9]{0,5})?([smh])", value)
        if isinstance(value, str)
        else None
    )
    if match is None:
        raise _fail(f'{value!r} is not a rate; write connections per time, e.g. "20/s", "300/m" or "5/10s"')
    count, number, unit = match.groups()
    return int(count), _RATE_UNITS[unit] * (int(number) if number else 1)


def _url(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+/\S*$", value):
        raise _fail(
            f"{value!r} is not a URL; write the router's description URL, e.g. http://192.168.1.1:5000/rootDesc.xml"
        )
    return value


_BANDWIDTH_UNITS = {
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
    "b": 1.0,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "kib": 1024.0,
    "mib": 1024.0**2,
    "gib": 1024.0**3,
}


def _bandwidth(value: Any) -> float:
    """`"10Mbit"`, `"512kbit"`, `"2MB"` or `"1MiB"` (a second, each way): bytes a second."""
    match = (
        re.fullmatch(r"([0-9]{1,9}(?:\.[0-9]{1,6})?) ?([a-zA-Z]+)(?:/s)?", value.strip())
        if isinstance(value, str)
        else None
    )
    unit = _BANDWIDTH_UNITS.get(match.group(2).lower()) if match else None
    rate = float(match.group(1)) * unit if match and unit else 0.0
    if not 1000.0 <= rate <= 1e12:
        raise _fail(
            f"{value!r} is not a bandwidth from 8kbit to 8000Gbit; write bits or bytes a second, "
            'e.g. "10Mbit", "512kbit", "2MB" or "1MiB"'
        )
    return rate


def _targets(value: Any) -> tuple[Endpoint, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not 1 <= len(items) <= 64:
        raise _fail('must be a target or a list of 1 to 64 targets; write "10.0.0.5:80" or ["a:80", "b:80"]')
    try:
        return tuple(parse_target(item) for item in items)
    except ConfigError as exc:
        raise _fail(exc.line()) from exc


def _probe(value: Any) -> bytes:
    if not isinstance(value, str) or not 1 <= len(value) <= 4096:
        raise _fail(r'must be text of 1 to 4096 characters, e.g. "PING\r\n"')
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise _fail("must be bytes written as text: characters up to \\u00ff only") from None


def _workers(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64):
        return value  # type: ignore[no-any-return]
    raise _fail(f'{value!r} is not a number of processes; write "auto" (one per core) or 1 to 64')


ListenEndpoint = Annotated[Endpoint, PlainValidator(_translating(parse_listen))]
Workers = Annotated[int | str, PlainValidator(_workers)]
Targets = Annotated[tuple[Endpoint, ...], PlainValidator(_targets)]
Bandwidth = Annotated[float, PlainValidator(_bandwidth)]
Probe = Annotated[bytes, PlainValidator(_probe)]
TargetEndpoint = Annotated[Endpoint, PlainValidator(_translating(parse_target))]
Name = Annotated[str, PlainValidator(_name)]
Duration = Annotated[float, PlainValidator(_translating(parse_duration))]
SecondsOrOff = Annotated[float, PlainValidator(_seconds_or_off)]
Networks = Annotated[tuple[Network, ...], PlainValidator(_networks)]
Paths = Annotated[tuple[str, ...], PlainValidator(_strings)]
KnownHostsPaths = Annotated[tuple[str, ...], PlainValidator(_known_hosts)]
HostNames = Annotated[tuple[str, ...], PlainValidator(_host_names)]
Destination = Annotated[str, PlainValidator(_destination)]
Strictness = Annotated[str, PlainValidator(_strictness)]
LocalForwards = Annotated[tuple[TunnelForward, ...], PlainValidator(_forwards("local"))]
RemoteForwards = Annotated[tuple[TunnelForward, ...], PlainValidator(_forwards("remote"))]
DynamicForwards = Annotated[tuple[TunnelForward, ...], PlainValidator(_forwards("dynamic"))]
Kex = Annotated[tuple[str, ...], _algorithms("kex")]
Ciphers = Annotated[tuple[str, ...], _algorithms("ciphers")]
Macs = Annotated[tuple[str, ...], _algorithms("macs")]
HostKeyAlgorithms = Annotated[tuple[str, ...], _algorithms("host_key_algorithms")]
Startups = Annotated[StartupsSpec, PlainValidator(_translating(parse_startups))]
Permits = Annotated[tuple[str, ...], PlainValidator(_permits)]
Interface = Annotated[str, PlainValidator(_interface)]
WanPorts = Annotated[PortRange, PlainValidator(_wan_ports)]
LanTarget = Annotated[HostPorts, PlainValidator(_lan_target)]
ProtoPorts = Annotated[tuple[str, PortRange], PlainValidator(_proto_ports)]
ProtoPortsList = Annotated[tuple[tuple[str, PortRange], ...], PlainValidator(_proto_ports_list)]
ExternalPort = Annotated[int, PlainValidator(_external_port)]
Url = Annotated[str, PlainValidator(_url)]
Rate = Annotated[tuple[int, float], PlainValidator(_rate)]
IPv4 = Annotated[str, PlainValidator(_ipv4)]
Peer = Annotated[str, PlainValidator(_peer)]
VirtualAddresses = Annotated[tuple[ipaddress.IPv4Interface, ...], PlainValidator(_virtual_addresses)]
MapMethod = Literal["auto", "pcp", "natpmp", "upnp"]
