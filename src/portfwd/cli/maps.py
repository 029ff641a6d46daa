"""`portfwd map`: ask the home router for a port (PCP, NAT-PMP, UPnP IGD), list or remove mappings.

Apart from commands.py so that `portfwd map add` loads only click and the router drivers
(`oneshot.py`): `LazyGroup` imports this module alone for it. Imports here stay small; UPnP
brings in asyncio and aiohttp when it is reached, `map list` rich or json when it prints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Literal

import click

from portfwd import oneshot
from portfwd.cli import logging_options
from portfwd.cli.console import setup_logging
from portfwd.duration import parse_duration
from portfwd.errors import ConfigError
from portfwd.printable import printable


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


def _seconds(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise click.BadParameter(exc.message) from None


_METHODS = click.Choice(["auto", "pcp", "natpmp", "upnp"])


def _router_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option(
        "--upnp-url", metavar="URL", help="The router's UPnP description URL (skips SSDP)."
    )(command)
    command = click.option(
        "--gateway", metavar="ADDR", help="The router's address (default: the default route's)."
    )(command)
    command = click.option(
        "--timeout",
        default=oneshot.DEFAULT_TIMEOUT,
        show_default=True,
        metavar="DURATION",
        callback=_seconds,
        help="Give up after this long in all, whatever --tries says.",
    )(command)
    command = click.option(
        "--tries",
        type=click.IntRange(1, 20),
        metavar="N",
        help="Send a PCP/NAT-PMP request at most N times (default: the RFC's schedule, cut by --timeout).",
    )(command)
    command = click.option(
        "--method",
        type=_METHODS,
        default="auto",
        show_default=True,
        help="PCP, NAT-PMP, UPnP IGD, or the first that works.",
    )(command)
    return logging_options(command)


def _logging(verbose: int, quiet: bool, log_format: str) -> Callable[[str], None] | None:
    """Logs for a one-shot command: warnings and errors, and portfwd's INFO lines only with -v.

    Returns where "still asking ..." goes: a line on a terminal or with -v, never in a script's
    quiet pipe, never with -q.
    """
    setup_logging(verbose, quiet or not verbose, log_format)
    if quiet or not (verbose or sys.stderr.isatty()):
        return None

    def notice(line: str) -> None:
        print(f"portfwd: {printable(line)}", file=sys.stderr, flush=True)

    return notice


@click.group(name="map")
def map_group() -> None:
    """Ask the home router for a port (PCP, NAT-PMP or UPnP IGD), list or remove mappings."""


@map_group.command(name="ip")
@_router_options
def map_ip(
    method: str,
    tries: int | None,
    timeout: float,
    gateway: str | None,
    upnp_url: str | None,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """Print the router's external address and the method that told it."""
    notice = _logging(verbose, quiet, log_format)
    used, address = oneshot.one_shot(
        method, gateway, upnp_url, tries, lambda m: m.external_address(), timeout=timeout, notice=notice
    )
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
    timeout: float,
    gateway: str | None,
    upnp_url: str | None,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """Map one port on the router to this host and print the public endpoint (like upnpc -a)."""
    notice = _logging(verbose, quiet, log_format)
    _port_proto(port)  # each argument checked on its own, so click's message names the one at fault
    _external(external, 1)
    try:
        request = oneshot.add_request(port, external, lease, to_host)
    except ConfigError as exc:
        raise click.BadParameter(exc.message, param_hint="'--lease'") from None
    used, granted = oneshot.one_shot(
        method, gateway, upnp_url, tries, lambda m: m.add(request), timeout=timeout, notice=notice
    )
    oneshot.remember(used, granted)
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
    timeout: float,
    gateway: str | None,
    upnp_url: str | None,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """Delete a mapping; with auto, ask every method the router answers."""
    from portfwd.router.base import MapRequest

    notice = _logging(verbose, quiet, log_format)
    number, proto = _port_proto(port)
    request = MapRequest(proto, number, _external(external, number) or number, 0)
    done = oneshot.remove(method, gateway, upnp_url, tries, request, timeout=timeout, notice=notice)
    print(f"removed {request.external_port}/{proto} (asked {', '.join(done)})")


@map_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_router_options
def map_list(
    as_json: bool,
    method: str,
    tries: int | None,
    timeout: float,
    gateway: str | None,
    upnp_url: str | None,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """List the router's mappings (UPnP) and portfwd's own (PCP, NAT-PMP too), marked with *.

    PCP and NAT-PMP cannot list a router's mappings: for them, portfwd lists what it made
    itself (with `map add` or `run`) and what is left of each lease.
    """
    notice = _logging(verbose, quiet, log_format)
    rows = oneshot.entries(method, gateway, upnp_url, timeout=timeout, notice=notice)
    if as_json:
        import json

        print(json.dumps([{**row._asdict(), "ours": row.ours} for row in rows], indent=2))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD)
    for column in ("", "external", "internal", "lease", "by", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            "*" if row.ours else "",
            f"{row.external_port}/{row.protocol}",
            f"{row.internal_host}:{row.internal_port}",
            f"{row.lease} s" if row.lease else "permanent",
            row.method,
            printable(row.description),  # the router's text
        )
    empty = (
        f"portfwd holds no {method} mappings at this router"
        if method in ("pcp", "natpmp")
        else "the router holds no mappings"
    )
    Console(markup=False, emoji=False).print(table if rows else Text(empty))
