"""The router port mappings ([[map]]) as a service: the keeper asks for, renews and removes them."""

from __future__ import annotations

from portfwd.errors import PortfwdError
from portfwd.router.keeper import Keeper
from portfwd.services.base import Service
from portfwd.specs import MapSpec
from portfwd.state import State


class Maps(Service):
    """Runs the lease keeper. Its failures are per mapping and retried, so start reports none."""

    name = "maps"

    def __init__(self, maps: tuple[MapSpec, ...], state: State) -> None:
        self.maps = maps
        self.state = state
        self._keeper: Keeper | None = None

    @property
    def active(self) -> bool:
        return self._keeper is not None

    async def start(self) -> list[PortfwdError]:
        self._keeper = Keeper(self.maps, self.state.mappings)
        await self._keeper.start()
        return []

    async def stop(self) -> None:
        if self._keeper is not None:
            await self._keeper.stop()
            self._keeper = None
