"""The config file: pydantic models, TOML loading, and translation of every problem into one line.

This is the only module that imports pydantic. Everything it returns is frozen; the engine
reads the models' attributes and never mutates them.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
import tomllib
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, ValidationError
from pydantic_core import PydanticCustomError

from portfwd import sshalgorithms
from portfwd.addr import (
    Endpoint,
    HostPorts,
    PortRange,
    Transport,
    UnixPath,
    parse_listen,
    parse_port_range,
    parse_target,
)
from portfwd.duration import parse_duration
from portfwd.errors import ConfigError
from portfwd.tunnelspec import (
    Kind,
    StartupsSpec,
    TunnelForward,
    parse_destination,
    parse_forward,
    parse_startups,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Sections PRODUCT.md describes whose engines are not in this version yet.
_PLANNED_SECTIONS: dict[str, str] = {}


def _fail(message: str) -> PydanticCustomError:
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
    """A rule, tunnel or map name: printable text of 1-64 characters (it is logged and shown)."""
    if not isinstance(value, str):
        raise _fail("must be text in quotes")
    if not 1 <= len(value) <= 64:
        raise _fail("must have 1 to 64 characters")
    if not value.isprintable():
        raise _fail(f"{value!r} has control or invisible characters; use printable text")
    return value


ListenEndpoint = Annotated[Endpoint, PlainValidator(_translating(parse_listen))]
Name = Annotated[str, PlainValidator(_name)]
TargetEndpoint = Annotated[Endpoint, PlainValidator(_translating(parse_target))]
Duration = Annotated[float, PlainValidator(_translating(parse_duration))]
Networks = Annotated[tuple[Network, ...], PlainValidator(_networks)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class RouteConfig(_Model):
    """`[[forward.route]]`: clients from `source` go to `connect` instead of the rule's target."""

    source: Networks
    connect: TargetEndpoint


class ForwardConfig(_Model):
    """`[[forward]]`: one userspace proxy rule."""

    name: Name | None = None
    listen: ListenEndpoint
    connect: TargetEndpoint
    protocol: Transport = Transport.TCP
    allow: Networks = ()
    deny: Networks = ()
    route: tuple[RouteConfig, ...] = ()
    udp_idle_timeout: Duration = 60.0
    udp_max_flows: int = Field(default=1024, ge=1, le=1_000_000)
    connect_timeout: Duration = 10.0
    relay: Literal["auto", "splice", "protocol"] = "auto"
    dual_stack: StrictBool = False
    backlog: int = Field(default=1024, ge=1, le=65535)
    map: StrictBool = False
    tcp_keepalive: StrictBool = True  # on both sides of every TCP session (relay/listener.KEEPALIVE)
    idle_timeout: Duration | None = None  # close a TCP session that moved no byte for this long

    @property
    def label(self) -> str:
        """The rule's name for logs and tables; defaults to its listen side."""
        if self.name is not None:
            return self.name
        suffix = "" if self.protocol is Transport.TCP else f"/{self.protocol.value}"
        return f"{self.listen}{suffix}"


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


Kex = Annotated[tuple[str, ...], _algorithms("kex")]
Ciphers = Annotated[tuple[str, ...], _algorithms("ciphers")]
Macs = Annotated[tuple[str, ...], _algorithms("macs")]
HostKeyAlgorithms = Annotated[tuple[str, ...], _algorithms("host_key_algorithms")]


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


Paths = Annotated[tuple[str, ...], PlainValidator(_strings)]


class TunnelConfig(_Model):
    """`[[tunnel]]`: one SSH connection and the forwards it carries (what `portfwd ssh` builds)."""

    name: Name | None = None
    ssh: Annotated[str, PlainValidator(_destination)]
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = Field(default=None, min_length=1)
    identity: Paths = ()
    agent: StrictBool = True
    known_hosts: Paths = ("~/.ssh/known_hosts",)
    strict_host_key_checking: Annotated[str, PlainValidator(_strictness)] = "yes"
    jump: tuple[Annotated[str, PlainValidator(_destination)], ...] = ()
    ssh_config: Paths | None = None
    local: Annotated[tuple[TunnelForward, ...], PlainValidator(_forwards("local"))] = ()
    remote: Annotated[tuple[TunnelForward, ...], PlainValidator(_forwards("remote"))] = ()
    dynamic: Annotated[tuple[TunnelForward, ...], PlainValidator(_forwards("dynamic"))] = ()
    keepalive_interval: Annotated[float, PlainValidator(_seconds_or_off)] = 15.0
    keepalive_count: int = Field(default=3, ge=1, le=1000)
    connect_timeout: Duration = 10.0
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 60.0
    reconnect_attempts: int = Field(default=0, ge=0)
    exit_on_forward_failure: StrictBool = False
    compression: StrictBool = False
    kex: Kex = ()
    ciphers: Ciphers = ()
    macs: Macs = ()
    host_key_algorithms: HostKeyAlgorithms = ()
    socks_user: str | None = Field(default=None, min_length=1, max_length=255)
    socks_password: str | None = Field(default=None, min_length=1, max_length=255)
    tcp_keepalive: StrictBool = True  # on the local side of every -L/-D/-R connection
    idle_timeout: Duration | None = None  # close a forwarded connection idle this long

    @property
    def label(self) -> str:
        """The tunnel's name for logs and tables; defaults to its destination."""
        return self.name if self.name is not None else self.ssh

    @property
    def forwards(self) -> tuple[TunnelForward, ...]:
        """Every forward, -L then -R then -D."""
        return (*self.local, *self.remote, *self.dynamic)


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


Permits = Annotated[tuple[str, ...], PlainValidator(_permits)]


class ServerUserConfig(_Model):
    """`[[server.user]]`: who may log in to `portfwd server`, with which keys, to forward what."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    authorized_keys: str = Field(min_length=1)
    permit_open: Permits = ()
    permit_listen: Permits = ()
    source: Networks = Field(default=(), alias="from")


class ServerConfig(_Model):
    """`[server]`: the SSH tunnel server stock `ssh -L/-R/-D` clients use."""

    listen: ListenEndpoint = Field(default_factory=lambda: parse_listen("0.0.0.0:2222"))
    host_key: str = Field(default="/var/lib/portfwd/host_ed25519", min_length=1)
    gateway_ports: StrictBool = False
    client_alive_interval: Annotated[float, PlainValidator(_seconds_or_off)] = 15.0
    client_alive_count: int = Field(default=3, ge=1, le=1000)
    max_auth_failures: int = Field(default=10, ge=1, le=100000)
    # Before authentication (sshd: LoginGraceTime 120, MaxStartups 10:30:100, MaxAuthTries 6).
    login_grace_time: Duration = 30.0
    max_startups: Annotated[StartupsSpec, PlainValidator(_translating(parse_startups))] = StartupsSpec(
        10, 30, 60
    )
    max_auth_tries: int = Field(default=6, ge=1, le=100)
    # After authentication: open channels (-L/-D connections and -R hand-backs).
    max_channels: int = Field(default=256, ge=1, le=100000)
    max_channels_per_user: int = Field(default=1024, ge=1, le=1000000)
    # A second client of the same user and key asking for a held -R port takes it over only if
    # the holder fails a keepalive probe within this time (sshd refuses the newcomer outright).
    takeover_probe: Duration = 3.0
    kex: Kex = ()  # () offers all of sshalgorithms.KEX; a list narrows it (so for the three below)
    ciphers: Ciphers = ()
    macs: Macs = ()
    host_key_algorithms: HostKeyAlgorithms = ()
    # Relayed connections: TCP keepalive on the server's side of each, and an optional idle cap.
    tcp_keepalive: StrictBool = True
    idle_timeout: Duration | None = None
    user: tuple[ServerUserConfig, ...] = ()


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
        address = ipaddress.IPv4Address(target.host)
    except ValueError:
        raise _fail(f"{target.host!r} must be an IPv4 address (the kernel does not resolve names)") from None
    return HostPorts(str(address), target.ports)


class GatewayForwardConfig(_Model):
    """`[[gateway.forward]]`: a WAN port (or range) DNATed to a LAN host by the kernel."""

    name: Name | None = None
    port: Annotated[PortRange, PlainValidator(_wan_ports)]
    to: Annotated[HostPorts, PlainValidator(_lan_target)]
    protocol: Transport = Transport.TCP
    allow: Networks = ()

    @property
    def label(self) -> str:
        """Name for logs and tables; defaults to the WAN port."""
        return self.name or f"wan:{self.port}/{self.protocol.value} -> {self.to}"


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


class GatewayTriggerConfig(_Model):
    """`[[gateway.trigger]]`: a LAN host connecting out on `trigger` gets `open` forwarded to it."""

    name: Name | None = None
    trigger: Annotated[tuple[str, PortRange], PlainValidator(_proto_ports)]
    open: Annotated[tuple[tuple[str, PortRange], ...], PlainValidator(_proto_ports_list)]
    idle_timeout: Duration = 600.0
    mode: Literal["kernel", "last-wins"] = "kernel"


class GatewayConfig(_Model):
    """`[gateway]`: nftables DNAT, masquerade and hairpin on a Linux router."""

    wan: Annotated[str, PlainValidator(_interface)]
    lan: Annotated[str, PlainValidator(_interface)]
    masquerade: StrictBool = True
    hairpin: StrictBool = True
    allow_external_target: StrictBool = False
    enable_forwarding: StrictBool = False
    forward: tuple[GatewayForwardConfig, ...] = ()
    trigger: tuple[GatewayTriggerConfig, ...] = ()


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


def _url(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+/\S*$", value):
        raise _fail(
            f"{value!r} is not a URL; write the router's description URL, e.g. http://192.168.1.1:5000/rootDesc.xml"
        )
    return value


MapMethod = Literal["auto", "pcp", "natpmp", "upnp"]


class MapConfig(_Model):
    """`[[map]]`: ask the home router to forward `external_port` to this host's `port`."""

    port: int = Field(ge=1, le=65535)
    external_port: Annotated[int, PlainValidator(_external_port)] | None = None
    protocol: Literal["tcp", "udp"] = "tcp"
    method: MapMethod = "auto"
    lease: Duration = 3600.0
    upnp_url: Annotated[str, PlainValidator(_url)] | None = None
    gateway: Annotated[str, PlainValidator(_ipv4)] | None = None

    @property
    def external(self) -> int:
        """The external port to ask for; 0 = whatever the router offers."""
        return self.port if self.external_port is None else self.external_port

    @property
    def label(self) -> str:
        return f"{self.port}/{self.protocol}"


class MetricsConfig(_Model):
    """`[metrics]`: where the Prometheus endpoint listens."""

    listen: ListenEndpoint = Field(default_factory=lambda: parse_listen("127.0.0.1:9930"))


class ControlConfig(_Model):
    """`[control]`: the local control socket `portfwd status` reads."""

    socket: str | None = Field(default=None, min_length=1)
    group: str | None = Field(default=None, min_length=1)
    enabled: StrictBool = True


class Config(_Model):
    """The whole config file."""

    user: str | None = Field(default=None, min_length=1)
    group: str | None = Field(default=None, min_length=1)
    drain_timeout: Duration = 10.0
    ssh_fast_path: StrictBool = True
    forward: tuple[ForwardConfig, ...] = ()
    tunnel: tuple[TunnelConfig, ...] = ()
    server: ServerConfig | None = None
    gateway: GatewayConfig | None = None
    map: tuple[MapConfig, ...] = ()
    metrics: MetricsConfig | None = None
    control: ControlConfig = ControlConfig()


# --------------------------------------------------------------------------- error translation

_TYPE_MESSAGES = {
    "missing": "required key is missing; add it",
    "string_type": "must be text in quotes",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "model_type": "must be a table",
    "dict_type": "must be a table",
}


def _path(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "config"


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """Walk the models along `loc` to find the one that owns the last key."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        found = None
        for candidate in _flatten(field.annotation):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                found = candidate
        if found is None:
            return None
        model = found
    return model


def _flatten(annotation: Any) -> Iterable[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple, list):
        for arg in typing.get_args(annotation):
            yield from _flatten(arg)
    else:
        yield annotation


def _problem(error: Any) -> str:
    loc: tuple[int | str, ...] = tuple(error["loc"])
    kind = error["type"]
    if kind == "portfwd":
        return f"{_path(loc)}: {error['ctx']['line']}"
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1])
        names = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        if close:
            return f"{_path(loc)}: unknown key; did you mean {close[0]}?"
        return f"{_path(loc)}: unknown key; remove it or use one of: {', '.join(names)}"
    if kind in ("tuple_type", "list_type"):
        table = "forward.route" if loc and loc[-1] == "route" else (loc[-1] if loc else "")
        return f"{_path(loc)}: must be an array of tables; write [[{table}]]"
    if kind in _TYPE_MESSAGES:
        return f"{_path(loc)}: {_TYPE_MESSAGES[kind]}"
    message = str(error["msg"]).replace("Input should be", "must be")
    message = message.replace("String should have", "must have").replace("Value error, ", "")
    return f"{_path(loc)}: {message[:1].lower()}{message[1:]}"


def _check_rules(config: Config) -> list[str]:
    """Cross-field checks pydantic cannot express per field; returns one line per problem."""
    problems: list[str] = []
    seen_names: dict[str, int] = {}
    bound: list[tuple[int, str, str, int]] = []  # (rule index, proto, host, port)
    for index, rule in enumerate(config.forward):
        field = f"forward[{index}]"
        if rule.name is not None:
            if rule.name in seen_names:
                problems.append(
                    f"{field}.name: {rule.name!r} is already the name of forward[{seen_names[rule.name]}]; "
                    "pick another name"
                )
            seen_names[rule.name] = index
        problems.extend(_check_sides(field, rule.listen, rule.connect, rule.protocol, "connect"))
        for route_index, route in enumerate(rule.route):
            problems.extend(
                _check_sides(
                    f"{field}.route[{route_index}]",
                    rule.listen,
                    route.connect,
                    rule.protocol,
                    "connect",
                )
            )
        if isinstance(rule.listen, UnixPath) and (rule.allow or rule.deny or rule.route):
            problems.append(
                f"{field}.allow: allow, deny and route need an IP listener; "
                "a Unix socket has no client address (use file permissions instead)"
            )
        if isinstance(rule.listen, HostPorts):
            for proto in ("tcp", "udp"):
                if proto == "tcp" and not rule.protocol.has_tcp:
                    continue
                if proto == "udp" and not rule.protocol.has_udp:
                    continue
                for port in rule.listen.ports.ports():
                    clash = _clash(bound, proto, rule.listen.host, port)
                    if clash is not None and clash != index:
                        problems.append(
                            f"{field}.listen: {rule.listen.at(port)}/{proto} is already used by "
                            f"forward[{clash}]; give each rule its own port"
                        )
                        break
                    bound.append((index, proto, rule.listen.host, port))
    problems.extend(_check_tunnels(config))
    problems.extend(_check_gateway(config))
    problems.extend(_check_maps(config))
    if config.server is not None:
        server = config.server
        if not server.user:
            problems.append(
                "server: no [[server.user]]; add one with name and authorized_keys "
                "(portfwd server never runs without users)"
            )
        if not isinstance(server.listen, HostPorts) or len(server.listen.ports) != 1:
            problems.append('server.listen: must be one host:port; write "0.0.0.0:2222"')
        names = [user.name for user in server.user]
        for index, name in enumerate(names):
            if name in names[:index]:
                problems.append(f"server.user[{index}].name: {name!r} is listed twice")
    if config.metrics is not None:
        listen = config.metrics.listen
        if not isinstance(listen, HostPorts) or len(listen.ports) != 1:
            problems.append('metrics.listen: must be one host:port; write "127.0.0.1:9930"')
    return problems


def published(config: Config) -> list[tuple[str, MapConfig]]:
    """Every router mapping the config asks for: `[[map]]` plus each `[[forward]]` with map = true.

    Returns (config field, mapping) pairs; a forward publishes its own listen port, per protocol.
    """
    maps = [(f"map[{index}]", entry) for index, entry in enumerate(config.map)]
    for index, rule in enumerate(config.forward):
        if not rule.map or not isinstance(rule.listen, HostPorts) or len(rule.listen.ports) != 1:
            continue
        port = rule.listen.ports.first
        for proto in ("tcp", "udp"):
            if (proto == "tcp" and rule.protocol.has_tcp) or (proto == "udp" and rule.protocol.has_udp):
                maps.append((f"forward[{index}].map", MapConfig(port=port, protocol=proto)))
    return maps


def _check_maps(config: Config) -> list[str]:
    problems: list[str] = []
    for index, rule in enumerate(config.forward):
        if rule.map and (not isinstance(rule.listen, HostPorts) or len(rule.listen.ports) != 1):
            problems.append(
                f"forward[{index}].map: only a rule that listens on one TCP/UDP port can be published; "
                "add a [[map]] per port instead"
            )
    claimed: dict[tuple[str, str, int], str] = {}
    for field, entry in published(config):
        keys = [("port", entry.protocol, entry.port)]
        if entry.external:
            keys.append(("external_port", entry.protocol, entry.external))
        for key in keys:
            other = claimed.get(key)
            if other is not None:
                what = "local port" if key[0] == "port" else "external port"
                problems.append(
                    f"{field}.{key[0]}: {what} {key[2]}/{key[1]} is already mapped by {other}; "
                    "map each port once"
                )
                break
        for key in keys:
            claimed.setdefault(key, field)
    return problems


def _check_tunnels(config: Config) -> list[str]:
    problems: list[str] = []
    names: dict[str, int] = {}
    for index, tunnel in enumerate(config.tunnel):
        field = f"tunnel[{index}]"
        if tunnel.name is not None:
            if tunnel.name in names:
                problems.append(
                    f"{field}.name: {tunnel.name!r} is already the name of tunnel[{names[tunnel.name]}]"
                )
            names[tunnel.name] = index
        if not tunnel.forwards:
            problems.append(f"{field}: no forward; add local, remote or dynamic (or -L/-R/-D)")
        if (tunnel.socks_user is None) != (tunnel.socks_password is None):
            problems.append(f"{field}.socks_user: set socks_user and socks_password together")
        if tunnel.reconnect_max < tunnel.reconnect_min:
            problems.append(
                f"{field}.reconnect_max: must be at least reconnect_min ({tunnel.reconnect_min:g}s)"
            )
    return problems


def _check_gateway(config: Config) -> list[str]:
    gateway = config.gateway
    if gateway is None:
        return []
    problems: list[str] = []
    if gateway.wan == gateway.lan:
        problems.append("gateway.lan: must differ from gateway.wan")
    claimed: dict[tuple[str, int], int] = {}
    for index, rule in enumerate(gateway.forward):
        field = f"gateway.forward[{index}]"
        if len(rule.to.ports) not in (1, len(rule.port)):
            problems.append(
                f"{field}.to: port range {rule.to.ports} has {len(rule.to.ports)} ports but port {rule.port} "
                f"has {len(rule.port)}; use ranges of equal length or one target port"
            )
        clash = None
        for proto in ("tcp", "udp"):
            if (proto == "tcp" and not rule.protocol.has_tcp) or (
                proto == "udp" and not rule.protocol.has_udp
            ):
                continue
            for port in rule.port.ports():
                other = claimed.get((proto, port))
                if other is not None and other != index and clash is None:
                    clash = (
                        f"{field}.port: {port}/{proto} is already forwarded by gateway.forward[{other}]; "
                        "give each rule its own port"
                    )
                claimed[(proto, port)] = index
        if clash:
            problems.append(clash)
    return problems


_ANY_ADDRESSES = ("", "0.0.0.0", "::")


def _clash(bound: list[tuple[int, str, str, int]], proto: str, host: str, port: int) -> int | None:
    for index, other_proto, other_host, other_port in bound:
        if (
            other_proto == proto
            and other_port == port
            and (other_host == host or other_host in _ANY_ADDRESSES or host in _ANY_ADDRESSES)
        ):
            return index
    return None


def _check_sides(field: str, listen: Endpoint, connect: Endpoint, protocol: Transport, key: str) -> list[str]:
    problems = []
    if protocol.has_udp and isinstance(listen, UnixPath):
        problems.append(f'{field}.listen: UDP cannot listen on a Unix stream socket; use protocol = "tcp"')
    if protocol.has_udp and isinstance(connect, UnixPath):
        problems.append(f'{field}.{key}: UDP cannot reach a Unix stream socket; use protocol = "tcp"')
    if isinstance(listen, HostPorts) and isinstance(connect, HostPorts):
        wanted, got = len(listen.ports), len(connect.ports)
        if got not in (1, wanted):
            problems.append(
                f"{field}.{key}: port range {connect.ports} has {got} ports but listen "
                f"{listen.ports} has {wanted}; use ranges of equal length or one target port"
            )
    if isinstance(listen, UnixPath) and isinstance(connect, HostPorts) and len(connect.ports) > 1:
        problems.append(f"{field}.{key}: a Unix socket listener needs one target port, not a range")
    return problems


def validate(data: dict[str, Any], source: str = "config") -> Config:
    """Validate parsed TOML (or CLI-built) data into a Config.

    Raises ConfigError carrying one line per problem, each naming its field and the fix.
    """
    problems: list[str] = []
    for section, what in _PLANNED_SECTIONS.items():
        if section in data:
            problems.append(
                f"{section}: {what} is not available in portfwd 0.1 yet; remove this section to run the rest"
            )
    data = {key: value for key, value in data.items() if key not in _PLANNED_SECTIONS}
    config = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problem(error) for error in exc.errors(include_url=False))
    if config is not None:
        problems.extend(_check_rules(config))
    if config is not None and not problems and not _declares_anything(config):
        # `run` would start nothing and exit: `check` must not call that OK.
        problems.append(
            "nothing to run: the config has no [[forward]], [[tunnel]], [server], [gateway], "
            "[[map]] or [metrics]; add one"
        )
    if problems:
        raise ConfigError(problems[0], problems=problems)
    assert config is not None  # for mypy: no problems means validation succeeded
    return config


#: A config file larger than this is refused: configs are a few KiB, and -c /dev/zero must end.
MAX_CONFIG_BYTES = 1 << 20


def _read(path: Path) -> bytes:
    """The bytes of a regular config file of at most MAX_CONFIG_BYTES. Raises ConfigError.

    Opened without blocking and checked before reading, so that `-c` on a FIFO, a device or
    a directory is refused at once instead of waiting or reading forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file", hint="pass -c FILE or create portfwd.toml") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: not a regular file", hint="pass -c with a TOML file")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{path}: config is larger than {MAX_CONFIG_BYTES >> 20} MiB")
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    """TOML text to a table. Raises ConfigError (never RecursionError) for what is not a config."""
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from exc


def _declares_anything(config: Config) -> bool:
    return bool(
        config.forward or config.tunnel or config.server or config.gateway or config.map or config.metrics
    )


def load(path: Path) -> Config:
    """Read and validate a TOML config file.

    Raises ConfigError for a missing/unreadable file, bad TOML or invalid values.
    """
    data = _parse(path, _read(path))
    try:
        return validate(data, str(path))
    except RecursionError as exc:
        raise ConfigError(f"{path}: a value is nested too deeply") from exc


def control_socket(path: Path) -> str | None:
    """Just `[control] socket` from a config file, or None, without validating the rest.

    Lets `portfwd status` see a running instance while the file on disk is being edited (its
    values may be wrong for a moment). Raises ConfigError when the file is missing or not TOML.
    """
    data = _parse(path, _read(path))
    section = data.get("control")
    value = section.get("socket") if isinstance(section, dict) else None
    return value if isinstance(value, str) and value else None


def find(explicit: str | None) -> Path:
    """Choose the config file: -c, then $PORTFWD_CONFIG, ./portfwd.toml, ~/.config, /etc.

    Raises ConfigError naming every place it looked when none exists.
    """
    if explicit:
        return Path(explicit)
    if env := os.environ.get("PORTFWD_CONFIG"):
        return Path(env)
    candidates = [
        Path("portfwd.toml"),
        Path.home() / ".config" / "portfwd" / "portfwd.toml",
        Path("/etc/portfwd/portfwd.toml"),
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "no config file found (looked in ./portfwd.toml, ~/.config/portfwd/portfwd.toml, "
        "/etc/portfwd/portfwd.toml)",
        hint="pass -c FILE or set PORTFWD_CONFIG",
    )
