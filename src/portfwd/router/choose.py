"""Pick the method: the one asked for, or with `auto` the first of PCP, NAT-PMP, UPnP that works.

`auto` moves on only when a method is absent or silent (`unsupported`, `unreachable`,
`bad-reply`); a router that speaks a method and says no (`refused`, `conflict`) has answered,
and asking it again another way would only hide the real reason.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from portfwd.errors import RouterError
from portfwd.proto import natpmp, pcp
from portfwd.router.base import METHODS, Method, Route
from portfwd.router.natpmp import NatPmp
from portfwd.router.pcp import Pcp

log = logging.getLogger("portfwd.router")

T = TypeVar("T")

#: Tries per UDP method while probing under `auto`: 250 ms + 500 ms for NAT-PMP, 3 s for PCP.
AUTO_TRIES = 2


def make(
    name: str, route: Route, *, upnp_url: str | None = None, probing: bool = False, tries: int | None = None
) -> Method:
    """One method object by name; `tries` caps PCP/NAT-PMP retransmissions (default: the RFC's)."""
    if name == "pcp":
        return Pcp(route, tries=tries or (1 if probing else pcp.RETRY_COUNT))
    if name == "natpmp":
        return NatPmp(route, tries=tries or (AUTO_TRIES if probing else natpmp.RETRY_COUNT))
    if name == "upnp":
        from portfwd.router.upnp import Upnp  # aiohttp costs 80 ms to import; only UPnP needs it

        return Upnp(route, upnp_url)
    raise RouterError(f"unknown method {name!r}", reason="unsupported", hint="use auto, pcp, natpmp or upnp")


async def first_working(
    method: str,
    route: Route,
    attempt: Callable[[Method], Awaitable[T]],
    *,
    upnp_url: str | None = None,
    tries: int | None = None,
) -> tuple[Method, T]:
    """Run `attempt` with the named method, or with each in turn under `auto`.

    Returns the method that worked (still open, for renewals and removal) and its result.
    """
    names = METHODS if method == "auto" else (method,)
    failures: list[str] = []
    for name in names:
        candidate = make(name, route, upnp_url=upnp_url, probing=method == "auto", tries=tries)
        try:
            result = await attempt(candidate)
        except RouterError as exc:
            await candidate.close()
            if method != "auto" or exc.reason in ("refused", "conflict"):
                raise
            log.info("router mapping: %s did not work (%s); trying the next method", name, exc.message)
            failures.append(f"{name}: {exc.message}")
            continue
        if method == "auto":
            log.info("router mapping: using %s at %s", name, candidate.where)
        if isinstance(candidate, (Pcp, NatPmp)) and tries is None:
            candidate.full_schedule()
        return candidate, result
    raise RouterError(
        "no mapping method worked (" + "; ".join(failures) + ")",
        reason="unreachable",
        hint="switch on UPnP or NAT-PMP/PCP in the router, or check it is the default gateway",
    )
