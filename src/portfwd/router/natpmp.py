"""NAT-PMP (RFC 6886) driver: the codec in `proto/natpmp.py` over UDP to the default gateway."""

from __future__ import annotations

import time

from portfwd.errors import RouterError
from portfwd.proto import natpmp
from portfwd.router.base import (
    Exchange,
    Granted,
    MapRequest,
    MethodName,
    Route,
    UdpMethod,
    doubling,
    own_host_only,
    port_taken,
)


class NatPmp(UdpMethod):
    """Talks NAT-PMP to `route.gateway`; remembers the epoch to notice a router restart."""

    name: MethodName = "natpmp"
    label = "NAT-PMP"
    port = natpmp.PORT
    retry_count = natpmp.RETRY_COUNT

    def __init__(self, route: Route, exchange: Exchange, *, tries: int | None = None) -> None:
        super().__init__(route, exchange, tries=tries)
        self._address: str | None = None

    async def _ask(self, request: bytes) -> natpmp.ExternalAddress | natpmp.Mapping:
        try:
            reply = await self._exchange(
                (str(self.route.gateway), natpmp.PORT),
                request,
                lambda data: natpmp.parse_reply(data, request),
                doubling(natpmp.RETRY_FIRST, self._tries),
                label="NAT-PMP",
                source=str(self.route.local),
            )
        except natpmp.NatPmpReplyError as exc:
            reason = {1: "unsupported", 2: "refused", 5: "unsupported"}.get(exc.result or 0, "bad-reply")
            raise RouterError(f"NAT-PMP at {self.where}: {exc.message}", reason=reason) from exc
        self.reset = self._epoch.observe(reply.epoch, time.monotonic())
        return reply

    async def external_address(self) -> str:
        reply = await self._ask(natpmp.external_address_request())
        assert isinstance(reply, natpmp.ExternalAddress)
        self._address = str(reply.address)
        return self._address

    async def add(self, request: MapRequest) -> Granted:
        own_host_only("NAT-PMP", self.route, request)
        address = self._address or await self.external_address()
        reply = await self._ask(
            natpmp.map_request(
                request.protocol, request.internal_port, request.external_port, request.lifetime
            )
        )
        assert isinstance(reply, natpmp.Mapping)
        if request.external_port and reply.external_port != request.external_port:
            # NAT-PMP cannot say "that port is taken"; it offers another. A fixed port was asked.
            await self._delete(request)
            raise port_taken(f"NAT-PMP at {self.where}", request, reply.external_port)
        return Granted(
            "natpmp",
            request.protocol,
            str(self.route.local),
            reply.internal_port,
            address,
            reply.external_port,
            reply.lifetime,
            epoch=reply.epoch,
        )

    async def refresh(self, request: MapRequest, granted: Granted) -> tuple[Granted, bool]:
        """Ask for the external address (epoch check), then renew with the granted port."""
        await self.external_address()
        lost = self.reset
        renewed = await self.add(
            MapRequest(request.protocol, request.internal_port, granted.external_port, request.lifetime)
        )
        return renewed, lost

    async def remove(self, request: MapRequest, granted: Granted | None) -> None:
        await self._delete(request)

    async def _delete(self, request: MapRequest) -> None:
        # RFC 6886 §3.4: lifetime 0 and suggested external port 0 delete the mapping.
        await self._ask(natpmp.map_request(request.protocol, request.internal_port, 0, 0))
