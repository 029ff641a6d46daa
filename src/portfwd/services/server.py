"""The SSH tunnel server ([server]) as a service: it starts, or reports why it cannot."""

from __future__ import annotations

import logging

from portfwd.errors import PortfwdError, RuntimeFailure
from portfwd.services.base import Service
from portfwd.specs import ServerSpec
from portfwd.ssh.server import TunnelServer
from portfwd.state import State

log = logging.getLogger(__name__)


class Server(Service):
    """Runs the tunnel server; a server that cannot start is a failure, not the end."""

    name = "server"

    def __init__(self, spec: ServerSpec, state: State, *, fast_path: bool) -> None:
        self.spec = spec
        self.state = state
        self.fast_path = fast_path
        self._server: TunnelServer | None = None

    @property
    def active(self) -> bool:
        return self._server is not None

    async def start(self) -> list[PortfwdError]:
        server = TunnelServer(self.spec, self.state, fast_path=self.fast_path)
        try:
            await server.start()
        except RuntimeFailure as exc:
            log.error("%s", exc.line())
            return [exc]
        self._server = server
        return []

    async def stop_accepting(self) -> None:
        if self._server is not None:
            await self._server.stop_accepting()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None
