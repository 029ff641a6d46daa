"""One-shot router commands (`portfwd map add|ip|remove|list`) with as little start-up as possible.

A router answers a PCP or NAT-PMP request in about a millisecond, so `portfwd map add` costs
what the process costs to start. This module imports only small parts of the standard library
and the PCP/NAT-PMP drivers, which it runs on `router.blocking` (no asyncio); UPnP gets an event
loop only when it is reached. `cli/maps.py` parses the commands and calls it; the CLI's
`LazyGroup` loads nothing else for them (bench/RESULTS.md has the times). Every command runs
within one `Deadline` (`--timeout`), which also says what is being asked when that takes a while.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from portfwd.duration import parse_duration
from portfwd.errors import RouterError
from portfwd.router import base, blocking, ledger
from portfwd.router.base import (
    DESCRIPTION,
    Deadline,
    Granted,
    MapRequest,
    Method,
    Route,
    RouterEntry,
    default_route,
    route_via,
)
from portfwd.router.choose import attempt_with, candidates, make, none_worked

log = logging.getLogger("portfwd.router")

T = TypeVar("T")

#: `map add --lease` when not given.
DEFAULT_LEASE = "2h"
#: `--timeout` when not given (router/base.py says why).
DEFAULT_TIMEOUT = f"{base.DEFAULT_TIMEOUT:g}s"

Notice = Callable[[str], None]


def port_proto(value: str) -> tuple[int, Literal["tcp", "udp"]]:
    """`8080`, `8080/tcp` or `5353/udp`; ValueError says what to write instead."""
    port_text, _, proto_text = value.partition("/")
    if proto_text.lower() not in ("", "tcp", "udp"):
        raise ValueError(f"{value!r}: protocol must be tcp or udp; write PORT/tcp or PORT/udp")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: not a port; write a number in 1-65535, e.g. 8080/tcp")
    return int(port_text), "udp" if proto_text.lower() == "udp" else "tcp"


def external_port(value: str | None, port: int) -> int:
    """`--external`: a port, `any` (0: the router picks), or by default the internal port."""
    if value is None:
        return port
    if value == "any":
        return 0
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError(f"{value!r}: write a port in 1-65535 or any")
    return int(value)


def add_request(port: str, external: str | None, lease: str, to_host: str | None) -> MapRequest:
    """`map add`'s arguments as a request; ValueError or ConfigError (the lease) when wrong."""
    number, proto = port_proto(port)
    return MapRequest(
        proto, number, external_port(external, number), max(1, round(parse_duration(lease))), to_host
    )


def route(gateway: str | None) -> Route:
    """The router to ask: `--gateway`, else the kernel's default route."""
    return route_via(gateway) if gateway else default_route()


def one_shot(
    method: str,
    gateway: str | None,
    upnp_url: str | None,
    tries: int | None,
    attempt: Callable[[Method], Awaitable[T]],
    *,
    timeout: float,
    notice: Notice | None = None,
) -> tuple[Method, T]:
    """Run `attempt` once with the named method, or the first that works; (method, result).

    `tries` caps each PCP/NAT-PMP retransmission schedule, `timeout` the whole command: the
    first reached ends it. `notice` hears once per method what is asked when it takes a while.
    """
    where = route(gateway)
    deadline = _deadline(where, timeout, notice)
    failures: list[str] = []
    for name in candidates(method):
        if deadline.left() <= 0:
            raise deadline.expired()
        if name == "upnp":
            outcome = _upnp_attempt(method, where, attempt, upnp_url, deadline)
        else:
            outcome = blocking.run(
                attempt_with(name, method, where, attempt, exchange=blocking.Exchange(deadline), tries=tries)
            )
        if isinstance(outcome, str):
            failures.append(outcome)
            continue
        return outcome  # PCP and NAT-PMP hold nothing open; UPnP was closed on its loop
    raise none_worked(failures)


def remember(used: Method, granted: Granted) -> None:
    """Write down a PCP/NAT-PMP grant for `map list`; a failure is a warning, the mapping stands."""
    if granted.method == "upnp":
        return  # the router lists UPnP mappings with portfwd's description
    try:
        ledger.record(str(used.route.gateway), granted)
    except RouterError as exc:
        log.warning("%s; portfwd map list will not show this mapping", exc.line())


def remove(
    method: str,
    gateway: str | None,
    upnp_url: str | None,
    tries: int | None,
    request: MapRequest,
    *,
    timeout: float,
    notice: Notice | None = None,
) -> list[str]:
    """Delete a mapping by the named method, or under `auto` by every method the router answers.

    Returns the methods that removed it; raises the first refusal, or the deadline's error,
    when none did.
    """
    where = route(gateway)
    deadline = _deadline(where, timeout, notice)
    done: list[str] = []
    errors: list[RouterError] = []
    for name in candidates(method):
        try:
            if deadline.left() <= 0:
                raise deadline.expired()
            if name == "upnp":
                _on_a_loop(where, upnp_url, deadline, lambda used: used.remove(request, None))
            else:
                used = make(name, where, blocking.Exchange(deadline), probing=method == "auto", tries=tries)
                blocking.run(used.remove(request, None))
            done.append(name)
        except RouterError as exc:
            if exc.reason == "timeout":
                errors.append(exc)
                break
            if method != "auto" or exc.reason not in ("unsupported", "unreachable"):
                errors.append(exc)
    if errors and not done:
        raise errors[0]
    if not done:
        raise RouterError("no mapping method answered", reason="unreachable")
    # The router keeps one table whichever protocol wrote to it: a mapping one method removed
    # is gone for the others too, so what portfwd wrote down for any of them is crossed off.
    for name in LEDGER_METHODS:  # another method's grant only if it is that very mapping
        _forget(name, where, request, None if name in done else request.external_port)
    return done


#: The methods whose grants portfwd writes down (the router cannot list them): router/ledger.py.
LEDGER_METHODS = ("pcp", "natpmp")


def _forget(name: str, where: Route, request: MapRequest, external: int | None = None) -> None:
    try:
        ledger.forget(name, str(where.gateway), request.protocol, request.internal_port, external)
    except RouterError as exc:
        log.warning("%s; portfwd map list may still show this mapping until its lease ends", exc.line())


def entries(
    method: str,
    gateway: str | None,
    upnp_url: str | None,
    *,
    timeout: float,
    notice: Notice | None = None,
) -> list[RouterEntry]:
    """`map list`: the router's UPnP table, with portfwd's own PCP/NAT-PMP mappings marked.

    PCP and NAT-PMP cannot list a router's mappings, so those are the ones portfwd made and
    wrote down (`router/ledger.py`), with the lease left. `--method pcp|natpmp` lists only
    those; `auto` asks UPnP too, and lists what portfwd holds when UPnP does not answer.
    """
    where = route(gateway)
    deadline = _deadline(where, timeout, notice)
    held = (
        [row for row in ledger.held(str(where.gateway)) if method in ("auto", row.method)]
        if method != "upnp"
        else []
    )
    rows: list[RouterEntry] = []
    if method in ("auto", "upnp"):
        try:
            rows = _on_a_loop(where, upnp_url, deadline, lambda used: used.entries())
        except RouterError as exc:
            if method == "upnp" or not held or exc.reason not in ("unreachable", "unsupported", "timeout"):
                raise
            log.warning("%s; listing only the mappings portfwd made by PCP or NAT-PMP", exc.line())
    return merged(rows, held)


def merged(rows: list[RouterEntry], held: list[ledger.Held], now: float | None = None) -> list[RouterEntry]:
    """The router's rows with portfwd's marked (by method), then what portfwd holds that it did not list."""
    import time

    now = time.time() if now is None else now
    out = [row._replace(method="upnp") if row.description.startswith(DESCRIPTION) else row for row in rows]
    for mine in held:
        same = (mine.protocol, mine.external_port, mine.internal_host, mine.internal_port)
        for index, row in enumerate(out):
            if (
                not row.method
                and (row.protocol, row.external_port, row.internal_host, row.internal_port) == same
            ):
                out[index] = row._replace(method=mine.method)
                break
        else:
            out.append(
                RouterEntry(
                    mine.protocol, mine.external_port, mine.internal_host, mine.internal_port, "",
                    mine.left(now), method=mine.method,
                )
            )  # fmt: skip
    return out


def _deadline(where: Route, timeout: float, notice: Notice | None) -> Deadline:
    deadline = Deadline(timeout, notice)
    deadline.router = str(where.gateway)
    return deadline


def _upnp_attempt(
    method: str,
    where: Route,
    attempt: Callable[[Method], Awaitable[T]],
    upnp_url: str | None,
    deadline: Deadline,
) -> tuple[Method, T] | str:
    import asyncio  # only UPnP (aiohttp) needs the loop

    from portfwd.router.udp import exchange

    async def once() -> tuple[Method, T] | str:
        outcome = await attempt_with(
            "upnp", method, where, lambda used: _within(deadline, where, upnp_url, attempt(used)),
            exchange=exchange, upnp_url=upnp_url,
        )  # fmt: skip
        if not isinstance(outcome, str):
            await outcome[0].close()
        return outcome

    return asyncio.run(once())


def _on_a_loop(
    where: Route, upnp_url: str | None, deadline: Deadline, work: Callable[[Method], Awaitable[T]]
) -> T:
    """`work` with a UPnP method on an event loop, within the deadline; the method is closed after."""
    import asyncio

    from portfwd.router.udp import exchange

    async def once() -> T:
        used = make("upnp", where, exchange, upnp_url=upnp_url)
        try:
            return await _within(deadline, where, upnp_url, work(used))
        finally:
            await used.close()

    return asyncio.run(once())


async def _within(deadline: Deadline, where: Route, upnp_url: str | None, work: Awaitable[T]) -> T:
    """Await a UPnP call within what is left of the deadline, saying what it waits for after a while."""
    import asyncio

    host = upnp_url or str(where.gateway)
    deadline.asking("UPnP", host)
    due = deadline.waiting("UPnP", host)
    later = (
        None
        if math.isinf(due)
        else asyncio.get_running_loop().call_later(due, deadline.waiting, "UPnP", host)
    )
    scope = asyncio.timeout(deadline.left())
    try:
        async with scope:
            return await work
    except TimeoutError:
        if scope.expired():
            raise deadline.expired() from None
        raise
    finally:
        if later is not None:
            later.cancel()


def address_line(used: Method, address: str) -> str:
    """What `map ip` prints."""
    return f"{address} (via {used.name} at {used.where})"


def granted_line(granted: Granted) -> str:
    """What `map add` prints: the public endpoint first, like upnpc."""
    lease = (
        f"lease {granted.lifetime} s" if granted.lifetime else "permanent: remove it with portfwd map remove"
    )
    return (
        f"{granted.public}/{granted.protocol} -> {granted.internal_host}:{granted.internal_port} "
        f"via {granted.method} ({lease})"
    )
