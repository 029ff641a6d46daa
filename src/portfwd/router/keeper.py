"""Keep router mappings alive under `portfwd run`, and remove them on exit.

Each mapping gets one task: pick the method (`auto` probes), map, then renew at half the
granted lifetime and check the router every `PORTFWD_MAP_CHECK` seconds (default 60). A
renewal's epoch going backwards, a UPnP mapping missing from the router's table, or a
NAT-PMP/PCP restart announcement on 224.0.0.1:5350 all mean the router lost its state: the
mapping is made again at once and the log says why. Failures are retried with backoff (1 s
doubling to 60 s) and shown in `portfwd status`; one failing mapping never stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from portfwd.errors import RouterError
from portfwd.logevents import event
from portfwd.proto import natpmp, pcp
from portfwd.router import ledger
from portfwd.router.base import Granted, MapRequest, Method, Route, default_route, route_via
from portfwd.router.choose import first_working
from portfwd.router.udp import exchange
from portfwd.specs import MapSpec
from portfwd.status import MappingRow

log = logging.getLogger("portfwd.router")

BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
REMOVE_TIMEOUT = 5.0


def check_interval() -> float:
    """Seconds between router checks; PORTFWD_MAP_CHECK overrides the default of 60."""
    try:
        return max(0.2, float(os.environ.get("PORTFWD_MAP_CHECK", "60")))
    except ValueError:
        return 60.0


@dataclass(frozen=True, slots=True)
class Wanted:
    """One mapping to keep: a MapSpec with its request in the router drivers' terms."""

    name: str
    request: MapRequest
    method: str = "auto"
    upnp_url: str | None = None
    gateway: str | None = None


@dataclass(slots=True)
class _Run:
    wanted: Wanted
    row: MappingRow  #: frozen: changes replace it, here and in the keeper's `rows`
    method: Method | None = None
    granted: Granted | None = None  #: the last grant; kept after a failure so exit still deletes it
    remap: bool = True  #: map (again) before the next renewal
    poke: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Keeper:
    """All mappings of one `portfwd run`; `rows` is the live list `portfwd status` shows."""

    def __init__(self, maps: Sequence[MapSpec], rows: list[MappingRow]) -> None:
        wanted = [
            Wanted(
                spec.name,
                MapRequest(spec.protocol, spec.port, spec.external, spec.lease),
                spec.method,
                spec.upnp_url,
                spec.gateway,
            )
            for spec in maps
        ]
        self.rows = rows
        self._runs = [_Run(item, self._row(item)) for item in wanted]
        self._announcements: asyncio.DatagramTransport | None = None
        self._route: Route | None = None

    @staticmethod
    def _row(item: Wanted) -> MappingRow:
        return MappingRow(
            name=item.name,
            method=item.method,
            protocol=item.request.protocol,
            internal=f"*:{item.request.internal_port}",
            external="",
            state="mapping",
            lease=0,
            expires=None,
            renewals=0,
            recreated=0,
            last_error="",
            since=time.time(),
        )

    def _update(self, run: _Run, **changes: Any) -> None:
        """Replace the run's row with a changed copy, in `rows` too (if a reload has not dropped it)."""
        old = run.row
        run.row = replace(old, **changes)
        for index, row in enumerate(self.rows):
            if row is old:
                self.rows[index] = run.row
                break

    async def start(self) -> None:
        """Start one task per mapping; returns at once (mapping happens in the background)."""
        self.rows[:] = [run.row for run in self._runs]
        await self._listen_announcements()
        for run in self._runs:
            run.task = asyncio.get_running_loop().create_task(self._keep(run), name=f"map {run.wanted.name}")

    def _resolve(self, wanted: Wanted) -> Route:
        if wanted.gateway:
            return route_via(wanted.gateway)
        if self._route is None:
            self._route = default_route()
        return self._route

    async def _keep(self, run: _Run) -> None:
        wanted = run.wanted
        backoff = BACKOFF_FIRST
        while True:
            try:
                if run.remap:
                    await self._map(run)
                    run.remap = False
                    backoff = BACKOFF_FIRST
                granted = run.granted
                assert granted is not None
                assert run.method is not None
                half = max(1.0, granted.lifetime / 2) if granted.lifetime else float("inf")
                wait = min(half, check_interval())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.poke.wait(), wait)
                run.poke.clear()
                renewed, lost = await run.method.refresh(wanted.request, granted)
                self._granted(run, renewed)
                self._update(run, renewals=run.row.renewals + 1)
                if lost:
                    self._update(run, recreated=run.row.recreated + 1)
                    log.warning(
                        "%s: the router lost mapping %s (restarted?); made it again at %s",
                        wanted.name, wanted.request.label, renewed.public,
                        extra=event("map.recreated", map=wanted.name, external=renewed.public),
                    )  # fmt: skip
                if renewed.external_host != granted.external_host:
                    log.warning(
                        "%s: the router's external address changed from %s to %s",
                        wanted.name, granted.external_host, renewed.external_host,
                        extra=event(
                            "map.address_changed", map=wanted.name,
                            previous=granted.external_host, external=renewed.external_host,
                        ),
                    )  # fmt: skip
            except RouterError as exc:
                self._update(run, state="retrying", last_error=exc.line())
                log.error(
                    "%s: %s; retrying in %g s",
                    wanted.name,
                    exc.line(),
                    backoff,
                    extra=event("map.retry", map=wanted.name, reason=exc.message, delay_s=backoff),
                )
                run.remap = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _map(self, run: _Run) -> None:
        wanted = run.wanted
        if run.method is None:
            route = self._resolve(wanted)
            run.method, granted = await first_working(
                wanted.method,
                route,
                lambda method: method.add(wanted.request),
                exchange=exchange,
                upnp_url=wanted.upnp_url,
            )
        else:
            granted = await run.method.add(wanted.request)
        self._granted(run, granted)
        log.info(
            "%s: %s published at %s via %s (lease %s)",
            wanted.name, wanted.request.label, granted.public, granted.method,
            f"{granted.lifetime} s" if granted.lifetime else "permanent, removed on exit",
            extra=event(
                "map.added", map=wanted.name, external=granted.public, method=granted.method,
                lease_s=granted.lifetime or None,
            ),
        )  # fmt: skip

    def _granted(self, run: _Run, granted: Granted) -> None:
        run.granted = granted
        if run.method is not None and granted.method != "upnp":
            # For `portfwd map list`, which cannot ask a PCP/NAT-PMP router what it holds.
            try:
                ledger.record(str(run.method.route.gateway), granted)
            except RouterError as exc:
                log.debug("%s: %s", run.wanted.name, exc.line())
        self._update(
            run,
            method=granted.method,
            internal=f"{granted.internal_host}:{granted.internal_port}",
            external=granted.public,
            state="up",
            lease=granted.lifetime,
            expires=time.time() + granted.lifetime if granted.lifetime else None,
            since=run.row.since if run.row.state == "up" else time.time(),
        )

    async def _listen_announcements(self) -> None:
        """Hear NAT-PMP/PCP restart announcements (224.0.0.1:5350); optional, so errors are ignored."""
        keeper = self

        class Heard(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                keeper._announced(data, addr[0])

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("0.0.0.0", natpmp.CLIENT_PORT))
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(Heard, sock=sock)
        except OSError as exc:
            sock.close()
            log.debug(
                "router announcements not heard (port %d: %s); checks cover it",
                natpmp.CLIENT_PORT,
                exc.strerror or type(exc).__name__,
            )
            return
        self._announcements = transport

    def _announced(self, data: bytes, source: str) -> None:
        if natpmp.parse_announcement(data) is None and pcp.parse_announcement(data) is None:
            return
        for run in self._runs:
            method = run.method
            if method is not None and method.name != "upnp" and str(method.route.gateway) == source:
                log.info(
                    "%s: the router at %s announced a restart or a new address; checking",
                    run.wanted.name,
                    source,
                    extra=event("map.announcement", map=run.wanted.name, router=source),
                )
                run.poke.set()

    async def stop(self) -> None:
        """Stop renewing and delete every mapping made (bounded in time)."""
        if self._announcements is not None:
            self._announcements.close()
        for run in self._runs:
            if run.task is not None:
                run.task.cancel()
        for run in self._runs:
            if run.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await run.task
        await asyncio.gather(*(self._remove(run) for run in self._runs))

    async def _remove(self, run: _Run) -> None:
        method, granted = run.method, run.granted
        if method is None:
            return
        try:
            if granted is not None:
                await asyncio.wait_for(method.remove(run.wanted.request, granted), REMOVE_TIMEOUT)
                log.info(
                    "%s: mapping %s removed from the router",
                    run.wanted.name,
                    granted.public,
                    extra=event("map.removed", map=run.wanted.name, external=granted.public),
                )
                self._update(run, state="removed", external="")
                if granted.method != "upnp":
                    try:
                        ledger.forget(
                            granted.method, str(method.route.gateway), granted.protocol, granted.internal_port
                        )
                    except RouterError as exc:
                        log.debug("%s: %s", run.wanted.name, exc.line())
        except (RouterError, TimeoutError) as exc:
            text = exc.line() if isinstance(exc, RouterError) else f"no answer in {REMOVE_TIMEOUT:g} s"
            log.error(
                "%s: could not remove mapping %s: %s",
                run.wanted.name,
                granted.public if granted else run.wanted.request.label,
                text,
                extra=event("map.remove_failed", map=run.wanted.name, reason=text),
            )
        finally:
            await method.close()
