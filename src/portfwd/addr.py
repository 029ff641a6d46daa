"""Endpoints and port ranges: parsing and printing `host:port`, `[::1]:80`, `8000-8010`, `unix:/path`.

Pure values and pure functions. Every parse error is a `ConfigError` whose message says what
is wrong and how to write it; the caller adds the field name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

from portfwd.errors import ConfigError

PORT_MIN = 1
PORT_MAX = 65535

#: A host name as RFC 1123 allows it, plus `_` which real internal DNS names use.
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$")
UNIX_PREFIX = "unix:"
ANY_HOSTS = ("", "*")


class Transport(StrEnum):
    """Which transport protocols a rule forwards."""

    TCP = "tcp"
    UDP = "udp"
    TCP_UDP = "tcp+udp"

    @property
    def has_tcp(self) -> bool:
        """True when the rule forwards TCP (alone or with UDP)."""
        return self is not Transport.UDP

    @property
    def has_udp(self) -> bool:
        """True when the rule forwards UDP (alone or with TCP)."""
        return self is not Transport.TCP


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive range of ports; a single port is a range of length one."""

    first: int
    last: int

    def __len__(self) -> int:
        return self.last - self.first + 1

    def ports(self) -> range:
        """Every port in the range, in order."""
        return range(self.first, self.last + 1)

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class HostPorts:
    """An IP or DNS host with a port range. `host == ""` means every local address (listen side)."""

    host: str
    ports: PortRange

    @property
    def is_any(self) -> bool:
        """True when the host is the wildcard (every address)."""
        return self.host == ""

    @property
    def is_ipv6(self) -> bool:
        """True when the host is an IPv6 literal."""
        return ":" in self.host

    def at(self, port: int) -> str:
        """Format one `host:port` of this endpoint, bracketing IPv6."""
        return f"{format_host(self.host)}:{port}"

    def __str__(self) -> str:
        return f"{format_host(self.host)}:{self.ports}"


@dataclass(frozen=True, slots=True)
class UnixPath:
    """A Unix stream socket path."""

    path: str

    def __str__(self) -> str:
        return f"{UNIX_PREFIX}{self.path}"


Endpoint = HostPorts | UnixPath


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback: 127.0.0.0/8, ::1 or localhost."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_host(host: str) -> str:
    """Print a host for `host:port`: `*` for any, IPv6 in brackets."""
    if host == "":
        return "*"
    return f"[{host}]" if ":" in host else host


def parse_port(text: str) -> int:
    """Parse one port number (1-65535).

    Raises ConfigError naming the bad value.
    """
    text = text.strip()
    if not text.isdigit() or not text.isascii():
        raise ConfigError(f"port {text!r} is not a number", hint="write a port number such as 8080")
    port = int(text)
    if not PORT_MIN <= port <= PORT_MAX:
        raise ConfigError(f"port {port} is out of range ({PORT_MIN}-{PORT_MAX})")
    return port


def parse_port_range(text: str) -> PortRange:
    """Parse `8080` or `8000-8010`.

    Raises ConfigError for non-numbers, out-of-range ports and reversed ranges.
    """
    if text.strip() == "":
        raise ConfigError("missing port", hint="write host:port")
    first_text, dash, last_text = text.partition("-")
    first = parse_port(first_text)
    if not dash:
        return PortRange(first, first)
    last = parse_port(last_text)
    if last < first:
        raise ConfigError(f"port range {first}-{last} is reversed", hint=f"write {last}-{first}")
    return PortRange(first, last)


def parse_host(text: str, *, allow_any: bool) -> str:
    """Validate a host: an IPv4/IPv6 literal (brackets removed) or a DNS name.

    Returns "" for the wildcard when `allow_any`. Raises ConfigError otherwise.
    """
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(inner.split("%", 1)[0])) + (
                "%" + inner.split("%", 1)[1] if "%" in inner else ""
            )
        except ValueError as exc:
            raise ConfigError(
                f"{text!r} is not an IPv6 address", hint="write an address such as [::1]"
            ) from exc
    if text in ANY_HOSTS:
        if allow_any:
            return ""
        raise ConfigError("missing host", hint="write host:port")
    if ":" in text:
        raise ConfigError(f"IPv6 address {text!r} must be in brackets", hint=f"write [{text}]:PORT")
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", text) or not _HOSTNAME.match(text):
        raise ConfigError(
            f"{text!r} is not a valid host name or IP address",
            hint="write a name such as db.internal or an address such as 10.0.0.5",
        )
    return text


def split_colons(spec: str) -> list[str]:
    """Split a spec at colons outside `[...]`, keeping the brackets on their token."""
    tokens: list[str] = []
    current = ""
    depth = 0
    for char in spec:
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        if char == ":" and depth == 0:
            tokens.append(current)
            current = ""
        else:
            current += char
    tokens.append(current)
    return tokens


def split_host_port(text: str) -> tuple[str, str]:
    """Split `host:port` or `[v6]:port` at the port colon; the port part may be empty.

    Raises ConfigError when there is no port.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"{text!r} has an unclosed '['", hint="write [::1]:PORT")
        host, rest = text[: close + 1], text[close + 1 :]
        if not rest.startswith(":"):
            raise ConfigError("missing port", hint="write [host]:port")
        return host, rest[1:]
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ConfigError("missing port", hint="write host:port")
    if ":" in host:
        raise ConfigError(f"IPv6 address {host!r} must be in brackets", hint=f"write [{host}]:{port}")
    return host, port


def parse_unix(text: str) -> UnixPath:
    """Parse `unix:/path` (the prefix is required by the caller's check).

    Raises ConfigError for an empty or relative path.
    """
    path = text[len(UNIX_PREFIX) :]
    if not path:
        raise ConfigError("missing Unix socket path", hint="write unix:/run/app.sock")
    if not path.startswith("/"):
        raise ConfigError(
            f"Unix socket path {path!r} is relative",
            hint="write an absolute path such as unix:/run/app.sock",
        )
    if "\x00" in path or len(path.encode()) > 107:
        raise ConfigError("Unix socket path is too long or contains NUL", hint="use a path under 108 bytes")
    return UnixPath(path)


def _address_text(value: object) -> str:
    """The stripped text of an address; a TOML number or list is refused here, not deeper."""
    if not isinstance(value, str):
        raise ConfigError(f"{value!r} is not an address", hint='write a string such as "127.0.0.1:8080"')
    return value.strip()


def parse_listen(value: object) -> Endpoint:
    """Parse a listen side: `8080`, `*:8080`, `0.0.0.0:8000-8010`, `[::]:8080`, `unix:/path`.

    Raises ConfigError naming what is wrong (also for a value that is not text).
    """
    text = _address_text(value)
    if text.startswith(UNIX_PREFIX):
        return parse_unix(text)
    if text.isdigit() or re.fullmatch(r"\d+-\d+", text):
        return HostPorts("", parse_port_range(text))
    host, port = split_host_port(text)
    return HostPorts(parse_host(host, allow_any=True), parse_port_range(port))


def parse_target(value: object) -> Endpoint:
    """Parse a connect side: `host:port`, `[v6]:port`, `host:9000-9010`, `unix:/path`.

    Raises ConfigError naming what is wrong (also for a value that is not text).
    """
    text = _address_text(value)
    if text.startswith(UNIX_PREFIX):
        return parse_unix(text)
    if text.isdigit():
        raise ConfigError("missing host", hint=f"write host:{text}")
    host, port = split_host_port(text)
    return HostPorts(parse_host(host, allow_any=False), parse_port_range(port))


def target_port(listen: PortRange, target: PortRange, port: int) -> int:
    """Map a listen port to its target port: same offset for equal ranges, else the single port."""
    if len(target) == 1:
        return target.first
    return target.first + (port - listen.first)
