"""The commands that read a config or start an instance: run, check, forward, ssh, server, gateway,
status and reload (`cli/__init__.py` lists them; `maps.py` has `portfwd map`).

Each command imports what is slow to import in its own body: pydantic (through `_load`, the
one way here to a config), rich, and the runtime with asyncio. So `status` never loads
pydantic, and `--help` loads none of them. What `check` prints comes from the part that owns
each section (`relay`, `ssh`, `kernel`, `router` `describe.py`); this module only draws it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from portfwd import instances
from portfwd.cli import logging_options
from portfwd.cli.console import setup_logging
from portfwd.errors import ConfigError, RuntimeFailure

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table

    from portfwd.specs import Plan

_config_option = click.option(
    "-c",
    "--config",
    "config_file",
    metavar="FILE",
    help="Config file (default: $PORTFWD_CONFIG, ./portfwd.toml, ~/.config/portfwd/, /etc/portfwd/).",
)
_strict_option = click.option("--strict", is_flag=True, help="Exit 1 if any rule cannot start.")
_name_option = click.option(
    "--name", metavar="NAME", help="Name this instance (its control socket is NAME.sock; see status)."
)
_control_option = click.option(
    "--control", "control_socket", metavar="PATH", help="Serve the control socket at PATH instead."
)
_fast_path_option = click.option(
    "--no-ssh-fast-path",
    "no_fast_path",
    is_flag=True,
    help="Use asyncssh's own packet path (the same as ssh_fast_path = false).",
)


def _load(config_file: str | None) -> tuple[Path, Plan]:
    """Find the config file (-c, else the usual places), then read, validate and plan it.

    Raises ConfigError, one line per problem. The only place here that imports pydantic.
    """
    from portfwd import config, planner

    path = config.find(config_file)
    return path, planner.load(path)


@click.command()
@_config_option
@_strict_option
@_name_option
@_control_option
@_fast_path_option
@logging_options
def run(
    config_file: str | None,
    strict: bool,
    name: str | None,
    control_socket: str | None,
    no_fast_path: bool,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """Run everything the config declares; SIGTERM/SIGINT drains and removes what it created."""
    setup_logging(verbose, quiet, log_format)
    path, plan = _load(config_file)
    if no_fast_path:
        plan = replace(plan, ssh_fast_path=False)
    identity = instances.identify(
        "run", config=path, name=name, control=control_socket, configured=plan.control.socket
    )
    logging.getLogger("portfwd").info("config %s (instance %s)", path, identity.name)
    from portfwd import planner, runtime

    runtime.run(plan, strict=strict, identity=identity, loader=lambda: planner.load(path))


def _table(title: str, columns: Iterable[str], rows: Iterable[tuple[str, ...]]) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


@click.command()
@_config_option
def check(config_file: str | None) -> None:
    """Validate the config and print what would run; exit 0, or 2 with one line per error."""
    from portfwd.cli.views import console as plain_console
    from portfwd.kernel import describe as kernel
    from portfwd.relay import describe as relay
    from portfwd.router.describe import map_lines
    from portfwd.ssh.describe import TUNNEL_COLUMNS, server_line, tunnel_rows

    path, plan = _load(config_file)
    console = plain_console()  # piped (`check | cat`): every value whole
    if plan.rules or not (plan.tunnels or plan.server or plan.maps):
        title = f"{path}: {len(plan.rules)} forward rule(s)"
        console.print(_table(title, relay.COLUMNS, relay.describe(plan.rules)))
    if plan.gateway is not None:
        found, problems = kernel.problems(plan.gateway)
        if problems:
            raise ConfigError(problems[0], problems=problems)
        assert found is not None  # no problems: the interfaces were read
        console.print(kernel.summary(plan.gateway, found))
    if plan.server is not None:
        console.print(server_line(plan.server))
    if plan.tunnels:
        console.print(_table(f"{len(plan.tunnels)} SSH tunnel(s)", TUNNEL_COLUMNS, tunnel_rows(plan.tunnels)))
    for line in map_lines(plan.maps):
        console.print(line)
    if plan.metrics is not None:
        console.print(f"metrics: http://{plan.metrics}/metrics")
    if plan.user is not None:
        console.print(f"after binding, runs as user {plan.user}")
    console.print("config OK")


@click.command()
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@click.option("--allow", multiple=True, metavar="CIDR", help="Admit only these sources (repeatable).")
@click.option("--deny", multiple=True, metavar="CIDR", help="Refuse these sources (repeatable).")
@_strict_option
@_name_option
@_control_option
@logging_options
def forward(
    specs: tuple[str, ...],
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    strict: bool,
    name: str | None,
    control_socket: str | None,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """Quick forwards, no config file: SPEC is [bind:]port:host:hostport[/udp|/tcp+udp]."""
    setup_logging(verbose, quiet, log_format)
    identity = instances.identify("forward", name=name, control=control_socket)
    from portfwd import forwardspec, planner

    plan = planner.plan(forwardspec.rules_from_specs(specs, allow, deny))
    from portfwd import runtime

    runtime.run(plan, strict=strict, identity=identity)


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("destination", metavar="[user@]host[:port]")
@click.option(
    "-L", "local", multiple=True, metavar="SPEC", help="[bind:]port:host:hostport (or socket paths)."
)
@click.option(
    "-R", "remote", multiple=True, metavar="SPEC", help="[bind:]port:host:hostport, or [bind:]port for SOCKS."
)
@click.option("-D", "dynamic", multiple=True, metavar="SPEC", help="[bind:]port: a SOCKS 4/4a/5 server.")
@click.option("-p", "port", type=int, metavar="PORT", help="SSH server port.")
@click.option("-l", "login", metavar="USER", help="User to log in as (as user@host).")
@click.option("-i", "identity", multiple=True, metavar="KEY", help="Private key file (repeatable).")
@click.option("-J", "jump", metavar="JUMP", help="Jump host(s): [user@]host[:port][,...].")
@click.option("-o", "options", multiple=True, metavar="Key=Value", help="OpenSSH option (see below).")
@click.option("-F", "ssh_config", metavar="FILE", help="ssh_config file instead of ~/.ssh/config.")
@click.option("-C", "compression", is_flag=True, help="Compress (Compression=yes).")
@click.option("-N", "no_command", is_flag=True, help="Accepted for ssh compatibility: never runs a command.")
@click.option("-g", "gateway_ports", is_flag=True, help="-L/-D without an address listen on every address.")
@click.option("-4", "family", flag_value="4", help="IPv4 only (the connection and the listeners).")
@click.option("-6", "family", flag_value="6", help="IPv6 only.")
@click.option("-f", "background", is_flag=True, help="Go to the background once the forwards are up.")
@click.option("-E", "log_file", metavar="FILE", help="Append the log to FILE instead of stderr.")
@click.option("-W", "stdio", metavar="HOST:PORT", help="Join stdin/stdout to HOST:PORT (a ProxyCommand).")
@click.option(
    "--name",
    metavar="NAME",
    help="Name this instance (default: ssh-PID) and its tunnel (default: the destination).",
)
@_control_option
@_fast_path_option
@logging_options
def ssh(
    destination: str,
    local: tuple[str, ...],
    remote: tuple[str, ...],
    dynamic: tuple[str, ...],
    port: int | None,
    login: str | None,
    identity: tuple[str, ...],
    jump: str | None,
    options: tuple[str, ...],
    ssh_config: str | None,
    compression: bool,
    no_command: bool,
    gateway_ports: bool,
    family: str | None,
    background: bool,
    log_file: str | None,
    stdio: str | None,
    name: str | None,
    control_socket: str | None,
    no_fast_path: bool,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """OpenSSH-style tunnels that reconnect by themselves: portfwd ssh [user@]host -L/-R/-D SPEC.

    -o understands ServerAliveInterval, ServerAliveCountMax, ExitOnForwardFailure,
    StrictHostKeyChecking (yes, accept-new), UserKnownHostsFile, ConnectTimeout, Compression,
    Ciphers, KexAlgorithms, MACs, HostKeyAlgorithms (each narrows portfwd's safe set), Port, User,
    IdentityFile, IdentitiesOnly, ProxyJump and BatchMode; ssh_config's LocalForward,
    RemoteForward, DynamicForward and those options apply when the command line leaves them out.
    -v shows the SSH conversation (-vv, -vvv: more of it, as ssh).
    """
    # -W is a ProxyCommand: its stderr is the user's terminal, so only problems unless -v.
    setup_logging(verbose, quiet or (stdio is not None and not verbose), log_format, log_file)
    if verbose:
        _ssh_verbosity(verbose)
    target = _stdio_target(stdio) if stdio is not None else None
    instance = instances.identify("ssh", name=name, control=control_socket)
    from portfwd import planner
    from portfwd.cli import sshargs

    found = sshargs.read_ssh_config(destination, ssh_config)
    config = sshargs.tunnel_from_args(
        destination,
        local,
        remote,
        dynamic,
        port,
        identity,
        jump,
        options,
        ssh_config,
        compression,
        name,
        login=login,
        found=found,
        stdio=target is not None,
    )
    plan = planner.plan(config)
    batch = sshargs.batch_mode(options)
    batch = bool(found.get("BatchMode")) if batch is None else batch
    wanted = sshargs.FAMILIES.get(family or "", 0)
    plan = replace(
        plan,
        tunnels=tuple(
            sshargs.with_keys(
                sshargs.with_flags(tunnel, gateway_ports=gateway_ports, family=wanted), batch=batch
            )
            for tunnel in plan.tunnels
        ),
    )
    if no_fast_path:
        plan = replace(plan, ssh_fast_path=False)
    if target is not None:
        from portfwd.ssh import stdio as stdio_relay

        stdio_relay.run(sshargs.stdio_spec(plan.tunnels[0]), *target, fast_path=plan.ssh_fast_path)
        return
    if background:
        _background(instance.socket, plan.tunnels[0].connect_timeout, plan.tunnels[0].label)
    from portfwd import runtime

    runtime.run(plan, identity=instance, exit_on_auth=True)


def _ssh_verbosity(verbose: int) -> None:
    """ssh's -v levels for the SSH conversation: -v asyncssh's narration (connect, auth,
    channels), -vv and -vvv its debug levels 1 and 2 (ssh's debug1..3 in spirit)."""
    import asyncssh

    logging.getLogger("asyncssh").setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    if verbose > 1:
        asyncssh.set_debug_level(min(verbose - 1, 3))


def _stdio_target(text: str) -> tuple[str, int]:
    """-W host:port (IPv6 in brackets). Raises UsageError."""
    from portfwd.errors import UsageError

    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(
            f"{text!r} is not host:port", field="-W", hint="e.g. -W db.internal:5432 or -W %h:%p"
        )
    return host, int(port)


def _background(control: Path, within: float, label: str) -> None:
    """-f: fork; the child runs on (in a session of its own, stdin from /dev/null), the parent
    exits 0 once the child's control socket says the tunnel is up with every forward listening.

    The parent waits at most `within` (ConnectTimeout) plus a little for the start; if the
    child exits first, the parent exits with its code (the child has printed why). Raises
    RuntimeFailure (exit 1) when the tunnel is not up in time: the child keeps trying.
    """
    from portfwd import control as control_client

    pid = os.fork()
    if pid == 0:  # the child: detach from the terminal and run
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        return
    deadline = time.monotonic() + within + 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            os._exit(os.waitstatus_to_exitcode(status))
        try:
            answer = control_client.request(control, "status", timeout=2)
        except RuntimeFailure:
            answer = {}
        tunnels = answer.get("status", {}).get("tunnels", []) if answer.get("ok") else []
        if (
            tunnels
            and tunnels[0].get("state") == "up"
            and all(item.get("state") == "listening" for item in tunnels[0].get("forwards", []))
        ):
            os._exit(0)
        time.sleep(0.05)  # polling another process's socket; bounded by the deadline
    raise RuntimeFailure(
        f"{label}: not up within {within:g}s; it keeps trying in the background (pid {pid})",
        hint=f"see portfwd status --control {control}",
    )


@click.command()
@_config_option
@click.option("--fingerprint", is_flag=True, help="Print the host key's SHA256 fingerprint and exit.")
@_name_option
@_control_option
@_fast_path_option
@logging_options
def server(
    config_file: str | None,
    fingerprint: bool,
    name: str | None,
    control_socket: str | None,
    no_fast_path: bool,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """The SSH tunnel server for stock ssh -N -L/-R/-D clients, from the config's [server]."""
    setup_logging(verbose, quiet, log_format)
    path, plan = _load(config_file)
    if plan.server is None:
        raise ConfigError(f"{path}: no [server] section", hint="add [server] and a [[server.user]]")
    if fingerprint:
        from portfwd.ssh.server import load_host_key

        print(load_host_key(plan.server.host_key).get_fingerprint())
        return
    if no_fast_path:
        plan = replace(plan, ssh_fast_path=False)
    identity = instances.identify(
        "server", config=path, name=name, control=control_socket, configured=plan.control.socket
    )
    from portfwd import planner, runtime

    runtime.run(plan, identity=identity, loader=lambda: planner.load(path))


@click.command()
@click.argument("action", type=click.Choice(["plan", "apply", "remove"]))
@_config_option
def gateway(action: str, config_file: str | None) -> None:
    """nftables gateway forwarding from [gateway]: plan (print and check), apply, or remove."""
    from portfwd.kernel import nft
    from portfwd.kernel.describe import plan_notes

    if action == "remove":
        print("removed table inet portfwd" if nft.remove() else "table inet portfwd was not loaded")
        return
    path, plan = _load(config_file)
    if plan.gateway is None:
        raise ConfigError(
            f"{path}: no [gateway] section", hint="add [gateway] with wan, lan and [[gateway.forward]]"
        )
    ruleset = nft.prepare(plan.gateway)
    if action == "plan":
        print(ruleset, end="")
        nft.apply(ruleset, check_only=True)
        for line in plan_notes(nft.diff(ruleset), nft.forwarding_problems(enable=False)):
            print(line)
        return
    for problem in nft.forwarding_problems(plan.gateway.enable_forwarding):
        print(f"portfwd: warning: {problem}", file=sys.stderr)
    nft.apply(ruleset)
    print(f"applied table inet portfwd: {len(plan.gateway.forward)} forward rule(s)")


_target_options = (
    click.option("--name", metavar="NAME", help="The instance started with --name NAME."),
    click.option("--control", "control_socket", metavar="PATH", help="The instance serving PATH."),
)


@click.command()
@_config_option
@_target_options[0]
@_target_options[1]
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the raw snapshot as JSON (one line each time with --watch).",
)
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    is_flag=False,
    flag_value=1.0,
    default=None,
    metavar="[SECONDS]",
    help="Refresh every SECONDS (default 1) until Ctrl-C.",
)
def status(
    config_file: str | None,
    name: str | None,
    control_socket: str | None,
    as_json: bool,
    watch: float | None,
) -> None:
    """Show a running instance: rules, listening sockets, live and recently closed sessions,
    with bytes, rates and ages.

    -c FILE, --name or --control picks one instance; with none of them (and no $PORTFWD_CONFIG),
    every running instance is listed, and shown whole when there is just one.
    """
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from portfwd.cli import find, views

    where = find.target(config_file, name, control_socket, validate=False)

    def fetch() -> dict[str, Any]:
        assert where is not None
        answer = find.ask(where, "status")
        if not answer.get("ok"):
            raise RuntimeFailure("; ".join(answer.get("errors", ["status failed"])))
        snapshot: dict[str, Any] = answer["status"]
        return snapshot

    def every() -> list[dict[str, Any]]:
        snapshots = find.every()
        if not snapshots:
            raise find.none_running()
        return snapshots

    def view() -> Group | Table:
        # Snapshots quote peers (SOCKS names, users, router replies): escaped, and no rich markup.
        if where is not None:
            return views.status_view(views.printable_snapshot(fetch()))
        snapshots = [views.printable_snapshot(snapshot) for snapshot in every()]
        if len(snapshots) == 1:
            return views.status_view(snapshots[0])
        hint = Text("portfwd status --name NAME shows one of them whole")
        return Group(views.instances_view(snapshots), hint)

    if as_json:

        def picture() -> Any:
            return fetch() if where is not None else {"instances": every()}

        if watch is None:
            print(json.dumps(picture(), indent=2, sort_keys=True))
            return
        while True:  # one object per line, every `watch` seconds, until Ctrl-C
            print(json.dumps(picture(), sort_keys=True), flush=True)
            time.sleep(watch)
    console = views.console()
    if watch is None:
        console.print(view())
        return
    if not console.is_terminal:  # piped: print a fresh picture every `watch` seconds instead
        while True:
            console.print(view())
            sys.stdout.flush()
            time.sleep(watch)
    with Live(view(), console=console, refresh_per_second=4, screen=False) as live:
        while True:
            time.sleep(watch)
            live.update(view())


@click.command()
@_config_option
@_target_options[0]
@_target_options[1]
def reload(config_file: str | None, name: str | None, control_socket: str | None) -> None:
    """Ask the running instance to re-read its config (the same as SIGHUP to it).

    The config is validated here first: a file that does not load is refused (exit 2) and
    nothing is sent to any instance.
    """
    from portfwd.cli import find

    try:
        where = find.target(config_file, name, control_socket, validate=True)
    except ConfigError as exc:
        prefix = "reload refused, the old config keeps running: "
        raise ConfigError(
            prefix + exc.problems[0], problems=[prefix + line for line in exc.problems]
        ) from exc
    assert where is not None  # validate: the usual config lookup always names one
    answer = find.ask(where, "reload")
    if answer.get("ok"):
        print(
            f"reloaded: {answer.get('kept', 0)} kept, removed {answer.get('removed') or 'none'}, "
            f"added {answer.get('added') or 'none'}"
        )
        return
    errors = [str(line) for line in answer.get("errors", [])] or ["reload failed"]
    if "kept" in answer:  # applied, but some rules could not start
        more = f" (and {len(errors) - 1} more; see the log)" if len(errors) > 1 else ""
        raise RuntimeFailure(f"reloaded, but {errors[0]}{more}")
    raise ConfigError(
        f"reload refused, the old config keeps running: {errors[0]}",
        problems=[f"reload refused, the old config keeps running: {line}" for line in errors],
    )
