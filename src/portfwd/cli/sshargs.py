"""`portfwd ssh ARGS` as a config: one [[tunnel]] table, with errors in the words the user typed.

Apart from commands.py so that the command line stays parsing and dispatch: this is where
`-L/-R/-D` specs and `-o Key=Value` options become a validated Config, and a config error
about `tunnel[0].ciphers` is told back as `-o Ciphers`.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace
from typing import Any

from portfwd import config, tunnelspec
from portfwd.errors import ConfigError
from portfwd.specs import SSH_CONFIGS, TunnelSpec


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
    *,
    login: str | None = None,
    found: dict[str, Any] | None = None,
    stdio: bool = False,
) -> config.Config:
    """The Config `portfwd ssh ARGS` runs: one [[tunnel]]. Raises ConfigError, one line per problem.

    `found` is what ssh_config says for the host (`read_ssh_config`): it fills in what the command
    line left out, and its forwards join the command line's, as in ssh. `stdio` (-W): no forward
    is needed.
    """
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
        table["ssh_config"] = [] if ssh_config == "none" else [ssh_config]  # -F none: no file, as ssh
    if compression:
        table["compression"] = True
    if name:
        table["name"] = name
    if login and "user" not in table:
        table["user"] = login
    for option in options:
        try:
            tunnelspec.parse_option(option, table)
        except ConfigError as exc:
            problems.append(exc.line())
    if found:
        _apply_ssh_config(found, table, ssh_config or "ssh_config", problems)
    if stdio:
        # -W clears every forward, as ssh's ClearAllForwardings (`stdio_spec` drops this one,
        # which is here only because a [[tunnel]] must carry a forward to validate).
        table.update(local=["127.0.0.1:1:127.0.0.1:1"], remote=[], dynamic=[])
    elif not (local or remote or dynamic or any(name in (found or {}) for name in _FORWARD_KEYWORDS)):
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
    "global_known_hosts": "-o GlobalKnownHostsFile",
    "hash_known_hosts": "-o HashKnownHosts",
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


def batch_mode(options: tuple[str, ...]) -> bool | None:
    """-o BatchMode (the first one wins, as in ssh): yes never asks a person anything; None: not given."""
    for option in options:
        name, sep, value = option.strip().partition("=")
        if not sep:
            name, _, value = option.strip().partition(" ")
        if name.strip().lower() == "batchmode":
            return value.strip().lower() in ("yes", "true")
    return None


def listen_flags(
    options: tuple[str, ...], found: dict[str, Any], gateway_ports: bool, family: str | None
) -> tuple[bool, str | None]:
    """-g and -4/-6, or else -o GatewayPorts / AddressFamily, or else ssh_config's (ssh's order:
    the command line first, then the first value the config gives). Values were checked by
    `tunnelspec.parse_option` already."""
    said: dict[str, str] = {}
    for option in options:
        name, sep, value = option.strip().partition("=")
        if not sep:
            name, _, value = option.strip().partition(" ")
        said.setdefault(name.strip().lower(), value.strip().lower())
    if not gateway_ports:
        if "gatewayports" in said:
            gateway_ports = said["gatewayports"] in ("yes", "true")
        else:
            gateway_ports = bool(found.get("GatewayPorts"))
    if family is None:
        word = said.get("addressfamily", str(found.get("AddressFamily", "any")).lower())
        family = tunnelspec.FAMILY_WORDS.get(word) or None
    return gateway_ports, family


def with_keys(tunnel: TunnelSpec, *, batch: bool) -> TunnelSpec:
    """The tunnel with its -i keys read now, before anything runs: a passphrase is asked for
    once, on the terminal (as ssh asks), unless the agent holds the key.

    Raises KeyFileError (exit 2: missing, too open, not a key) or KeyLoginError (exit 1: a
    passphrase is needed and BatchMode=yes or there is no terminal; a wrong one, three times).
    """
    if not tunnel.identity:
        return tunnel
    from portfwd.ssh import keys

    loaded = keys.load(tunnel.identity, field="-i", agent=tunnel.agent, batch=batch, ask=keys.ask_on_terminal)
    return replace(tunnel, client_keys=loaded)


#: ssh_config's forward keywords and the [[tunnel]] list each adds to.
_FORWARD_KEYWORDS = {"LocalForward": "local", "RemoteForward": "remote", "DynamicForward": "dynamic"}


def read_ssh_config(destination: str, ssh_config: str | None) -> dict[str, Any]:
    """What ssh_config (-F FILE, else ~/.ssh/config then /etc/ssh/ssh_config, as ssh reads
    them) sets for the destination's host among the options portfwd ssh takes. Raises
    ConfigError naming the file and line."""
    if ssh_config is None:
        paths = [path for path in map(os.path.expanduser, SSH_CONFIGS) if os.path.exists(path)]
        if not paths:
            return {}
    elif ssh_config == "none":  # ssh's -F none: no file at all
        return {}
    else:
        paths = [os.path.expanduser(ssh_config)]
    try:
        _, host, _ = tunnelspec.parse_destination(destination)
    except ConfigError:
        return {}  # reported with the rest by tunnel_from_args
    from portfwd.ssh import lean

    try:
        found = lean.ssh_config(paths, host)
    except OSError as exc:
        raise ConfigError(f"ssh_config {exc.filename or paths[0]}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"ssh_config: {exc}") from exc
    if found is None:
        logging.getLogger("portfwd.cli").warning(
            "ssh_config's LocalForward, RemoteForward, DynamicForward and ExitOnForwardFailure are not "
            "read with this asyncssh (not the release portfwd was checked against); give them as -L/-R/-D/-o"
        )
    return found or {}


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):  # asyncssh reads `UserKnownHostsFile none` as []
        return " ".join(str(item) for item in value) or "none"
    return str(value)


def _apply_ssh_config(found: dict[str, Any], table: dict[str, Any], source: str, problems: list[str]) -> None:
    """Fill `table` from ssh_config: forwards are added; any other option only when the command
    line did not set it (ssh's first value wins, and the command line comes first)."""
    for name, value in found.items():
        kind = _FORWARD_KEYWORDS.get(name)
        if kind is not None:
            for line in value:
                spec = ":".join(line.split())  # `8080 db:5432` is -L 8080:db:5432
                try:
                    tunnelspec.parse_forward(kind, spec)  # type: ignore[arg-type]
                    table[kind] = [*table[kind], spec]
                except ConfigError as exc:
                    problems.append(f"{source}: {name} {line}: {exc.line()}")
            continue
        key = tunnelspec.OPTION_KEYS.get(name.lower())
        if key is None:  # BatchMode, GatewayPorts, AddressFamily: the front end reads them; checked here
            try:
                tunnelspec.parse_option(f"{name}={_text(value)}", {})
            except ConfigError as exc:
                problems.append(f"{source}: {exc.line().removeprefix('-o ')}")
            continue
        if key in table:
            continue  # set on the command line
        if name == "StrictHostKeyChecking" and str(value).lower() == "ask":
            continue  # nobody to ask: the same as yes for portfwd
        if name == "IdentityFile":  # as ssh: a file ssh_config names but that is missing is skipped
            value = [item for item in value if os.path.exists(os.path.expanduser(item))]
            if not value:
                continue
        try:
            for item in value if name == "IdentityFile" else [value]:
                tunnelspec.parse_option(f"{name}={_text(item)}", table)
        except ConfigError as exc:
            problems.append(f"{source}: {exc.line().removeprefix('-o ')}")


def with_flags(
    tunnel: TunnelSpec, *, gateway_ports: bool, family: int, retry_first: bool = False
) -> TunnelSpec:
    """-g (-L/-D without a bind address listen on every address), -4/-6 (one address family
    for the SSH connection and the local listeners) and --retry-first-connect (a first connect
    that fails for good is retried, as a [[tunnel]]'s `retry_first_connect = true`)."""
    forwards = {
        kind: tuple(
            replace(item, bind="") if gateway_ports and item.bind is None and item.path is None else item
            for item in items
        )
        for kind, items in (("local", tunnel.local), ("dynamic", tunnel.dynamic))
    }
    return replace(
        tunnel,
        local=forwards["local"],
        dynamic=forwards["dynamic"],
        jump_from_ssh_config=False,  # read_ssh_config's ProxyJump is in `jump` already
        family=family,
        retry_first_connect=tunnel.retry_first_connect or retry_first,
    )


FAMILIES = {"4": socket.AF_INET, "6": socket.AF_INET6}


def stdio_spec(tunnel: TunnelSpec) -> TunnelSpec:
    """The tunnel -W runs: no forwards (ssh's ClearAllForwardings), one try (ExitOnForwardFailure)."""
    return replace(tunnel, local=(), remote=(), dynamic=())
