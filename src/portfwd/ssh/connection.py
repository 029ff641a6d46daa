"""The tunnel client's SSH connection: asyncssh's options, the jump hosts, and the host-key check.

Each hop (every jump host, then the server) is verified against known_hosts the same way; a key
that does not verify is a HostKeyError naming what to fix, never a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import os
import random
import socket
from collections.abc import Callable
from typing import Any

import asyncssh

from portfwd import sshalgorithms
from portfwd.errors import ConfigError
from portfwd.specs import SSH_CONFIGS, TunnelSpec
from portfwd.ssh import keys
from portfwd.ssh.cork import CorkedConnector
from portfwd.ssh.errors import resolve_error, ssh_error
from portfwd.ssh.hostkeys import HostKeyCheck, HostKeyError
from portfwd.ssh.lean import accept_time_formats, fix, ssh_config, tune
from portfwd.tunnelspec import expand_tokens, parse_destination

Lost = Callable[[str], None]


class _Client(asyncssh.SSHClient):
    """Hands asyncssh's host-key question to our check, and notes why the link ended."""

    def __init__(self, check: HostKeyCheck, lost: Lost) -> None:
        self.check = check
        self.lost = lost

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        fix(conn)  # before the key exchange, fast path or not: a server's guessed packet (lean/kex.py)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost(ssh_error(exc).message if exc is not None else "closed by the server")

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        return self.check.validate(host, addr, port, key)


def backoff(config: TunnelSpec, attempt: int) -> float:
    """Seconds to wait before attempt `attempt + 1`: exponential to reconnect_max, with jitter."""
    base = min(config.reconnect_max, config.reconnect_min * (2 ** min(attempt, 30)))
    return random.uniform(base / 2, base)


def _options(
    config: TunnelSpec, check: HostKeyCheck, host: str, port: int | None, user: str | None, lost: Lost
) -> dict[str, Any]:
    known = check.known_hosts()
    options: dict[str, Any] = {
        "known_hosts": known,
        "client_factory": lambda: _Client(check, lost),
        "connect_timeout": config.connect_timeout,
        "keepalive_interval": config.keepalive_interval,
        "keepalive_count_max": config.keepalive_count,
        "password_auth": False,
        "kbdint_auth": False,
    }
    if port is not None:
        options["port"] = port
    if config.family:
        options["family"] = config.family
    if user is not None:
        options["username"] = user
    loaded: list[Any] | None = None
    if config.client_keys is not None:  # read (and unlocked) by the front end: ssh/keys.py
        loaded = list(config.client_keys)
    elif config.identity:
        loaded = list(keys.load(config.identity, field=f"{config.label}: identity", agent=config.agent))
    agent_only = False
    if loaded:
        options["client_keys"] = loaded
    elif loaded is not None:
        # Every key left to the agent. An empty list would have asyncssh read ~/.ssh/id_* as well,
        # which ssh never offers once keys are named; the files again, their locked keys skipped,
        # leave the agent as the only signer. Public key files only: `_connect` asks the agent.
        files = [os.path.expanduser(item) for item in config.identity]
        files = [path for path in files if not keys.public_key_file(path)]
        options["client_keys"] = files
        options["ignore_encrypted"] = True
        agent_only = not files
    if not config.agent:
        options["agent_path"] = None
    else:
        # IdentitiesOnly (the tunnel's, or ssh_config's for this host): the agent's copies of the
        # named keys only, as ssh offers them (asyncssh would compare its key objects with the
        # agent's blobs and offer none). Otherwise every agent key, whatever ssh_config says.
        found = _host_config(_config_paths(config), host)
        named = config.identity or tuple(found.get("IdentityFile") or ())
        only = config.identities_only or found.get("IdentitiesOnly") is True
        options["agent_identities"] = keys.identities(named) if only else None
        if agent_only:  # asyncssh cannot be given no key file: the agent's keys are given instead
            options["agent_keys_first"] = keys.identities(named)
    options["config"] = _config_paths(config)  # asyncssh alone would read ~/.ssh/config only
    options["proxy_command"] = None  # ssh_config's is refused (`_hops`), never run
    options["compression_algs"] = ["zlib@openssh.com", "zlib", "none"] if config.compression else ["none"]
    # OpenSSH's algorithm sets or stricter (sshalgorithms.py), as narrowed by the config; they
    # override ssh_config's. Host keys: what known_hosts holds for this host first.
    options.update(sshalgorithms.client_options(config.kex, config.ciphers, config.macs))
    options["server_host_key_algs"] = check.host_key_algorithms(known, host, port, options["config"])
    return options


#: Jump hosts followed through ssh_config at most (a loop of ProxyJump aliases ends here).
MAX_HOPS = 8


def _config_paths(config: TunnelSpec) -> list[str]:
    """The tunnel's ssh_config files that exist (ssh's, SSH_CONFIGS, unless it names its own)."""
    given = SSH_CONFIGS if config.ssh_config is None else config.ssh_config
    paths = [os.path.expanduser(item) for item in given]
    return [path for path in paths if os.path.exists(path)]


def _host_config(paths: list[str], host: str) -> dict[str, Any]:
    """What ssh_config `paths` set for `host` (lean/sshconfig.py's NAMES). Raises ConfigError
    for a line the config cannot be read past."""
    if not paths:
        return {}
    try:
        return ssh_config(paths, host) or {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"ssh_config: {exc}") from None


def _proxy_jump(paths: list[str], host: str) -> list[str]:
    """ssh_config's ProxyJump for `host` (its hops), [] for none. Raises ConfigError for a
    ProxyCommand (portfwd runs none) or a line the config cannot be read past."""
    found = _host_config(paths, host)
    command = str(found.get("ProxyCommand", "none"))
    if command.lower() != "none":
        raise ConfigError(
            f"ssh_config's ProxyCommand {command!r} for {host}: portfwd runs no proxy commands",
            hint="reach it through a jump host: ProxyJump, or jump = [...] in the [[tunnel]]",
        )
    jump = str(found.get("ProxyJump", "none"))
    return [] if jump.lower() == "none" else [hop.strip() for hop in jump.split(",") if hop.strip()]


def _hops(config: TunnelSpec) -> list[str]:
    """The jump hosts to the server, in order: the tunnel's own (`jump`), else its ssh_config's
    ProxyJump (a [[tunnel]]: portfwd's connector overrides asyncssh's, and a silent direct
    connect would skip the bastion); each hop's own ProxyJump comes before it, as ssh follows
    them. A ProxyCommand anywhere is refused (a ConfigError: a config error is not retried
    unless the link once worked or retry_first_connect says so)."""
    paths = _config_paths(config)
    if config.jump:
        first = list(config.jump)
    elif config.jump_from_ssh_config and paths:
        first = _proxy_jump(paths, config.host)
    else:
        first = []
    if not paths:
        return first
    chain: list[str] = []

    def add(hop: str, depth: int) -> None:
        if depth >= MAX_HOPS or len(chain) >= MAX_HOPS:
            raise ConfigError(f"ssh_config: ProxyJump leads through more than {MAX_HOPS} hosts (a loop?)")
        _, host, _ = parse_destination(hop)
        for before in _proxy_jump(paths, host):
            add(before, depth + 1)
        chain.append(hop)

    for hop in first:
        add(hop, 0)
    return chain


async def _connect(host: str, tunnel: Any, options: dict[str, Any]) -> asyncssh.SSHClientConnection:
    """asyncssh.connect, or, when every named key is a public key file the agent signs for
    (`agent_keys_first` set by `_options`), with the agent's keys given as the client keys:
    those named first, the rest after unless IdentitiesOnly, as ssh orders them (asyncssh would
    read ~/.ssh/id_* for an empty key list). The agent is asked once for this login."""
    named = options.pop("agent_keys_first", None)
    if named is None:
        return await asyncssh.connect(host, tunnel=tunnel, **options)
    only = options.pop("agent_identities", None) is not None
    agent = await asyncssh.connect_agent(options.get("agent_path", ()) or os.environ.get("SSH_AUTH_SOCK", ""))
    try:
        offered = await agent.get_keys(named if only else None)
        first = [key for key in offered if key.public_data in named]
        options["client_keys"] = first + [key for key in offered if key.public_data not in named]
        options["agent_path"] = None  # its keys are the client keys already
        options.pop("ignore_encrypted", None)
        return await asyncssh.connect(host, tunnel=tunnel, **options)
    finally:
        agent.close()
        with contextlib.suppress(Exception):
            await agent.wait_closed()


def _check(config: TunnelSpec, host: str, port: int | None, user: str | None) -> HostKeyCheck:
    """A host-key check for one connection attempt to one hop (each gets its own), its files'
    % tokens expanded for that hop as ssh expands them."""
    accept_new = config.strict_host_key_checking == "accept-new"
    try:
        local = getpass.getuser()
    except (KeyError, OSError):  # a uid with no name (a container): ssh says the number too
        local = str(os.getuid())
    here = socket.gethostname()
    values = {
        "%": "%",
        "d": os.path.expanduser("~"),
        "u": local,
        "i": str(os.getuid()),
        "l": here,
        "L": here.split(".", 1)[0],
        "h": host,
        "n": host,
        "k": host,
        "p": str(port or 22),
        "r": user or local,
        "j": ",".join(config.jump),
    }
    values["C"] = hashlib.sha1("".join(values[key] for key in "lhprj").encode()).hexdigest()
    files = [expand_tokens(path, values) for path in config.known_hosts]
    global_files = tuple(expand_tokens(path, values) for path in config.global_known_hosts)
    # HashKnownHosts: the tunnel's, or ssh_config's for this host (Debian's /etc/ssh/ssh_config
    # says yes for every host), as ssh reads it.
    found = _host_config(_config_paths(config), host) if not config.hash_known_hosts else {}
    hashed = config.hash_known_hosts or found.get("HashKnownHosts") is True
    return HostKeyCheck(files, accept_new, config.host_key_algorithms, global_files, hashed)


async def connect(
    config: TunnelSpec, fast_path: bool, jumps: list[asyncssh.SSHClientConnection], lost: Lost
) -> asyncssh.SSHClientConnection:
    """Connect through the jump hosts (each appended to `jumps` once up) to the server.

    Raises HostKeyError, KeyFileError or KeyLoginError (keys.py), or what asyncssh.connect raises
    (asyncssh.Error, OSError, TimeoutError).
    """
    accept_time_formats()  # ssh_config's `ServerAliveInterval 1m`, read as ssh reads it
    tunnel: asyncssh.SSHClientConnection | None = None
    for jump in _hops(config):
        user, host, port = parse_destination(jump)
        check = _check(config, host, port, user)
        options = _options(config, check, host, port, user, lost)
        try:
            tunnel = await _connect(host, tunnel, options)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise check.problem or HostKeyError(f"jump host {host}: {exc.reason}") from exc
        except socket.gaierror as exc:
            raise resolve_error(f"jump host {host}", exc) from exc
        tune(tunnel, fast_path)
        jumps.append(tunnel)
    check = _check(config, config.host, config.port, config.user)
    options = _options(config, check, config.host, config.port, config.user, lost)
    try:
        conn = await _connect(config.host, tunnel or CorkedConnector(), options)
    except asyncssh.HostKeyNotVerifiable as exc:
        raise check.problem or HostKeyError(f"{config.host}: {exc.reason}") from exc
    except socket.gaierror as exc:
        raise resolve_error(config.host, exc) from exc
    tune(conn, fast_path)
    return conn


async def close(conns: list[asyncssh.SSHClientConnection]) -> None:
    """Close the connections (the server's, then the jump hosts') and wait up to 2 s for each."""
    for conn in conns:
        conn.close()
    for conn in conns:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await conn.wait_closed()
