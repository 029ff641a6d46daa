"""`portfwd ssh ARGS` as a config: one [[tunnel]] table, with errors in the words the user typed.

Apart from commands.py so that the command line stays parsing and dispatch: this is where
`-L/-R/-D` specs and `-o Key=Value` options become a validated Config, and a config error
about `tunnel[0].ciphers` is told back as `-o Ciphers`.
"""

from __future__ import annotations

from typing import Any

from portfwd import config, tunnelspec
from portfwd.errors import ConfigError


def tunnel_from_args(
    destination: str,
    local: tuple[str, ...],
    remote: tuple[str, ...],
    dynamic: tuple[str, ...],
    port: int | None,
    identity: tuple[str, ...],
    jump: str | None,
    options: tuple[str, ...],
    ssh_config: str | None,
    compression: bool,
    name: str | None,
) -> config.Config:
    """The Config `portfwd ssh ARGS` runs: one [[tunnel]]. Raises ConfigError, one line per problem."""
    problems: list[str] = []
    table: dict[str, Any] = {"ssh": destination}
    for flag, kind, specs in (("-L", "local", local), ("-R", "remote", remote), ("-D", "dynamic", dynamic)):
        good = []
        for item in specs:
            try:
                tunnelspec.parse_forward(kind, item)  # type: ignore[arg-type]
                good.append(item)
            except ConfigError as exc:
                problems.append(f"{flag} {item}: {exc.line()}")
        table[kind] = good  # the bad ones are reported above; validate the rest below
    if port is not None:
        table["port"] = port
    if identity:
        table["identity"] = list(identity)
    if jump:
        table["jump"] = jump.split(",")
    if ssh_config:
        table["ssh_config"] = [ssh_config]
    if compression:
        table["compression"] = True
    if name:
        table["name"] = name
    for option in options:
        try:
            tunnelspec.parse_option(option, table)
        except ConfigError as exc:
            problems.append(exc.line())
    if not (local or remote or dynamic):
        problems.append("no forward given; add -L, -R or -D (portfwd ssh only forwards ports)")
    try:
        loaded = config.validate({"tunnel": [table]})
    except ConfigError as exc:
        if problems:  # "no forward" only because the bad specs were left out
            exc.problems = [line for line in exc.problems if not line.startswith("tunnel[0]: no forward")]
        problems.extend(_cli_words(line) for line in exc.problems)
    if problems:
        raise ConfigError(problems[0], problems=problems)
    return loaded


_CLI_KEYS = {
    "ssh": "destination",
    "port": "-p",
    "identity": "-i",
    "jump": "-J",
    "keepalive_interval": "-o ServerAliveInterval",
    "keepalive_count": "-o ServerAliveCountMax",
    "connect_timeout": "-o ConnectTimeout",
    "ciphers": "-o Ciphers",
    "kex": "-o KexAlgorithms",
    "macs": "-o MACs",
    "host_key_algorithms": "-o HostKeyAlgorithms",
    "known_hosts": "-o UserKnownHostsFile",
    "user": "-o User",
}


def _cli_words(line: str) -> str:
    """`tunnel[0].ciphers: ...` as a CLI user wrote it: `-o Ciphers: ...`."""
    prefix = "tunnel[0]"
    if not line.startswith(prefix):
        return line
    rest = line[len(prefix) :].lstrip(".")
    key, _, message = rest.partition(": ")
    return f"{_CLI_KEYS.get(key, key)}: {message}" if key else message
