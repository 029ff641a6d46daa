"""The full command line (click): parses arguments, sets up logging, prints results.

Every error reaches the user as one line, `portfwd: <what>; <fix>`, with exit code 2 for usage
and config errors and 1 for runtime failures. No traceback is shown unless PORTFWD_DEBUG=1.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import click

from portfwd import __version__, instances, oneshot
from portfwd.cli.console import report, setup_logging
from portfwd.errors import ConfigError, RuntimeFailure
from portfwd.printable import printable

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table

    from portfwd import config

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _logging_options(command: Callable[..., None]) -> Callable[..., None]:
    """-v/-q/--log-format, shared by the commands that run something."""
    command = click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Log lines for people (text) or machines (json).",
    )(command)
    command = click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")(command)
    return click.option(
        "-v", "--verbose", count=True, help="-v: portfwd's debug lines; -vv: every library's too."
    )(command)


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


def _no_fast_path(loaded: config.Config) -> config.Config:
    return loaded.model_copy(update={"ssh_fast_path": False})


@click.group(context_settings=CONTEXT)
@click.version_option(
    __version__, "--version", message="portfwd %(version)s", help="Print the version and exit."
)
def app() -> None:
    """Every kind of port forwarding from one command line and one config file."""


@app.command()
@_config_option
@_strict_option
@_name_option
@_control_option
@_fast_path_option
@_logging_options
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
    from portfwd import config  # pydantic and the models cost 130 ms to import

    setup_logging(verbose, quiet, log_format)
    path = config.find(config_file)
    loaded = config.load(path)
    if no_fast_path:
        loaded = _no_fast_path(loaded)
    identity = instances.identify(
        "run", config=path, name=name, control=control_socket, configured=loaded.control.socket
    )
    logging.getLogger("portfwd").info("config %s (instance %s)", path, identity.name)
    from portfwd import planner, runtime

    runtime.run(planner.plan(loaded), strict=strict, identity=identity, loader=lambda: planner.load(path))


@app.command()
@_config_option
def check(config_file: str | None) -> None:
    """Validate the config and print what would run; exit 0, or 2 with one line per error."""
    from rich.console import Console
    from rich.table import Table

    from portfwd import config  # pydantic and the models cost 130 ms to import

    path = config.find(config_file)
    loaded = config.load(path)
    console = Console()
    table = Table(title=f"{path}: {len(loaded.forward)} forward rule(s)", title_justify="left")
    for column in ("rule", "listen", "connect", "protocol", "access", "relay"):
        table.add_column(column)
    from portfwd import planner
    from portfwd.relay.describe import describe

    for row in describe(planner.plan(loaded).rules):
        table.add_row(*row)
    maps = config.published(loaded)
    if loaded.forward or not (loaded.tunnel or loaded.server or maps):
        console.print(table)
    if loaded.gateway is not None:
        from portfwd.kernel import nft

        try:
            found = nft.interfaces(planner.gateway_spec(loaded.gateway))
        except nft.GatewayError as exc:
            raise ConfigError(exc.line()) from None
        problems = nft.check(planner.gateway_spec(loaded.gateway), found)
        if problems:
            raise ConfigError(problems[0], problems=problems)
        console.print(
            f"gateway: {loaded.gateway.wan} ({', '.join(found.wan_addresses) or 'no address'}) -> "
            f"{loaded.gateway.lan} ({', '.join(map(str, found.lan_networks))}): "
            f"{len(loaded.gateway.forward)} forward(s), {len(loaded.gateway.trigger)} trigger(s); "
            "portfwd gateway plan prints the ruleset"
        )
    if loaded.server is not None:
        users = ", ".join(
            f"{user.name} (open {', '.join(user.permit_open) or 'nothing'}; "
            f"listen {', '.join(user.permit_listen) or 'nothing'})"
            for user in loaded.server.user
        )
        console.print(
            f"server: ssh on {loaded.server.listen}, host key {loaded.server.host_key}, "
            f"gateway_ports {'on' if loaded.server.gateway_ports else 'off'}; users: {users}"
        )
    if loaded.tunnel:
        tunnels = Table(title=f"{len(loaded.tunnel)} SSH tunnel(s)", title_justify="left")
        for column in ("tunnel", "server", "forwards", "host keys", "keepalive"):
            tunnels.add_column(column)
        for item in loaded.tunnel:
            via = f" via {', '.join(item.jump)}" if item.jump else ""
            keepalive = (
                f"{item.keepalive_interval:g}s x {item.keepalive_count}" if item.keepalive_interval else "off"
            )
            tunnels.add_row(
                item.label,
                item.ssh + via,
                "\n".join(str(forward) for forward in item.forwards),
                f"{item.strict_host_key_checking}: {', '.join(item.known_hosts)}",
                keepalive,
            )
        console.print(tunnels)
    for field, entry in maps:
        external = entry.external or "any"
        where = entry.upnp_url or (
            f"router {entry.gateway}" if entry.gateway else "the default route's router"
        )
        console.print(
            f"{field}: ask {where} for external port {external}/{entry.protocol} -> "
            f"this host's {entry.port} via {entry.method}, lease {entry.lease:g} s, renewed at half"
        )
    if loaded.metrics is not None:
        console.print(f"metrics: http://{loaded.metrics.listen}/metrics")
    if loaded.user is not None:
        console.print(f"after binding, runs as user {loaded.user}")
    console.print("config OK")


@app.command()
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@click.option("--allow", multiple=True, metavar="CIDR", help="Admit only these sources (repeatable).")
@click.option("--deny", multiple=True, metavar="CIDR", help="Refuse these sources (repeatable).")
@_strict_option
@_name_option
@_control_option
@_logging_options
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
    from portfwd import forwardspec  # pydantic and the models cost 130 ms to import

    setup_logging(verbose, quiet, log_format)
    identity = instances.identify("forward", name=name, control=control_socket)
    loaded = forwardspec.rules_from_specs(specs, allow, deny)
    from portfwd import planner, runtime

    runtime.run(planner.plan(loaded), strict=strict, identity=identity)


@app.command(context_settings={"ignore_unknown_options": False})
@click.argument("destination", metavar="[user@]host[:port]")
@click.option(
    "-L", "local", multiple=True, metavar="SPEC", help="[bind:]port:host:hostport (or socket paths)."
)
@click.option(
    "-R", "remote", multiple=True, metavar="SPEC", help="[bind:]port:host:hostport, or [bind:]port for SOCKS."
)
@click.option("-D", "dynamic", multiple=True, metavar="SPEC", help="[bind:]port: a SOCKS 4/4a/5 server.")
@click.option("-p", "port", type=int, metavar="PORT", help="SSH server port.")
@click.option("-i", "identity", multiple=True, metavar="KEY", help="Private key file (repeatable).")
@click.option("-J", "jump", metavar="JUMP", help="Jump host(s): [user@]host[:port][,...].")
@click.option("-o", "options", multiple=True, metavar="Key=Value", help="OpenSSH option (see below).")
@click.option("-F", "ssh_config", metavar="FILE", help="ssh_config file instead of ~/.ssh/config.")
@click.option("-C", "compression", is_flag=True, help="Compress (Compression=yes).")
@click.option("-N", "no_command", is_flag=True, help="Accepted for ssh compatibility: never runs a command.")
@click.option(
    "--name",
    metavar="NAME",
    help="Name this instance (default: ssh-PID) and its tunnel (default: the destination).",
)
@_control_option
@_fast_path_option
@_logging_options
def ssh(
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
    no_command: bool,
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
    IdentityFile, IdentitiesOnly, ProxyJump and BatchMode.
    """
    setup_logging(verbose, quiet, log_format)
    instance = instances.identify("ssh", name=name, control=control_socket)
    from portfwd.cli.sshargs import tunnel_from_args

    loaded = tunnel_from_args(
        destination, local, remote, dynamic, port, identity, jump, options, ssh_config, compression, name
    )
    if no_fast_path:
        loaded = _no_fast_path(loaded)
    from portfwd import planner, runtime

    runtime.run(planner.plan(loaded), identity=instance, exit_on_auth=True)


@app.command()
@_config_option
@click.option("--fingerprint", is_flag=True, help="Print the host key's SHA256 fingerprint and exit.")
@_name_option
@_control_option
@_fast_path_option
@_logging_options
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
    from portfwd import config  # pydantic and the models cost 130 ms to import

    setup_logging(verbose, quiet, log_format)
    path = config.find(config_file)
    loaded = config.load(path)
    if loaded.server is None:
        raise ConfigError(f"{path}: no [server] section", hint="add [server] and a [[server.user]]")
    if fingerprint:
        from portfwd.ssh.server import load_host_key

        print(load_host_key(loaded.server.host_key).get_fingerprint())
        return
    if no_fast_path:
        loaded = _no_fast_path(loaded)
    identity = instances.identify(
        "server", config=path, name=name, control=control_socket, configured=loaded.control.socket
    )
    from portfwd import planner, runtime

    runtime.run(planner.plan(loaded), identity=identity, loader=lambda: planner.load(path))


@app.command()
@click.argument("action", type=click.Choice(["plan", "apply", "remove"]))
@_config_option
def gateway(action: str, config_file: str | None) -> None:
    """nftables gateway forwarding from [gateway]: plan (print and check), apply, or remove."""
    from portfwd import config  # pydantic and the models cost 130 ms to import
    from portfwd.kernel import nft

    if action == "remove":
        print("removed table inet portfwd" if nft.remove() else "table inet portfwd was not loaded")
        return
    path = config.find(config_file)
    loaded = config.load(path)
    if loaded.gateway is None:
        raise ConfigError(
            f"{path}: no [gateway] section", hint="add [gateway] with wan, lan and [[gateway.forward]]"
        )
    from portfwd import planner

    ruleset = nft.prepare(planner.gateway_spec(loaded.gateway))
    if action == "plan":
        print(ruleset, end="")
        nft.apply(ruleset, check_only=True)
        changes = nft.diff(ruleset)
        if changes is None:
            print("# nft -c accepts this ruleset; not loaded now")
        elif not changes:
            print("# nft -c accepts this ruleset; the live table inet portfwd is the same")
        else:
            print("# nft -c accepts this ruleset; the live table inet portfwd differs (- live, + this plan):")
            print("\n".join(f"# {line}" for line in changes))
        for problem in nft.forwarding_problems(enable=False):
            print(f"# warning: {problem}")
        return
    for problem in nft.forwarding_problems(loaded.gateway.enable_forwarding):
        print(f"portfwd: warning: {problem}", file=sys.stderr)
    nft.apply(ruleset)
    print(f"applied table inet portfwd: {len(loaded.gateway.forward)} forward rule(s)")


def _port_proto(value: str) -> tuple[int, Literal["tcp", "udp"]]:
    try:
        return oneshot.port_proto(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _external(value: str | None, port: int) -> int:
    try:
        return oneshot.external_port(value, port)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--external'") from None


_METHODS = click.Choice(["auto", "pcp", "natpmp", "upnp"])


def _router_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option(
        "--upnp-url", metavar="URL", help="The router's UPnP description URL (skips SSDP)."
    )(command)
    command = click.option(
        "--gateway", metavar="ADDR", help="The router's address (default: the default route's)."
    )(command)
    command = click.option(
        "--tries",
        type=click.IntRange(1, 20),
        metavar="N",
        help="Send a PCP/NAT-PMP request at most N times (default: the RFC's schedule, about a minute).",
    )(command)
    command = click.option(
        "--method",
        type=_METHODS,
        default="auto",
        show_default=True,
        help="PCP, NAT-PMP, UPnP IGD, or the first that works.",
    )(command)
    return _logging_options(command)


def _asyncio_run(coroutine: Any) -> Any:
    import asyncio

    return asyncio.run(coroutine)


@app.group(name="map")
def map_group() -> None:
    """Ask the home router for a port (PCP, NAT-PMP or UPnP IGD), list or remove mappings."""


@map_group.command(name="ip")
@_router_options
def map_ip(
    method: str,
    tries: int | None,
    gateway: str | None,
    upnp_url: str | None,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """Print the router's external address and the method that told it."""
    setup_logging(verbose, quiet, log_format)
    used, address = oneshot.one_shot(method, gateway, upnp_url, tries, lambda m: m.external_address())
    print(oneshot.address_line(used, address))


@map_group.command(name="add")
@click.argument("port", metavar="PORT[/PROTO]")
@click.option(
    "--external", metavar="N|any", help="External port to ask for (default: PORT; any = the router picks)."
)
@click.option(
    "--lease",
    default=oneshot.DEFAULT_LEASE,
    show_default=True,
    metavar="DURATION",
    help="Lease to ask for, e.g. 90s, 2h.",
)
@click.option(
    "--to", "to_host", metavar="HOST", help="Map to another LAN host (UPnP only; default: this host)."
)
@_router_options
def map_add(
    port: str,
    external: str | None,
    lease: str,
    to_host: str | None,
    method: str,
    tries: int | None,
    gateway: str | None,
    upnp_url: str | None,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """Map one port on the router to this host and print the public endpoint (like upnpc -a)."""
    setup_logging(verbose, quiet, log_format)
    _port_proto(port)  # each argument checked on its own, so click's message names the one at fault
    _external(external, 1)
    try:
        request = oneshot.add_request(port, external, lease, to_host)
    except ConfigError as exc:
        raise click.BadParameter(exc.message, param_hint="'--lease'") from None
    _, granted = oneshot.one_shot(method, gateway, upnp_url, tries, lambda m: m.add(request))
    print(oneshot.granted_line(granted))


@map_group.command(name="remove")
@click.argument("port", metavar="PORT[/PROTO]")
@click.option("--external", metavar="N", help="External port of the mapping (UPnP; default: PORT).")
@_router_options
def map_remove(
    port: str,
    external: str | None,
    method: str,
    tries: int | None,
    gateway: str | None,
    upnp_url: str | None,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """Delete a mapping; with auto, ask every method the router answers."""
    from portfwd.errors import RouterError
    from portfwd.router.base import MapRequest
    from portfwd.router.choose import candidates, make
    from portfwd.router.udp import exchange

    setup_logging(verbose, quiet, log_format)
    number, proto = _port_proto(port)
    request = MapRequest(proto, number, _external(external, number) or number, 0)

    async def remove() -> list[str]:
        route = oneshot.route(gateway)
        done: list[str] = []
        errors: list[RouterError] = []
        for name in candidates(method):
            used = make(name, route, exchange, upnp_url=upnp_url, probing=method == "auto", tries=tries)
            try:
                await used.remove(request, None)
                done.append(name)
            except RouterError as exc:
                if method != "auto" or exc.reason not in ("unsupported", "unreachable"):
                    errors.append(exc)
            finally:
                await used.close()
        if errors and not done:
            raise errors[0]
        if not done:
            raise RouterError("no mapping method answered", reason="unreachable")
        return done

    done = _asyncio_run(remove())
    print(f"removed {request.external_port}/{proto} (asked {', '.join(done)})")


@map_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_router_options
def map_list(
    as_json: bool,
    method: str,
    tries: int | None,
    gateway: str | None,
    upnp_url: str | None,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """List the router's mappings (UPnP), marking portfwd's own."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from portfwd.router.choose import make
    from portfwd.router.udp import exchange

    setup_logging(verbose, quiet, log_format)
    if method not in ("auto", "upnp"):
        raise click.BadParameter(
            f"{method} cannot list a router's mappings; use upnp", param_hint="'--method'"
        )

    async def entries() -> Any:
        used = make("upnp", oneshot.route(gateway), exchange, upnp_url=upnp_url)
        try:
            return await used.entries()
        finally:
            await used.close()

    rows = _asyncio_run(entries())
    if as_json:
        print(json.dumps([{**row._asdict(), "ours": row.ours} for row in rows], indent=2))
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("", "external", "internal", "lease", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            "*" if row.ours else "",
            f"{row.external_port}/{row.protocol}",
            f"{row.internal_host}:{row.internal_port}",
            f"{row.lease} s" if row.lease else "permanent",
            printable(row.description),  # the router's text
        )
    Console(markup=False, emoji=False).print(table if rows else Text("the router holds no mappings"))


_target_options = (
    click.option("--name", metavar="NAME", help="The instance started with --name NAME."),
    click.option("--control", "control_socket", metavar="PATH", help="The instance serving PATH."),
)


@app.command()
@_config_option
@_target_options[0]
@_target_options[1]
@click.option("--json", "as_json", is_flag=True, help="Print the raw snapshot as JSON.")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
def status(
    config_file: str | None, name: str | None, control_socket: str | None, as_json: bool, watch: bool
) -> None:
    """Show a running instance: rules, listeners and live sessions with bytes and ages.

    -c FILE, --name or --control picks one instance; with none of them (and no $PORTFWD_CONFIG),
    every running instance is listed, and shown whole when there is just one.
    """
    from rich.console import Console, Group
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

    if as_json and not watch:
        picture: Any = fetch() if where is not None else {"instances": every()}
        print(json.dumps(picture, indent=2, sort_keys=True))
        return
    plain = {"markup": False, "emoji": False, "highlight": False}
    console = Console(**plain) if sys.stdout.isatty() else Console(width=200, **plain)  # type: ignore[arg-type]
    if not watch:
        console.print(view())
        return
    if not console.is_terminal:  # piped: print a fresh picture every second instead
        while True:
            console.print(view())
            sys.stdout.flush()
            time.sleep(1)
    with Live(view(), console=console, refresh_per_second=4, screen=False) as live:
        while True:
            time.sleep(1)
            live.update(view())


@app.command()
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn every failure into one line and an exit code."""
    try:
        code = app.main(args=argv, prog_name="portfwd", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
        sys.exit(2)
    except click.UsageError as exc:
        hint = (
            f" (see portfwd {exc.ctx.info_name} --help)"
            if exc.ctx and exc.ctx.parent
            else " (see portfwd --help)"
        )
        print(f"portfwd: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the last boundary: one line, even for a bug
        sys.exit(report(exc))
    sys.exit(code if isinstance(code, int) else 0)
