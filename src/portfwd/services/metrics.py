"""The Prometheus endpoint ([metrics]) as a service; a reload moves it to a changed address."""

from __future__ import annotations

import logging

from portfwd.errors import BindError, PortfwdError
from portfwd.logevents import event
from portfwd.metrics import MetricsServer
from portfwd.services.base import Change, Reloadable
from portfwd.specs import Address
from portfwd.state import State

log = logging.getLogger(__name__)


class Metrics(Reloadable[Address | None]):
    """Serves the metrics of `state` at `address` (None: no endpoint).

    It keeps serving while sessions drain, so a scrape sees the shutdown; it stops with the rest.
    """

    name = "metrics"

    def __init__(self, address: Address | None, state: State) -> None:
        self.address = address
        self.state = state
        self._server: MetricsServer | None = None

    @property
    def active(self) -> bool:
        return self._server is not None

    async def start(self) -> list[PortfwdError]:
        if self.address is None:
            return []
        server = MetricsServer(self.state, self.address.host or "0.0.0.0", self.address.port)
        try:
            await server.start()
        except BindError as exc:
            log.error("%s", exc.line(), extra=event("metrics.failed", reason=exc.message))
            return [exc]
        self._server = server
        log.info("metrics: serving %s", server.url, extra=event("metrics.listening", url=server.url))
        return []

    async def retire(self, part: Address | None) -> Change:
        """Nothing: a changed address is moved by `apply`, after the rules and tunnels changed."""
        return Change()

    async def apply(self, part: Address | None) -> Change:
        """Move the endpoint to a changed address; start it when it is not running (an earlier
        bind failure gets another try)."""
        if part != self.address and self._server is not None:
            self._server.stop()
            self._server = None
        self.address = part
        if self._server is not None:
            return Change(kept=1)
        failures = await self.start()
        return Change(
            added=(self.name,) if self._server is not None else (), tried=1, failures=tuple(failures)
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
