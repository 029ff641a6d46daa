"""One-shot router commands (`portfwd map add`, `map ip`) with as little start-up as possible.

A router answers a PCP or NAT-PMP request in about a millisecond, so `portfwd map add` costs
what the process costs to start. This module imports only small parts of the standard library
and the PCP/NAT-PMP drivers, which it runs on `router.blocking` (no asyncio); UPnP gets an event
loop only when it is reached. `cli/maps.py` parses the commands and calls it; the CLI's
`LazyGroup` loads nothing else for them (bench/RESULTS.md has the times).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from portfwd.duration import parse_duration
from portfwd.router import blocking
from portfwd.router.base import Granted, MapRequest, Method, Route, default_route, route_via
from portfwd.router.choose import attempt_with, candidates, none_worked

T = TypeVar("T")

#: `map add --lease` when not given.
DEFAULT_LEASE = "2h"


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
) -> tuple[Method, T]:
    """Run `attempt` once with the named method, or the first that works; (method, result)."""
    where = route(gateway)
    failures: list[str] = []
    for name in candidates(method):
        if name == "upnp":
            outcome = _on_a_loop(method, where, attempt, upnp_url)
        else:
            outcome = blocking.run(
                attempt_with(name, method, where, attempt, exchange=blocking.exchange, tries=tries)
            )
        if isinstance(outcome, str):
            failures.append(outcome)
            continue
        return outcome  # PCP and NAT-PMP hold nothing open; UPnP was closed on its loop
    raise none_worked(failures)


def _on_a_loop(
    method: str, where: Route, attempt: Callable[[Method], Awaitable[T]], upnp_url: str | None
) -> tuple[Method, T] | str:
    import asyncio  # only UPnP (aiohttp) needs the loop

    from portfwd.router.udp import exchange

    async def once() -> tuple[Method, T] | str:
        outcome = await attempt_with("upnp", method, where, attempt, exchange=exchange, upnp_url=upnp_url)
        if not isinstance(outcome, str):
            await outcome[0].close()
        return outcome

    return asyncio.run(once())


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
