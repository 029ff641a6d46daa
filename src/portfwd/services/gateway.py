"""The nftables gateway ([gateway]) as a service: applied at start, removed at stop."""

from __future__ import annotations

import logging

from portfwd.errors import PortfwdError, RuntimeFailure
from portfwd.kernel import nft
from portfwd.kernel.gateway import GatewayService
from portfwd.services.base import Service
from portfwd.specs import GatewaySpec
from portfwd.state import State

log = logging.getLogger(__name__)


class Gateway(Service):
    """Runs the gateway; one that nft refuses is undone and reported, the rest keeps running."""

    name = "gateway"

    def __init__(self, spec: GatewaySpec, state: State) -> None:
        self.spec = spec
        self.state = state
        self._gateway: GatewayService | None = None

    @property
    def active(self) -> bool:
        return self._gateway is not None

    async def start(self) -> list[PortfwdError]:
        gateway = GatewayService(self.spec, self.state)
        try:
            await gateway.start()
        except nft.GatewayError as exc:
            await gateway.stop()  # a half-applied table is removed
            log.error("gateway: %s", exc.line())
            return [exc]
        except Exception as exc:  # noqa: BLE001 - anything else: still nothing of it left behind
            await gateway.stop()
            error = RuntimeFailure(f"gateway: could not start: {exc}")
            log.error("%s", error.line())
            return [error]
        self._gateway = gateway
        return []

    async def stop(self) -> None:
        if self._gateway is not None:
            await self._gateway.stop()
            self._gateway = None
