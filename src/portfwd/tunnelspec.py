"""OpenSSH's -L, -R and -D spec grammar, shared by `portfwd ssh` and `[[tunnel]]`.

    -L [bind:]port:host:hostport   -L [bind:]port:/remote.sock   -L /local.sock:host:hostport
    -R [bind:]port:host:hostport   -R [bind:]port:/local.sock    -R /remote.sock:host:hostport
    -R [bind:]port                 (reverse dynamic: a SOCKS server on the far side, OpenSSH 7.6+)
    -D [bind:]port

A bind of `*` or an empty one (`:8080:...`) means every address; no bind at all means
loopback for -L/-D (OpenSSH's GatewayPorts=no) and the server's default (loopback) for -R.
`-R 0:...` lets the server pick the port. Socket paths are absolute (`/x.sock` or
`unix:/x.sock`). IPv6 addresses go in brackets.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from portfwd.addr import (
    UNIX_PREFIX,
    format_host,
    parse_host,
    parse_port,
    parse_unix,
    split_colons,
    split_host_port,
)
from portfwd.errors import ConfigError

Kind = Literal["local", "remote", "dynamic"]

_SHAPES: dict[Kind, str] = {
    "local": "write -L [bind:]port:host:hostport, e.g. 127.0.0.1:5432:db.internal:5432",
    "remote": "write -R [bind:]port:host:hostport, or -R [bind:]port for reverse SOCKS",
    "dynamic": "write -D [bind:]port, e.g. 127.0.0.1:1080",
}
FLAGS: dict[Kind, str] = {"local": "-L", "remote": "-R", "dynamic": "-D"}


@dataclass(frozen=True, slots=True)
class TunnelForward:
    """One forward of a tunnel.

    Listen side: `path` (a Unix socket) or `bind` + `port`; `bind` None is the default
    (loopback here for local/dynamic; the server's choice for remote), "" every address.
    Target: `target_path`, or `host` + `host_port`, or neither (dynamic: the SOCKS client
    names it; also remote without a target, i.e. reverse dynamic).
    """

    kind: Kind
    bind: str | None = None
    port: int = 0
    path: str | None = None
    host: str | None = None
    host_port: int = 0
    target_path: str | None = None

    @property
    def is_socks(self) -> bool:
        """True when a SOCKS client chooses each target (-D, or -R without a target)."""
        return self.host is None and self.target_path is None

    @property
    def listen_text(self) -> str:
        """Where it listens, `127.0.0.1:8080`, `*:8080` or `unix:/x.sock`."""
        if self.path is not None:
            return UNIX_PREFIX + self.path
        bind = self.bind if self.bind is not None else ("localhost" if self.kind == "remote" else "127.0.0.1")
        return f"{format_host(bind)}:{self.port}"

    @property
    def target_text(self) -> str:
        """Where it goes, `db:5432`, `unix:/x.sock` or `socks`."""
        if self.target_path is not None:
            return UNIX_PREFIX + self.target_path
        if self.host is not None:
            return f"{format_host(self.host)}:{self.host_port}"
        return "socks"

    def __str__(self) -> str:
        return f"{FLAGS[self.kind]} {self.listen_text} -> {self.target_text}"


def _merge_unix(tokens: list[str]) -> list[str]:
    """Join `unix` + `/path` (split at the prefix's colon) back into one `unix:/path` token."""
    merged: list[str] = []
    for token in tokens:
        if merged and merged[-1] == UNIX_PREFIX[:-1] and token.startswith("/"):
            merged[-1] = UNIX_PREFIX + token
        else:
            merged.append(token)
    return merged


def _is_path(token: str) -> bool:
    return token.startswith("/") or token.startswith(UNIX_PREFIX)


def _path(token: str) -> str:
    return parse_unix(token if token.startswith(UNIX_PREFIX) else UNIX_PREFIX + token).path


def _port(text: str, *, zero_ok: bool) -> int:
    if zero_ok and text.strip() == "0":
        return 0
    return parse_port(text)


def _bind(text: str) -> str | None:
    """A spec's bind address; `localhost` is the default (None), as in ssh: -L and -D listen on
    127.0.0.1 and ::1, -R asks the server for `localhost`."""
    if text == "localhost":
        return None
    return parse_host(text, allow_any=True)


def parse_forward(kind: Kind, spec: object) -> TunnelForward:
    """Parse one -L/-R/-D spec. Raises ConfigError naming what is wrong and the shape to write."""
    if not isinstance(spec, str):
        raise ConfigError(f"expected a string like {_SHAPES[kind].split(', e.g. ')[-1]!r}, got {spec!r}")
    text = spec.strip()
    shape = _SHAPES[kind]
    if not text:
        raise ConfigError(f"empty {FLAGS[kind]} spec", hint=shape)
    tokens = _merge_unix(split_colons(text))
    zero_ok = kind == "remote"
    if len(tokens) > 4:
        raise ConfigError(f"{text!r} is not a {FLAGS[kind]} spec", hint=shape)
    if kind == "dynamic":
        if len(tokens) > 2 or any(_is_path(token) for token in tokens):
            raise ConfigError(f"{text!r} is not a -D spec", hint=shape)
        if len(tokens) == 1:
            return TunnelForward(kind, port=parse_port(tokens[0]))
        return TunnelForward(kind, bind=_bind(tokens[0]), port=parse_port(tokens[1]))
    if len(tokens) == 2 and kind == "local" and not any(_is_path(token) for token in tokens):
        raise ConfigError(f"{text!r} is not a -L spec", hint=shape)
    # Listen side first: a path, or [bind:]port.
    path: str | None = None
    bind: str | None = None
    port = 0
    if _is_path(tokens[0]):
        path, rest = _path(tokens[0]), tokens[1:]
    elif len(tokens) in (2, 4) or (len(tokens) == 3 and _is_path(tokens[2])):
        if len(tokens) == 2 and _is_path(tokens[1]):
            port, rest = _port(tokens[0], zero_ok=zero_ok), tokens[1:]
        else:
            bind, port, rest = _bind(tokens[0]), _port(tokens[1], zero_ok=zero_ok), tokens[2:]
    else:
        port, rest = _port(tokens[0], zero_ok=zero_ok), tokens[1:]
    # Then the target: nothing (reverse dynamic), a path, or host:hostport.
    if not rest:
        if kind == "local":
            raise ConfigError(f"{text!r} has no target", hint=shape)
        return TunnelForward(kind, bind=bind, port=port, path=path)
    if len(rest) == 1 and _is_path(rest[0]):
        return TunnelForward(kind, bind=bind, port=port, path=path, target_path=_path(rest[0]))
    if len(rest) != 2:
        raise ConfigError(f"{text!r} is not a {FLAGS[kind]} spec", hint=shape)
    host_text = rest[0]
    if host_text in ("", "*"):
        raise ConfigError(f"{text!r} has no target host", hint=shape)
    host = "localhost" if host_text == "localhost" else parse_host(host_text, allow_any=False)
    return TunnelForward(kind, bind=bind, port=port, path=path, host=host, host_port=parse_port(rest[1]))


_NAME = re.compile(r"^[A-Za-z0-9_.%-]+$")


def parse_destination(value: object) -> tuple[str | None, str, int | None]:
    """Parse `[user@]host[:port]` (IPv6 in brackets) into (user, host, port).

    The host may be an alias from ~/.ssh/config, so any name-like word is taken here; whether it
    resolves is the connection's business. Raises ConfigError.
    """
    shape = "write [user@]host[:port], e.g. alice@bastion.example.org:22"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{value!r} is not an SSH destination", hint=shape)
    text = value.strip()
    user: str | None = None
    if text[:6].lower() == "ssh://":  # ssh's URI form (RFC 3986 as ssh reads it: parse_uri)
        text = text[6:].rstrip("/")
        if "/" in text:
            raise ConfigError(f"{value!r}: an ssh:// destination has no path", hint=shape)
        if "@" in text:  # the user, percent-decoded, without ;parameters (ssh ignores them)
            user, _, text = text.partition("@")
            user = urllib.parse.unquote(user.partition(";")[0])
            if not user or any(char.isspace() for char in user):
                raise ConfigError(f"{value!r} has an empty or bad user name", hint=shape)
    if "@" in text:
        user, _, text = text.rpartition("@")
        if not user or any(char.isspace() for char in user):
            raise ConfigError(f"{value!r} has an empty or bad user name", hint=shape)
    port: int | None = None
    if text.startswith("["):
        host_text, port_text = split_host_port(text) if "]:" in text else (text, "")
        host = parse_host(host_text, allow_any=False) if host_text.endswith("]") else ""
        if not host:
            raise ConfigError(f"{value!r} has a bad IPv6 host", hint=shape)
    else:
        host, colon, port_text = text.partition(":")
        if colon and ":" in port_text:
            raise ConfigError(f"IPv6 address in {value!r} must be in brackets", hint="write user@[::1]:22")
        if not _NAME.match(host):
            raise ConfigError(f"{host!r} is not a host name or address", hint=shape)
    if port_text:
        port = parse_port(port_text)
    return user, host, port


#: `-o` options portfwd ssh understands, by lower-case name, and the [[tunnel]] key each sets.
OPTION_KEYS = {
    "serveraliveinterval": "keepalive_interval",
    "serveralivecountmax": "keepalive_count",
    "exitonforwardfailure": "exit_on_forward_failure",
    "stricthostkeychecking": "strict_host_key_checking",
    "userknownhostsfile": "known_hosts",
    "globalknownhostsfile": "global_known_hosts",
    "hashknownhosts": "hash_known_hosts",
    "connecttimeout": "connect_timeout",
    "compression": "compression",
    "ciphers": "ciphers",
    "kexalgorithms": "kex",
    "macs": "macs",
    "hostkeyalgorithms": "host_key_algorithms",
    "port": "port",
    "user": "user",
    "identityfile": "identity",
    "identitiesonly": "identities_only",
    "proxyjump": "jump",
    "batchmode": None,  # read by the CLI (cli/sshargs.py): whether a key's passphrase may be asked
    "gatewayports": None,  # read by the CLI as -g is (cli/sshargs.py `listen_flags`)
    "addressfamily": None,  # read by the CLI as -4/-6 are
    "proxycommand": None,  # refused unless `none`: a silent direct connect would skip the bastion
}
#: ssh options that change nothing for a client that only forwards ports (it opens no session,
#: asks for no terminal, multiplexes nothing, authenticates with keys only, keeps TCP
#: keepalive on its own sockets): taken and left aside, so the `-o` lines of autossh and
#: scripts run as written. By lower-case name.
IGNORED_OPTIONS = frozenset(
    {
        "tcpkeepalive", "loglevel", "controlpath", "controlpersist", "checkhostip",
        "streamlocalbindunlink", "connectionattempts", "requesttty", "sessiontype", "forwardagent",
        "forwardx11", "forwardx11trusted", "passwordauthentication", "kbdinteractiveauthentication",
        "challengeresponseauthentication", "gssapiauthentication", "visualhostkey",
        "updatehostkeys", "escapechar", "sendenv", "setenv", "localcommand",
        "addkeystoagent", "verifyhostkeydns", "preferredauthentications", "numberofpasswordprompts",
        "nohostauthenticationforlocalhost",
    }
)  # fmt: skip
#: Options taken only with the value that asks for nothing (else refused: silently doing without
#: a mux socket, a tun device, a local command or dropping forwards would surprise), by
#: lower-case name: the value that is fine.
ONLY_OFF = {"controlmaster": "no", "tunnel": "no", "permitlocalcommand": "no", "clearallforwardings": "no"}
#: AddressFamily's words, as the CLI's -4/-6 spell them ("" for any).
FAMILY_WORDS = {"any": "", "inet": "4", "inet6": "6"}
_YES = {"yes": True, "true": True, "no": False, "false": False}


def _yes_no(name: str, value: str) -> bool:
    try:
        return _YES[value.lower()]
    except KeyError:
        raise ConfigError(f"-o {name}={value}: must be yes or no") from None


def _whole(name: str, value: str, low: int) -> int:
    if not value.isdigit() or int(value) < low:
        raise ConfigError(f"-o {name}={value}: must be a whole number of at least {low}")
    return int(value)


_TIME = re.compile(r"([0-9]{1,9})([smhdwSMHDW]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def openssh_seconds(value: str) -> int | None:
    """OpenSSH's time format (sshd_config(5) TIME FORMATS): `90`, `1m`, `1h30m`; None if not one."""
    parts = _TIME.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        return None
    return sum(int(number) * _UNITS[unit.lower()] for number, unit in parts)


def _seconds(name: str, value: str, low: int) -> int:
    """OpenSSH's time format (`openssh_seconds`), at least `low`."""
    seconds = openssh_seconds(value)
    if seconds is None:
        raise ConfigError(f"-o {name}={value}: must be a time such as 15, 30s, 1m or 1h30m")
    if seconds < low:
        raise ConfigError(f"-o {name}={value}: must be at least {low} s")
    return seconds


def parse_option(text: str, into: dict[str, object]) -> None:
    """Apply one `-o Key=Value` (or `Key Value`) to `into`, a [[tunnel]] table being built.

    Names are case-insensitive as in OpenSSH. Raises ConfigError naming the option and the fix.
    """
    if any(char in text for char in "\r\n\0"):
        raise ConfigError(f"-o {text!r}: an option is one line; write -o Key=Value")
    name, sep, value = text.strip().partition("=")
    if not sep:
        name, _, value = text.strip().partition(" ")
    name, value = name.strip(), value.strip()
    if not name or not value:
        raise ConfigError(f"-o {text!r}: write -o Key=Value, e.g. -o ServerAliveInterval=15")
    lower = name.lower()
    if lower in IGNORED_OPTIONS:
        return  # nothing to do for a forwarding-only client (IGNORED_OPTIONS)
    if lower in ONLY_OFF:
        if value.lower() in (ONLY_OFF[lower], "false"):
            return
        raise ConfigError(
            f"-o {name}={value}: portfwd ssh only forwards ports and has no such feature; "
            f"leave it out or write {name}={ONLY_OFF[lower]}"
        )
    if lower == "pubkeyauthentication":
        if value.lower() in ("yes", "true", "unbound", "host-bound"):
            return  # the only way portfwd logs in
        raise ConfigError(f"-o {name}={value}: portfwd logs in with keys only; this leaves it no way in")
    if lower not in OPTION_KEYS:
        known = "ServerAliveInterval, ServerAliveCountMax, ExitOnForwardFailure, StrictHostKeyChecking, "
        known += (
            "UserKnownHostsFile, GlobalKnownHostsFile, HashKnownHosts, ConnectTimeout, Compression, Ciphers, "
        )
        known += "KexAlgorithms, MACs, HostKeyAlgorithms, Port, User, IdentityFile, IdentitiesOnly, "
        known += "ProxyJump, BatchMode, GatewayPorts, AddressFamily, ProxyCommand=none (and takes, changing "
        known += "nothing, the ones a forwarding-only client has no use for: TCPKeepAlive, LogLevel, "
        known += "ControlMaster, ...)"
        raise ConfigError(f"-o {name}: not an option portfwd ssh supports; it supports {known}")
    key = OPTION_KEYS[lower]
    if lower == "proxycommand":
        if value.lower() != "none":
            raise ConfigError(
                f"-o {name}={value}: portfwd ssh runs no proxy commands; reach the server through a "
                "jump host with ProxyJump (-J user@host) instead"
            )
        return
    if lower in ("batchmode", "gatewayports"):
        _yes_no(name, value)  # checked here; used by the front end (cli/sshargs.py)
        return
    if lower == "addressfamily":
        if value.lower() not in FAMILY_WORDS:
            raise ConfigError(f"-o {name}={value}: must be any, inet or inet6")
        return
    if lower in ("serveraliveinterval", "connecttimeout"):
        seconds = _seconds(name, value, 0 if lower == "serveraliveinterval" else 1)
        into[key or name] = seconds
    elif lower in ("serveralivecountmax", "port"):
        into[key or name] = _whole(name, value, 1)
    elif lower in ("exitonforwardfailure", "compression"):
        into[key or name] = _yes_no(name, value)
    elif lower == "identitiesonly":
        into["identities_only"] = _yes_no(name, value)
    elif lower == "hashknownhosts":
        into["hash_known_hosts"] = _yes_no(name, value)
    elif lower == "stricthostkeychecking":
        choice = value.lower()
        if choice in ("no", "off"):
            raise ConfigError(
                f"-o {name}={value}: portfwd never skips host-key checks; use yes or accept-new"
            )
        if choice == "ask":
            raise ConfigError(
                f"-o {name}=ask: portfwd cannot ask (it runs unattended); use yes or accept-new"
            )
        if choice not in ("yes", "accept-new"):
            raise ConfigError(f"-o {name}={value}: must be yes or accept-new")
        into["strict_host_key_checking"] = choice
    elif lower in ("userknownhostsfile", "globalknownhostsfile"):
        files = value.split()
        if "none" in (item.lower() for item in files) and len(files) > 1:
            raise ConfigError(f"-o {name}={value}: none must stand alone (no file at all)")
        for item in files:
            check_tokens(item, f"-o {name}")
        into[key or name] = [] if files[0].lower() == "none" else files
    elif lower in ("ciphers", "kexalgorithms", "macs", "hostkeyalgorithms"):
        into[key or name] = [item for item in value.split(",") if item]  # checked by config
    elif lower == "identityfile":
        identities = into.setdefault("identity", [])
        assert isinstance(identities, list)
        identities.append(value)
    elif lower == "proxyjump":
        into["jump"] = [] if value.lower() == "none" else value.split(",")
    else:
        into[key or name] = value


#: The % tokens ssh expands in UserKnownHostsFile and GlobalKnownHostsFile (ssh_config(5),
#: TOKENS), expanded for each hop when it connects (ssh/connection.py).
KNOWN_HOSTS_TOKENS = "%CdhijkLlnpru"


def check_tokens(path: str, where: str) -> None:
    """Raise ConfigError for a `%` token ssh would not expand in a known-hosts path."""
    position = 0
    while (found := path.find("%", position)) >= 0:
        token = path[found + 1 : found + 2]
        if not token or token not in KNOWN_HOSTS_TOKENS:
            shown = f"%{token}" if token else "a lone % at the end"
            raise ConfigError(
                f"{where} {path!r}: {shown} is not a token ssh expands here",
                hint="use %% for a percent sign, or one of %C %d %h %i %j %k %L %l %n %p %r %u",
            )
        position = found + 2


def expand_tokens(path: str, values: dict[str, str]) -> str:
    """`path` with its % tokens replaced from `values` (a letter each; checked by check_tokens)."""
    out: list[str] = []
    position = 0
    while (found := path.find("%", position)) >= 0:
        out.append(path[position:found])
        out.append(values.get(path[found + 1 : found + 2], ""))
        position = found + 2
    out.append(path[position:])
    return "".join(out)


# --------------------------------------------------------------------------- sshd's MaxStartups

_STARTUPS = re.compile(r"(\d+)(?::(\d+):(\d+))?")


@dataclass(frozen=True, slots=True)
class StartupsSpec:
    """`max_startups = "start:rate:full"` (or a single number: drop every one past it)."""

    start: int
    rate: int
    full: int


def parse_startups(text: str) -> StartupsSpec:
    """sshd's MaxStartups syntax. Raises ConfigError naming the fix."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)  # `max_startups = 10`, as sshd's bare number
    match = _STARTUPS.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"{text!r} is not start:rate:full", hint='write it as sshd does, e.g. "10:30:60"')
    start = int(match.group(1))
    if match.group(2) is None:
        spec = StartupsSpec(start, 100, start)
    else:
        spec = StartupsSpec(start, int(match.group(2)), int(match.group(3)))
    if not 1 <= spec.start <= spec.full or not 1 <= spec.rate <= 100 or spec.full > 100000:
        raise ConfigError(
            f"{text!r}: need 1 <= start <= full <= 100000 and a rate of 1-100 (%)",
            hint='e.g. "10:30:60"',
        )
    return spec
