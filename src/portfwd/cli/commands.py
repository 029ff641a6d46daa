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
from portfwd.cli.options import config_option, control_option, fast_path_option, name_option, strict_option
from portfwd.errors import ConfigError, RuntimeFailure, UsageError

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table

    from portfwd.specs import Plan


def _load(config_file: str | None) -> tuple[Path, Plan]:
    """Find the config file (-c, else the usual places), then read, validate and plan it.

    Raises ConfigError, one line per problem. The only place here that imports pydantic.
    """
    from portfwd import config, planner

    path = config.find(config_file)
    return path, planner.load(path)


@click.command()
@config_option
@strict_option
@name_option
@control_option
@fast_path_option
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


def _not_kernel(relay_text: str, why: str) -> str:
    """A userspace relay's text with why `relay = "auto"` did not give the rule to the kernel:
    `splice (not kernel: ...)`, `splice (C engine; not kernel: ...)`."""
    if relay_text.endswith(")"):
        return f"{relay_text[:-1]}; not kernel: {why})"
    return f"{relay_text} (not kernel: {why})"


def _table(title: str, columns: Iterable[str], rows: Iterable[tuple[str, ...]]) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


@click.command()
@config_option
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
        rows = relay.describe(plan.rules)
        machine_note = ""
        if any(rule.relay == "auto" for rule in plan.rules):
            from portfwd.kernel import auto

            machine = auto.box()
            if not machine.allowed or not machine.capable:  # the same for every rule: said once
                machine_note = (
                    f'relay = "auto": {auto.why_not(plan.rules[0], machine, None)}; no rule takes it here'
                )
            else:
                for index, rule in enumerate(plan.rules):
                    if rule.relay == "auto":
                        why = auto.why_not(rule, machine, plan.user)
                        rows[index] = (
                            *rows[index][:5],
                            "kernel (nftables NAT; auto)"
                            if why is None
                            else _not_kernel(rows[index][5], why),
                        )
        console.print(_table(title, relay.COLUMNS, rows))
        if machine_note:
            console.print(machine_note)
        explicit = [rule for rule in plan.rules if rule.relay == "kernel"]
        if explicit:
            from portfwd.kernel import nft
            from portfwd.kernel.relay import needs_forwarding

            if needs_forwarding(explicit):  # what `run` warns of, said before it runs
                for problem in nft.forwarding_problems(enable=False, remedy=""):
                    print(f"portfwd: warning: kernel relay: {problem}", file=sys.stderr)
    if any(rule.transparent for rule in plan.rules):
        from portfwd.relay.transparent import problems as transparent_problems

        for problem in transparent_problems(plan.rules, user=plan.user):  # warnings: the config is valid
            print(f"portfwd: warning: {problem}", file=sys.stderr)
    if plan.gateway is not None:
        found, problems = kernel.problems(plan.gateway)
        if problems:
            raise ConfigError(problems[0], problems=problems)
        assert found is not None  # no problems: the interfaces were read
        console.print(kernel.summary(plan.gateway, found))
        for note in kernel.notes(plan.gateway, found):
            print(f"portfwd: warning: {note}", file=sys.stderr)
    if plan.server is not None:
        console.print(server_line(plan.server))
    if plan.tunnels:
        console.print(_table(f"{len(plan.tunnels)} SSH tunnel(s)", TUNNEL_COLUMNS, tunnel_rows(plan.tunnels)))
    for line in map_lines(plan.maps):
        console.print(line)
    if plan.metrics is not None:
        console.print(f"metrics: http://{plan.metrics}/metrics")
    if plan.web is not None:
        web = plan.web
        actions = "actions need the token" if web.token else "no token: read only"
        reads = "; reads need it too" if web.auth == "all" else ""
        shared = " (and /metrics)" if web.metrics else ""
        console.print(f"web: http://{web.listen}/{shared}, {actions}{reads}")
    if plan.user is not None:
        console.print(f"after binding, runs as user {plan.user}")
    console.print("config OK")


@click.command()
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@click.option("--allow", multiple=True, metavar="CIDR", help="Admit only these sources (repeatable).")
@click.option("--deny", multiple=True, metavar="CIDR", help="Refuse these sources (repeatable).")
@click.option(
    "--proxy-protocol",
    type=click.Choice(["v1", "v2"]),
    help="Send the client's address first (PROXY header).",
)
@click.option("--accept-proxy-protocol", is_flag=True, help="Read a PROXY header from each client first...")
@click.option(
    "--trusted-proxy", "trusted_proxies", multiple=True, metavar="CIDR", help="...sent only by these."
)
@click.option("--max-connections", type=int, metavar="N", help="At most N sessions at once (TCP).")
@click.option("--max-connections-per-source", type=int, metavar="N", help="At most N at once per client.")
@click.option("--rate", metavar="RATE", help='New connections per client address, e.g. "20/s".')
@click.option("--bandwidth", metavar="RATE", help='The rule\'s traffic, each way, e.g. "10Mbit".')
@click.option("--bandwidth-per-connection", metavar="RATE", help="Each connection's, each way.")
@click.option("--transparent", is_flag=True, help="Connect from the client's own address (IP_TRANSPARENT).")
@click.option(
    "--relay",
    type=click.Choice(["auto", "kernel", "splice", "protocol"]),
    help="Who relays: the kernel (nftables NAT, root), splice or the protocol path (default: auto).",
)
@click.option("--workers", metavar="N|auto", help="Relay in N processes (default: auto, one per core).")
@strict_option
@name_option
@control_option
@logging_options
def forward(
    specs: tuple[str, ...],
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    workers: str | None,
    strict: bool,
    name: str | None,
    control_socket: str | None,
    verbose: int,
    quiet: bool,
    log_format: str,
    **rule_options: Any,
) -> None:
    """Quick forwards, no config file: SPEC is [bind:]port:host:hostport[/udp|/tcp+udp]."""
    setup_logging(verbose, quiet, log_format)
    identity = instances.identify("forward", name=name, control=control_socket)
    from portfwd import forwardspec, planner

    plan = planner.plan(forwardspec.rules_from_specs(specs, allow, deny, rule_options, workers))
    from portfwd import runtime

    runtime.run(plan, strict=strict, identity=identity)


@click.command()
@config_option
@click.option("--fingerprint", is_flag=True, help="Print the host key's SHA256 fingerprint and exit.")
@name_option
@control_option
@fast_path_option
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


_target_options = (
    click.option("--name", metavar="NAME", help="The instance started with --name NAME."),
    click.option("--control", "control_socket", metavar="PATH", help="The instance serving PATH."),
)


@click.command()
@config_option
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
@click.option(
    "--url",
    metavar="URL",
    help="Read the instance whose [web] listens at URL (http://HOST:PORT) instead of a local one.",
)
@click.option(
    "--token-file",
    metavar="FILE",
    help='With --url: the [web] token, for an instance that asks for it to read (auth = "all").',
)
def status(
    config_file: str | None,
    name: str | None,
    control_socket: str | None,
    as_json: bool,
    watch: float | None,
    url: str | None,
    token_file: str | None,
) -> None:
    """Show a running instance: rules, listening sockets, live and recently closed sessions,
    with bytes, rates and ages.

    -c FILE, --name or --control picks one instance; with none of them (and no $PORTFWD_CONFIG),
    every running instance is listed, and shown whole when there is just one.
    """
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from portfwd.cli import find, remote, views

    if url is None and token_file is not None:
        raise UsageError("--token-file goes with --url", hint="add --url http://HOST:PORT")
    if url is not None and (config_file or name or control_socket):
        raise UsageError("--url reads a remote instance; leave out -c, --name and --control")
    token = remote.read_token(token_file) if token_file is not None else None
    where = find.target(config_file, name, control_socket, validate=False) if url is None else None

    def fetch() -> dict[str, Any]:
        if url is not None:
            return remote.fetch_status(url, token)
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
        if where is not None or url is not None:
            return views.status_view(views.printable_snapshot(fetch()))
        snapshots = [views.printable_snapshot(snapshot) for snapshot in every()]
        if len(snapshots) == 1:
            return views.status_view(snapshots[0])
        hint = Text("portfwd status --name NAME shows one of them whole")
        return Group(views.instances_view(snapshots), hint)

    if as_json:

        def picture() -> Any:
            return fetch() if where is not None or url is not None else {"instances": every()}

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
@config_option
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
