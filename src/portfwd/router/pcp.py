"""PCP (RFC 6887) driver: the codec in `proto/pcp.py` over UDP to the default gateway.

The router binds each mapping to the nonce that made it; renewing or deleting needs the same
one. portfwd derives it from a secret key kept in its state directory (HMAC of the mapping's
protocol and port), so `portfwd map remove` in a later process, or `portfwd run` after a crash,
can still renew or delete what an earlier one made, and nobody else can guess it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import time

from portfwd.errors import RouterError
from portfwd.proto import pcp
from portfwd.router.base import (
    Granted,
    MapRequest,
    MethodName,
    UdpMethod,
    doubling,
    own_host_only,
    port_taken,
)
from portfwd.statedir import state_dir


def nonce_key() -> bytes:
    """The secret behind every PCP nonce; created (0600) on first use."""
    path = os.path.join(state_dir(), "pcp-nonce.key")
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        key = f.read()
        if len(key) == 32:
            return key
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        key = os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key
    except OSError as exc:
        raise RouterError(
            f"cannot keep the PCP nonce key in {path}: {exc.strerror}",
            reason="unsupported",
            hint="set PORTFWD_STATE_DIR to a writable directory",
        ) from exc


class Pcp(UdpMethod):
    """Talks PCP MAP to `route.gateway`."""

    name: MethodName = "pcp"
    label = "PCP"
    port = pcp.PORT
    retry_count = pcp.RETRY_COUNT

    def nonce(self, request: MapRequest) -> bytes:
        message = f"{self.route.gateway}/{request.protocol}/{request.internal_port}".encode()
        return hmac.new(nonce_key(), message, hashlib.sha256).digest()[: pcp.NONCE]

    async def _map(self, request: MapRequest, external_port: int, lifetime: int) -> pcp.MapReply:
        own_host_only("PCP here", self.route, request)
        datagram = pcp.map_request(
            nonce=self.nonce(request),
            protocol=request.protocol,
            internal_port=request.internal_port,
            external_port=external_port,
            lifetime=lifetime,
            client=self.route.local,
        )
        try:
            reply = await self._exchange(
                (str(self.route.gateway), pcp.PORT),
                datagram,
                lambda data: pcp.parse_reply(data, datagram),
                doubling(pcp.RETRY_FIRST, self._tries, pcp.RETRY_MAX, jitter=0.1),
                label="PCP",
                source=str(self.route.local),
            )
        except pcp.PcpReplyError as exc:
            raise self._error(exc, request, external_port) from exc
        self.reset = self._epoch.observe(reply.epoch, time.monotonic())
        return reply

    def _error(self, exc: pcp.PcpReplyError, request: MapRequest, external_port: int) -> RouterError:
        if exc.result == pcp.CANNOT_PROVIDE_EXTERNAL and external_port:
            return RouterError(
                f"PCP at {self.where}: external port {external_port}/{request.protocol} is taken "
                "(CANNOT_PROVIDE_EXTERNAL)",
                reason="conflict",
                hint='pick another external port, or use external_port = "any"',
            )
        reason = {
            pcp.UNSUPP_VERSION: "unsupported",
            pcp.NOT_AUTHORIZED: "refused",
            4: "unsupported",
        }.get(exc.result or 0, "bad-reply" if exc.result is None else "refused")
        return RouterError(f"PCP at {self.where}: {exc.message}", reason=reason)

    async def external_address(self) -> str:
        # PCP has no "what is my address" opcode. RFC 6887 §11.6 suggests a short-lived mapping,
        # which answers it; it is deleted right away. A high port keeps clear of router policies
        # that only allow 1024-65535.
        probe = MapRequest("udp", 49152 + int.from_bytes(os.urandom(2), "big") % 16384, 0, 30)
        reply = await self._map(probe, 0, 30)
        with contextlib.suppress(RouterError):
            await self._map(probe, 0, 0)
        return str(reply.external_address)

    async def add(self, request: MapRequest) -> Granted:
        reply = await self._map(request, request.external_port, request.lifetime)
        if request.external_port and reply.external_port != request.external_port:
            with contextlib.suppress(RouterError):
                await self._map(request, 0, 0)
            raise port_taken(f"PCP at {self.where}", request, reply.external_port)
        return Granted(
            "pcp",
            request.protocol,
            str(self.route.local),
            reply.internal_port,
            str(reply.external_address),
            reply.external_port,
            reply.lifetime,
            epoch=reply.epoch,
            nonce=reply.nonce,
        )

    async def refresh(self, request: MapRequest, granted: Granted) -> tuple[Granted, bool]:
        """Renewal is the same MAP with the same nonce, asking for the port already granted."""
        renewed = await self.add(
            MapRequest(request.protocol, request.internal_port, granted.external_port, request.lifetime)
        )
        return renewed, self.reset

    async def remove(self, request: MapRequest, granted: Granted | None) -> None:
        await self._map(request, 0, 0)
