"""UPnP IGD v1/v2 driver over `async-upnp-client`: discovery, description, SOAP actions.

The library's `IgdDevice` profile is not used for mappings: it silently returns when a device
lacks an action and sends `timedelta.seconds` as the lease (a lease of a day or more wraps to
0, i.e. permanent). portfwd calls the WANIPConnection / WANPPPConnection actions itself, so
every router answer, error code included, reaches this module and becomes one line.

SSDP goes out from the address of the default route's interface (the library sets
IP_MULTICAST_IF from it), and stops at the first Internet Gateway Device that answers; a
description URL in the config (`upnp_url`) skips discovery altogether.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
from collections.abc import Mapping
from typing import Any

import aiohttp
from async_upnp_client.aiohttp import AiohttpSessionRequester
from async_upnp_client.client import UpnpDevice, UpnpService
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import UpnpActionError, UpnpError
from async_upnp_client.search import SsdpSearchListener
from async_upnp_client.utils import CaseInsensitiveDict

from portfwd.errors import RouterError
from portfwd.router.base import DESCRIPTION, Granted, MapRequest, MethodName, Route, RouterEntry

SEARCH_TARGETS = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
)
SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)

#: The UPnP error codes a router gives for mappings (IGD v2 WANIPConnection §2.4), in words.
ERRORS = {
    402: "Invalid Args",
    501: "Action Failed (the router could not make the mapping)",
    606: "Action not authorized (the router's policy refuses this mapping)",
    713: "SpecifiedArrayIndexInvalid",
    714: "NoSuchEntryInArray (no such mapping)",
    715: "WildCardNotPermittedInSrcIP",
    716: "WildCardNotPermittedInExtPort",
    718: "ConflictInMappingEntry",
    724: "SamePortValuesRequired (this router maps only to the same port number)",
    725: "OnlyPermanentLeasesSupported",
    726: "RemoteHostOnlySupportsWildcard",
    727: "ExternalPortOnlySupportsWildcard",
    728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms",
}

DISCOVERY_SECONDS = 3


async def discover(local: str, wait: float = DISCOVERY_SECONDS) -> str:
    """The description URL of the first IGD that answers an M-SEARCH sent from `local`."""
    found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_response(headers: CaseInsensitiveDict) -> None:
        location = headers.get_lower("location")
        if location and not found.done():
            found.set_result(str(location))

    listeners = []
    try:
        for target in SEARCH_TARGETS:
            listener = SsdpSearchListener(
                async_callback=on_response,
                source=(local, 0),
                timeout=max(1, int(wait)),
                search_target=target,
            )
            await listener.async_start()
            listeners.append(listener)
            listener.async_search()
        return await asyncio.wait_for(found, wait)
    except TimeoutError:
        raise RouterError(
            f"UPnP: no Internet Gateway Device answered an SSDP search from {local} in {wait:g} s",
            reason="unreachable",
            hint="switch UPnP on in the router, or give its description URL with upnp_url",
        ) from None
    except OSError as exc:
        raise RouterError(f"UPnP: cannot search from {local}: {exc.strerror}", reason="unreachable") from exc
    finally:
        for listener in listeners:
            listener.async_stop()


class Upnp:
    """One Internet Gateway Device's WAN connection service."""

    name: MethodName = "upnp"

    def __init__(self, route: Route, url: str | None = None, *, timeout: float = 5) -> None:
        self.route = route
        self.url = url
        self.where = url or "UPnP discovery"
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._service: UpnpService | None = None

    async def _connection(self) -> UpnpService:
        if self._service is not None:
            return self._service
        url = self.url or await discover(str(self.route.local))
        self.url = self.where = url
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        factory = UpnpFactory(AiohttpSessionRequester(self._session), non_strict=True)
        try:
            device = await factory.async_create_device(url)
        except (UpnpError, aiohttp.ClientError, ValueError, TimeoutError) as exc:
            raise RouterError(
                f"UPnP: cannot read the device description at {url}: {_describe(exc)}", reason="bad-reply"
            ) from exc
        self._service = _wan_service(device)
        if self._service is None:
            raise RouterError(
                f"UPnP: the device at {url} has no WANIPConnection or WANPPPConnection service",
                reason="unsupported",
            )
        return self._service

    async def _call(self, action: str, **args: Any) -> Mapping[str, Any]:
        service = await self._connection()
        if not service.has_action(action):
            raise RouterError(
                f"UPnP: the router at {self.where} has no {action} action", reason="unsupported"
            )
        try:
            return await service.action(action).async_call(**args)
        except UpnpActionError as exc:
            raise _ActionFailed(exc.error_code or 0, exc.error_desc or "") from exc
        except (UpnpError, aiohttp.ClientError, ValueError, TimeoutError) as exc:
            raise RouterError(f"UPnP {action} at {self.where}: {_describe(exc)}", reason="bad-reply") from exc

    def _fail(self, action: str, failed: _ActionFailed, request: MapRequest | None = None) -> RouterError:
        words = ERRORS.get(failed.code) or failed.desc or "unknown error"
        text = f"router refused: UPnP {action} error {failed.code}, {words}"
        if failed.code == 718 and request is not None:
            port = f"{request.external_port}/{request.protocol}"
            if request.internal_host and request.internal_host != str(self.route.local):
                return RouterError(
                    f"{text}: external port {port} is taken, or the router's secure mode lets a host "
                    f"map ports only to itself (asked for {request.internal_host})",
                    reason="conflict",
                )
            return RouterError(
                f"{text}: external port {port} is already mapped",
                reason="conflict",
                hint='pick another external port, or use external_port = "any"',
            )
        reason = "refused" if failed.code in (606, 501, 728, 729) else "bad-reply"
        return RouterError(text, reason=reason)

    async def external_address(self) -> str:
        try:
            reply = await self._call("GetExternalIPAddress")
        except _ActionFailed as failed:
            raise self._fail("GetExternalIPAddress", failed) from None
        address = reply.get("NewExternalIPAddress")
        try:
            return str(ipaddress.ip_address(str(address)))
        except ValueError:
            raise RouterError(
                f"UPnP: the router at {self.where} reports external address {address!r}", reason="bad-reply"
            ) from None

    async def add(self, request: MapRequest) -> Granted:
        internal = request.internal_host or str(self.route.local)
        lifetime = request.lifetime
        permanent = False
        external = request.external_port
        service = await self._connection()
        candidates = [external] if external else [request.internal_port]
        if not external and not service.has_action("AddAnyPortMapping"):
            candidates += [random.randint(1024, 65535) for _ in range(8)]
        for index, port in enumerate(candidates):
            args = {
                "NewRemoteHost": "",
                "NewExternalPort": port,
                "NewProtocol": request.protocol.upper(),
                "NewInternalPort": request.internal_port,
                "NewInternalClient": internal,
                "NewEnabled": True,
                "NewPortMappingDescription": f"{DESCRIPTION} {request.label}",
                "NewLeaseDuration": lifetime,
            }
            action = (
                "AddAnyPortMapping"
                if not external and service.has_action("AddAnyPortMapping")
                else "AddPortMapping"
            )
            try:
                try:
                    reply = await self._call(action, **args)
                except _ActionFailed as failed:
                    if failed.code != 725 or lifetime == 0:
                        raise
                    # OnlyPermanentLeasesSupported: map for good, and delete it ourselves on exit.
                    permanent, lifetime = True, 0
                    reply = await self._call(action, **{**args, "NewLeaseDuration": 0})
            except _ActionFailed as failed:
                if failed.code == 718 and not external and index + 1 < len(candidates):
                    continue
                raise self._fail(
                    action,
                    failed,
                    MapRequest(
                        request.protocol, request.internal_port, port, request.lifetime, request.internal_host
                    ),
                ) from None
            if action == "AddAnyPortMapping":
                port = int(reply.get("NewReservedPort") or port)
            granted_lease = await self._granted_lease(request, port, internal)
            address = await self.external_address()
            return Granted(
                "upnp", request.protocol, internal, request.internal_port, address, port,
                0 if permanent else granted_lease,
            )  # fmt: skip
        raise RouterError("UPnP: no free external port", reason="conflict")  # pragma: no cover

    async def _granted_lease(self, request: MapRequest, port: int, internal: str) -> int:
        """Read the mapping back (GetSpecificPortMappingEntry): trust what the router holds."""
        entry = await self.entry(request.protocol, port)
        if entry is None:
            raise RouterError(
                f"UPnP: the router accepted {port}/{request.protocol} but does not list it",
                reason="bad-reply",
            )
        if entry.internal_host != internal or entry.internal_port != request.internal_port:
            raise RouterError(
                f"UPnP: the router maps {port}/{request.protocol} to "
                f"{entry.internal_host}:{entry.internal_port}, not {internal}:{request.internal_port}",
                reason="conflict",
            )
        return entry.lease

    async def entry(self, protocol: str, external_port: int) -> RouterEntry | None:
        """The router's entry for an external port, or None if it has none."""
        try:
            reply = await self._call(
                "GetSpecificPortMappingEntry",
                NewRemoteHost="",
                NewExternalPort=external_port,
                NewProtocol=protocol.upper(),
            )
        except _ActionFailed as failed:
            if failed.code in (714, 402, 501):
                return None
            raise self._fail("GetSpecificPortMappingEntry", failed) from None
        return _entry(reply, protocol, external_port)

    async def refresh(self, request: MapRequest, granted: Granted) -> tuple[Granted, bool]:
        """Look the mapping up; if the router lost it, make it again. Renew when leased."""
        entry = await self.entry(granted.protocol, granted.external_port)
        lost = entry is None
        if lost or granted.lifetime:
            renewed = await self.add(
                MapRequest(
                    request.protocol, request.internal_port, granted.external_port, request.lifetime,
                    request.internal_host,
                )
            )  # fmt: skip
            return renewed, lost
        return granted, False

    async def remove(self, request: MapRequest, granted: Granted | None) -> None:
        port = granted.external_port if granted else request.external_port or request.internal_port
        try:
            await self._call(
                "DeletePortMapping",
                NewRemoteHost="",
                NewExternalPort=port,
                NewProtocol=request.protocol.upper(),
            )
        except _ActionFailed as failed:
            raise self._fail("DeletePortMapping", failed) from None

    async def entries(self) -> list[RouterEntry]:
        found: list[RouterEntry] = []
        for index in range(1024):
            try:
                reply = await self._call("GetGenericPortMappingEntry", NewPortMappingIndex=index)
            except _ActionFailed as failed:
                if failed.code in (713, 714, 402, 501):
                    break
                raise self._fail("GetGenericPortMappingEntry", failed) from None
            protocol = str(reply.get("NewProtocol", "")).lower()
            found.append(_entry(reply, protocol, _int(reply.get("NewExternalPort"), "NewExternalPort")))
        return found

    async def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None
        self._service = None


class _ActionFailed(Exception):
    def __init__(self, code: int, desc: str) -> None:
        super().__init__(f"{code} {desc}")
        self.code = code
        self.desc = desc


def _wan_service(device: UpnpDevice) -> UpnpService | None:
    services = {service.service_type: service for service in device.all_services}
    for wanted in SERVICES:
        if wanted in services:
            return services[wanted]
    return None


def _int(value: object, name: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise RouterError(
            f"UPnP: the router sent {name} = {value!r}, not a number", reason="bad-reply"
        ) from None


def _entry(reply: Mapping[str, Any], protocol: str, external_port: int) -> RouterEntry:
    return RouterEntry(
        protocol=protocol,
        external_port=external_port,
        internal_host=str(reply.get("NewInternalClient", "")),
        internal_port=_int(reply.get("NewInternalPort"), "NewInternalPort"),
        description=str(reply.get("NewPortMappingDescription") or ""),
        lease=_int(reply.get("NewLeaseDuration") or 0, "NewLeaseDuration"),
        enabled=bool(reply.get("NewEnabled", True)),
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
