"""The dashboard and API ([web]) as a service; a reload moves it or changes its token."""

from __future__ import annotations

import logging

from portfwd.errors import BindError, PortfwdError
from portfwd.logevents import event
from portfwd.services.base import Change, Reloadable
from portfwd.specs import WebSpec
from portfwd.state import State
from portfwd.web.actions import Actions
from portfwd.web.server import WebServer

log = logging.getLogger(__name__)


class Web(Reloadable[WebSpec | None]):
    """Serves `[web]` for `state` (None: off), doing what `actions` can.

    Like /metrics it keeps serving while sessions drain, and stops with the rest.
    """

    name = "web"

    def __init__(self, spec: WebSpec | None, state: State, actions: Actions | None) -> None:
        self.spec = spec
        self.state = state
        self.actions = actions
        self._server: WebServer | None = None

    @property
    def active(self) -> bool:
        return self._server is not None

    async def start(self) -> list[PortfwdError]:
        if self.spec is None:
            return []
        server = WebServer(self.spec, self.state, self.actions)
        try:
            await server.start()
        except BindError as exc:
            log.error("%s", exc.line(), extra=event("web.failed", reason=exc.message))
            return [exc]
        self._server = server
        actions = "actions with the token" if self.spec.token else "read only: no token"
        log.info(
            "web: dashboard and API on %s (%s)",
            server.url,
            actions,
            extra=event("web.listening", url=server.url),
        )
        return []

    async def retire(self, part: WebSpec | None) -> Change:
        """A [web] that changes stops here, before any part binds again: its port may be the
        one [metrics] takes back (a shared listener split), and `apply` starts the new one."""
        if part != self.spec and self._server is not None:
            await self.stop()
        return Change()

    async def apply(self, part: WebSpec | None) -> Change:
        """Replace the server when [web] changed (or start it after an earlier bind failure)."""
        if part == self.spec and self._server is not None:
            return Change(kept=1)
        await self.stop()
        self.spec = part
        if part is None:
            return Change(removed=(self.name,))
        failures = await self.start()
        return Change(
            added=(self.name,) if self._server is not None else (), tried=1, failures=tuple(failures)
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
