"""ssh_config's forwarding options, read with asyncssh's own parser (its Host/Match/Include rules).

asyncssh reads ssh_config for what it uses itself (HostName, Port, User, IdentityFile, ...) and
skips the rest: LocalForward, RemoteForward, DynamicForward, ExitOnForwardFailure,
StrictHostKeyChecking and BatchMode never reach it. Its parser takes a table of handlers per
keyword; a subclass adds these with the same matching, first-value-wins and quoting rules, so
`portfwd ssh -N myhost` finds what `ssh -N myhost` (and autossh) would find.
"""

from __future__ import annotations

import getpass
from collections.abc import Sequence
from typing import Any

from asyncssh.config import SSHClientConfig, SSHConfig

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
    "ConnectTimeout",
    "Compression",
    "IdentityFile",
    "IdentitiesOnly",
    "GatewayPorts",
    "AddressFamily",
    "ProxyJump",
    "ProxyCommand",
)


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
                ("AddressFamily", SSHConfig._set_string),
            )
        },
    }


def read(paths: Sequence[str], host: str) -> dict[str, Any]:
    """The NAMES set for `host` in the ssh_config `paths`. Raises OSError or ValueError (a bad line)."""
    config = _ForwardingConfig.load(None, list(paths), False, False, False, getpass.getuser(), (), host, ())
    found = {name: config.get(name) for name in NAMES if config.get(name) is not None}
    for name in ("ProxyJump", "ProxyCommand"):  # asyncssh keeps the "=" of `ProxyCommand=none`
        value = found.get(name)
        if isinstance(value, str):
            found[name] = value.lstrip("= \t")
    if "ProxyJump" in found:  # asyncssh, as portfwd, takes ProxyJump when both are set
        found.pop("ProxyCommand", None)
    return found
