"""Pick the method: the one asked for, or with `auto` the first of PCP, NAT-PMP, UPnP that works.

`auto` moves on only when a method is absent or silent (`unsupported`, `unreachable`,
`bad-reply`); a router that speaks a method and says no (`refused`, `conflict`) has answered,
and asking it again another way would only hide the real reason. A one-shot command whose
`--timeout` is spent (`timeout`) has no time left for another method either.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from portfwd.errors import RouterError
from portfwd.logevents import event
from portfwd.proto import natpmp, pcp
from portfwd.router.base import METHODS, Exchange, Method, Route, UdpMethod
from portfwd.router.natpmp import NatPmp
from portfwd.router.pcp import Pcp

log = logging.getLogger("portfwd.router")

T = TypeVar("T")

#: Tries per UDP method while probing under `auto`: 250 ms + 500 ms for NAT-PMP, 3 s for PCP.
AUTO_TRIES = 2


def make(
    name: str,
    route: Route,
    exchange: Exchange,
    *,
    upnp_url: str | None = None,
    probing: bool = False,
    tries: int | None = None,
) -> Method:
    """One method object by name; `tries` caps PCP/NAT-PMP retransmissions (default: the RFC's)."""
    if name == "pcp":
        return Pcp(route, exchange, tries=tries or (1 if probing else pcp.RETRY_COUNT))
    if name == "natpmp":
        return NatPmp(route, exchange, tries=tries or (AUTO_TRIES if probing else natpmp.RETRY_COUNT))
    if name == "upnp":
        from portfwd.router.upnp import Upnp  # aiohttp is slow to import (D16); only UPnP needs it

        return Upnp(route, upnp_url)
    raise RouterError(f"unknown method {name!r}", reason="unsupported", hint="use auto, pcp, natpmp or upnp")


def candidates(method: str) -> tuple[str, ...]:
    """The methods `method` stands for, in the order `auto` tries them."""
    return METHODS if method == "auto" else (method,)


async def attempt_with(
    name: str,
    method: str,
    route: Route,
    attempt: Callable[[Method], Awaitable[T]],
    *,
    exchange: Exchange,
    upnp_url: str | None = None,
    tries: int | None = None,
) -> tuple[Method, T] | str:
    """Run `attempt` with the method `name`, one of `candidates(method)`.

    Returns the method (still open) and the result, or under `auto` the failure to note before
    moving on; raises when there is no moving on (a named method, or a router that said no).
    """
    candidate = make(name, route, exchange, upnp_url=upnp_url, probing=method == "auto", tries=tries)
    try:
        result = await attempt(candidate)
    except RouterError as exc:
        await candidate.close()
        if method != "auto" or exc.reason in ("refused", "conflict", "timeout"):
            raise
        log.info(
            "router mapping: %s did not work (%s); trying the next method",
            name,
            exc.message,
            extra=event("map.method_failed", method=name, reason=exc.message),
        )
        return f"{name}: {exc.message}"
    if method == "auto":
        log.info(
            "router mapping: using %s at %s",
            name,
            candidate.where,
            extra=event("map.method", method=name, router=str(candidate.where)),
        )
    return candidate, result


def none_worked(failures: list[str]) -> RouterError:
    """`auto` ran out of methods."""
    return RouterError(
        "no mapping method worked (" + "; ".join(failures) + ")",
        reason="unreachable",
        hint="switch on UPnP or NAT-PMP/PCP in the router, or check it is the default gateway",
    )


async def first_working(
    method: str,
    route: Route,
    attempt: Callable[[Method], Awaitable[T]],
    *,
    exchange: Exchange,
    upnp_url: str | None = None,
    tries: int | None = None,
) -> tuple[Method, T]:
    """Run `attempt` with the named method, or with each in turn under `auto`.

    Returns the method that worked (still open, for renewals and removal) and its result.
    """
    failures: list[str] = []
    for name in candidates(method):
        outcome = await attempt_with(
            name, method, route, attempt, exchange=exchange, upnp_url=upnp_url, tries=tries
        )
        if isinstance(outcome, str):
            failures.append(outcome)
            continue
        if isinstance(outcome[0], UdpMethod) and tries is None:
            outcome[0].full_schedule()
        return outcome
    raise none_worked(failures)
