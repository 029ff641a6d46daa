"""Who may connect, and where each client goes: allow/deny by CIDR and per-source routes. Pure.

Deny wins over allow; an empty allow list admits everyone. Routes are tried in order and the
first whose source contains the client wins; otherwise the rule's own target is used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from portfwd.addr import Endpoint

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip(host: str) -> IPAddress | None:
    """Parse a peer address as the kernel reports it; IPv4-mapped IPv6 becomes plain IPv4.

    Dual-stack listeners report IPv4 clients as `::ffff:a.b.c.d`; ACLs are written in IPv4,
    so the mapping is undone here. Returns None for text that is not an IP (Unix peers).
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _contains(networks: Sequence[Network], address: IPAddress) -> bool:
    return any(address.version == net.version and address in net for net in networks)


@dataclass(frozen=True, slots=True)
class Route:
    """A per-source target."""

    sources: tuple[Network, ...]
    target: Endpoint
    backend: int | None = None  #: the rule's backend of this index, while it is up


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """A rule's allow/deny lists and routes, compiled once per rule."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    routes: tuple[Route, ...] = ()

    @property
    def is_open(self) -> bool:
        """True when every client is admitted and goes to the default target (the fast path)."""
        return not self.allow and not self.deny and not self.routes

    def permits(self, address: IPAddress | None) -> bool:
        """True when a client may connect. Unknown addresses are admitted only with no lists."""
        if address is None:
            return not self.allow and not self.deny
        if _contains(self.deny, address):
            return False
        return not self.allow or _contains(self.allow, address)

    def route_for(self, address: IPAddress | None) -> Route | None:
        """The first route matching this client, if any."""
        if address is not None:
            for route in self.routes:
                if _contains(route.sources, address):
                    return route
        return None

    def target_for(self, address: IPAddress | None, default: Endpoint) -> Endpoint:
        """The target for this client: the first matching route's, else `default`."""
        if address is not None:
            for route in self.routes:
                if _contains(route.sources, address):
                    return route.target
        return default
