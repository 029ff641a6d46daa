"""ssh_config's forwarding options, read with asyncssh's own parser (its Host/Match/Include rules).

asyncssh reads ssh_config for what it uses itself (HostName, Port, User, IdentityFile, ...) and
skips the rest: LocalForward, RemoteForward, DynamicForward, ExitOnForwardFailure,
StrictHostKeyChecking, HashKnownHosts and BatchMode never reach it. Its parser takes a table of handlers per
keyword; a subclass adds these with the same matching, first-value-wins and quoting rules, so
`portfwd ssh -N myhost` finds what `ssh -N myhost` (and autossh) would find.
"""

from __future__ import annotations

import getpass
from collections.abc import Sequence
from typing import Any

from asyncssh.config import SSHClientConfig, SSHConfig

from portfwd.tunnelspec import openssh_seconds

#: What `read` returns, in the spelling OpenSSH uses (and `-o` takes).
NAMES = (
    "LocalForward",
    "RemoteForward",
    "DynamicForward",
    "ExitOnForwardFailure",
    "StrictHostKeyChecking",
    "BatchMode",
    "ServerAliveInterval",
    "ServerAliveCountMax",
    "UserKnownHostsFile",
    "GlobalKnownHostsFile",
    "HashKnownHosts",
    "ConnectTimeout",
    "Compression",
    "IdentityFile",
    "IdentitiesOnly",
    "GatewayPorts",
    "AddressFamily",
    "ProxyJump",
    "ProxyCommand",
)


def _set_time(self: Any, option: str, args: list[str]) -> None:
    """ServerAliveInterval and ConnectTimeout in OpenSSH's time format (`1m`, `1h30m`), as ssh
    reads them (asyncssh takes whole seconds only); stored as whole seconds, first value wins."""
    value = args.pop(0)
    seconds = openssh_seconds(value)
    if seconds is None:
        self._error(f"Invalid {option} time value: {value}; write e.g. 30, 30s, 1m or 1h30m")
    self._options.setdefault(option, seconds)


#: asyncssh's keywords that ssh reads as times: asyncssh's own parser (a connect reads the same
#: files) gets `_set_time` for them too (`accept_time_formats`).
TIMES = ("ServerAliveInterval", "ConnectTimeout")


def accept_time_formats() -> None:
    """Have asyncssh's ssh_config parser read TIMES as ssh does. Its handler table is a class
    attribute, swapped for a copy with the two entries replaced (idempotent)."""
    table = SSHClientConfig._handlers
    if all(table.get(name.lower(), (None, None))[1] is _set_time for name in TIMES):
        return
    SSHClientConfig._handlers = {**table, **{name.lower(): (name, _set_time) for name in TIMES}}


def _append_line(self: Any, option: str, args: list[str]) -> None:
    """A keyword that may repeat, each time with a whole line of arguments (`LocalForward 80 h:80`)."""
    self._options.setdefault(option, []).append(" ".join(args))
    args.clear()


class _ForwardingConfig(SSHClientConfig):
    _handlers = {  # noqa: RUF012 - asyncssh's own table, extended; never mutated
        **SSHClientConfig._handlers,
        **{
            name.lower(): (name, handler)
            for name, handler in (
                ("LocalForward", _append_line),
                ("RemoteForward", _append_line),
                ("DynamicForward", _append_line),
                ("ExitOnForwardFailure", SSHConfig._set_bool),
                ("StrictHostKeyChecking", SSHConfig._set_string),
                ("BatchMode", SSHConfig._set_bool),
                ("GatewayPorts", SSHConfig._set_bool),
                ("HashKnownHosts", SSHConfig._set_bool),
                ("AddressFamily", SSHConfig._set_string),
                *((name, _set_time) for name in TIMES),
            )
        },
    }


def read(paths: Sequence[str], host: str) -> dict[str, Any]:
    """The NAMES set for `host` in the ssh_config `paths`. Raises OSError or ValueError (a bad line)."""
    accept_time_formats()  # before any connect reads the same files
    config = _ForwardingConfig.load(None, list(paths), False, False, False, getpass.getuser(), (), host, ())
    found = {name: config.get(name) for name in NAMES if config.get(name) is not None}
    for name in ("ProxyJump", "ProxyCommand"):  # asyncssh keeps the "=" of `ProxyCommand=none`
        value = found.get(name)
        if isinstance(value, str):
            found[name] = value.lstrip("= \t")
    if "ProxyJump" in found:  # asyncssh, as portfwd, takes ProxyJump when both are set
        found.pop("ProxyCommand", None)
    return found
