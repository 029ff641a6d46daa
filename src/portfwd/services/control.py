"""The control socket as a service: claimed first, so that a second instance stops right there."""

from __future__ import annotations

import logging
from pathlib import Path

from portfwd.control import ControlServer, Reloader
from portfwd.errors import BindError, ConfigError, PortfwdError, RuntimeFailure
from portfwd.logevents import event
from portfwd.services.base import Owned, Service
from portfwd.specs import ControlSpec
from portfwd.state import State

log = logging.getLogger(__name__)


class Control(Service):
    """Serves `portfwd status` and `portfwd reload` on the instance's socket at `path`.

    It keeps answering while sessions drain (status shows the drain) and stops last.
    """

    name = "control"

    def __init__(self, spec: ControlSpec, path: Path, state: State, reloader: Reloader | None) -> None:
        self.spec = spec
        self.path = path
        self.state = state
        self.reloader = reloader
        self._server: ControlServer | None = None

    async def start(self) -> list[PortfwdError]:
        """Claim the socket. Raises RuntimeFailure when it cannot: an instance that `status` and
        `reload` cannot reach, or that another one answers for, must not run (see instances.py);
        ConfigError when the configured group is wrong."""
        server = ControlServer(self.state, self.path, self.reloader, self.spec.group)
        try:
            await server.start()
        except BindError as exc:
            if exc.field == "control.group":  # a config error (exit 2), not a runtime one
                raise ConfigError(exc.line()) from exc
            raise RuntimeFailure(exc.line()) from exc
        self._server = server
        self.state.control = str(self.path)
        log.info(
            "control: %s (portfwd status reads it)",
            self.path,
            extra=event("control.listening", path=str(self.path)),
        )
        return []

    def owned(self) -> Owned:
        if self._server is None:
            return Owned()
        made = self._server.made_dir
        return Owned(files=[str(self._server.path)], dirs=[] if made is None else [str(made)])

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None
