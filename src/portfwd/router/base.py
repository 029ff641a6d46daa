"""What every mapping method shares: the request, the grant, and where the router is.

The router for PCP and NAT-PMP is the default route's gateway, read from the kernel's routing
table (`/proc/net/route`), never guessed from the local address; the local address that
route leaves from is "this host" in every request, and the interface SSDP searches on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal, NamedTuple, Protocol, TypeVar

from portfwd.errors import RouterError
from portfwd.proto.natpmp import Epoch, NatPmpReplyError
from portfwd.proto.pcp import PcpReplyError

T = TypeVar("T")

MethodName = Literal["pcp", "natpmp", "upnp"]
METHODS: tuple[MethodName, ...] = ("pcp", "natpmp", "upnp")
TransportName = Literal["tcp", "udp"]

#: Mappings portfwd makes carry this description (UPnP), so `map list` can mark them.
DESCRIPTION = "portfwd"

#: One-shot commands (`map add|ip|remove|list`) give up after this long in all, `--timeout`.
#: A router on the LAN answers in about a millisecond; RFC 6886's schedule (128 s for NAT-PMP)
#: and RFC 6887's (no end; 45 s for portfwd's 4 PCP tries) are for daemons that keep trying.
#: 10 s still holds 6 NAT-PMP sends (5 lost datagrams in a row), 3 PCP sends (IRT 3 s), and
#: `auto`'s whole probe: PCP once (3 s), NAT-PMP twice (0.75 s), UPnP's SSDP search (3 s).
DEFAULT_TIMEOUT = 10.0
#: A one-shot command says what it is waiting for once it has waited this long.
NOTICE_AFTER = 1.0


class MapRequest(NamedTuple):
    """One port to publish: `internal_port` on this host, `external_port` on the router (0 = any)."""

    protocol: TransportName
    internal_port: int
    external_port: int
    lifetime: int
    internal_host: str | None = None  #: another LAN host (UPnP only); None = this host

    @property
    def label(self) -> str:
        return f"{self.internal_port}/{self.protocol}"


class Granted(NamedTuple):
    """What the router actually granted, which may differ from what was asked."""

    method: MethodName
    protocol: TransportName
    internal_host: str
    internal_port: int
    external_host: str
    external_port: int
    lifetime: int  #: seconds granted; 0 = permanent (UPnP), which portfwd must delete itself
    epoch: int | None = None
    nonce: bytes = b""

    @property
    def public(self) -> str:
        return f"{self.external_host}:{self.external_port}"


class RouterEntry(NamedTuple):
    """One line of `portfwd map list`: the router's UPnP table, and what portfwd made by PCP/NAT-PMP."""

    protocol: str
    external_port: int
    internal_host: str
    internal_port: int
    description: str
    lease: int  #: seconds left; 0 = permanent
    enabled: bool = True
    method: str = ""  #: how portfwd made it; "" = not portfwd's (as far as portfwd knows)

    @property
    def ours(self) -> bool:
        return bool(self.method) or self.description.startswith(DESCRIPTION)


class Method(Protocol):
    """A way to talk to the router; `router/natpmp.py`, `pcp.py` and `upnp.py` implement it."""

    name: MethodName
    where: str  #: the router endpoint, for messages
    route: Route

    async def external_address(self) -> str: ...

    async def add(self, request: MapRequest) -> Granted: ...

    async def refresh(self, request: MapRequest, granted: Granted) -> tuple[Granted, bool]:
        """Renew `granted`; the bool says the router had lost it (rebooted) and it was re-made."""
        ...

    async def remove(self, request: MapRequest, granted: Granted | None) -> None: ...

    async def entries(self) -> list[RouterEntry]: ...

    async def close(self) -> None: ...


class Exchange(Protocol):
    """Sends one request to the router until an answer parses (PCP and NAT-PMP).

    Two implementations share `Retransmission`: `router/udp.py` on the event loop, for
    `portfwd run`, and `router/blocking.py` for one-shot commands, which must not pay for
    importing asyncio (bench/RESULTS.md, D16).
    """

    def __call__(
        self,
        where: tuple[str, int],
        request: bytes,
        parse: Callable[[bytes], T],
        schedule: Iterator[float],
        *,
        label: str,
        source: str | None = None,
    ) -> Awaitable[T]: ...


def doubling(first: float, count: int, cap: float = 1024.0, jitter: float = 0.0) -> Iterator[float]:
    """Waits between tries: `first`, doubling up to `cap`, `count` of them, with ± `jitter`."""
    wait = first
    for _ in range(count):
        yield wait * (1 + random.uniform(-jitter, jitter)) if jitter else wait
        wait = min(wait * 2, cap)


class Retransmission:
    """An exchange's decisions without its I/O: which datagram answers, and what each failure says.

    `parse` raises for datagrams that are not our answer; a stray one is skipped, but an error
    that carries the router's result code (`result` attribute not None) is the answer.
    """

    def __init__(self, where: tuple[str, int], label: str) -> None:
        self.where = where
        self.label = label
        self.last: Exception | None = None

    def received(self, parse: Callable[[bytes], T], data: bytes) -> tuple[T] | None:
        """`(answer,)`, or None for a stray datagram; raises the router's own refusal."""
        try:
            return (parse(data),)
        except (NatPmpReplyError, PcpReplyError) as exc:
            if exc.result is not None:
                raise
            self.last = exc
            return None

    def cannot_reach(self, exc: OSError) -> RouterError:
        """No socket towards the router (no route, address not ours)."""
        return RouterError(
            f"{self.label}: cannot reach {self.where[0]}:{self.where[1]}: {exc.strerror}",
            reason="unreachable",
        )

    def failed(self, exc: OSError) -> RouterError:
        """An ICMP error came back: "port unreachable" means the router does not speak this."""
        if isinstance(exc, ConnectionRefusedError):
            return RouterError(
                f"{self.label}: {self.where[0]}:{self.where[1]} refused (no {self.label} service there)",
                reason="unsupported",
            )
        return RouterError(
            f"{self.label}: {self.where[0]}:{self.where[1]}: {exc.strerror or exc}", reason="unreachable"
        )

    def silent(self, waited: float) -> RouterError:
        """Every try went unanswered, for `waited` seconds in all."""
        detail = f"; last datagram: {self.last}" if self.last else ""
        return RouterError(
            f"{self.label}: no answer from {self.where[0]}:{self.where[1]} in {seconds(waited)} s{detail}",
            reason="unreachable",
        )


def seconds(value: float) -> str:
    """A time for people: `0.8`, `3`, `45` (tenths below 10 s, whole seconds above)."""
    return f"{value:.1f}".removesuffix(".0") if value < 10 else str(round(value))


class Deadline:
    """A one-shot command's time budget (`--timeout`) and the line that says what it waits for.

    The exchanges and `oneshot.py` ask it how long they may still wait; when the budget is
    spent they raise `expired()` (reason `timeout`, which `auto` does not move on from: the time
    is up for every method). `notice`, when given, receives a sentence saying what is asked of
    whom once a method has waited `after` seconds for its answer (once per method: a router
    that answers at once is never mentioned).
    """

    def __init__(
        self,
        budget: float,
        notice: Callable[[str], None] | None = None,
        *,
        after: float = NOTICE_AFTER,
    ) -> None:
        self.budget = budget
        self.start = time.monotonic()
        self.end = self.start + budget
        self._notice = notice
        self._after = after
        self._told: set[str] = set()
        self._began: dict[str, float] = {}
        self.tried: list[tuple[str, str]] = []  #: (method label, where), in the order asked
        self.router = "the router"  #: its address, once the route is known

    def left(self) -> float:
        """Seconds still to spend (0 when spent)."""
        return max(0.0, self.end - time.monotonic())

    def asking(self, label: str, where: str) -> None:
        """A method starts asking the router at `where`."""
        self._began.setdefault(label, time.monotonic())
        if (label, where) not in self.tried:
            self.tried.append((label, where))

    def waiting(self, label: str, host: str) -> float:
        """Say what is waited for when the time has come; seconds until then (inf once said)."""
        if self._notice is None or label in self._told:
            return math.inf
        due = self._began.get(label, self.start) + self._after - time.monotonic()
        if due > 0:
            return due
        self._told.add(label)
        self._notice(f"asking {host} by {label} (no answer yet; giving up in {round(self.left())} s)")
        return math.inf

    def expired(self) -> RouterError:
        """The budget is spent: the method(s), the router and the time, in one line."""
        spent = seconds(self.budget)
        if len(self.tried) == 1:
            label, where = self.tried[0]
            text = f"{label}: no answer from {where} in {spent} s"
        else:
            labels = [label for label, _ in self.tried]
            text = f"no answer from the router at {self.router} in {spent} s"
            if labels:
                asked = labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} and {labels[-1]}"
                text += f" (asked by {asked})"
        return RouterError(text, reason="timeout", hint="give it longer with --timeout")


class UdpMethod:
    """What the PCP and NAT-PMP drivers share: the router at `route.gateway`, a budget of tries
    (the RFC's whole schedule unless capped), the epoch that shows a router restart, and no way
    to list the router's mappings. Subclasses set the class attributes."""

    name: MethodName
    label: str  #: the protocol's name in messages
    port: int  #: where the router listens
    retry_count: int  #: tries on the RFC's whole schedule

    def __init__(self, route: Route, exchange: Exchange, *, tries: int | None = None) -> None:
        self.route = route
        self._exchange = exchange
        self.where = f"{route.gateway}:{self.port}"
        self._tries = tries or self.retry_count
        self._epoch = Epoch()  # RFC 6887 §8.5 uses NAT-PMP's rule for PCP too
        self.reset = False  #: the last reply showed the router had restarted

    async def entries(self) -> list[RouterEntry]:
        raise RouterError(
            f"{self.label} cannot list a router's mappings", reason="unsupported", hint="use --method upnp"
        )

    def full_schedule(self) -> None:
        """After `auto` picked this method: retransmit on the RFC's whole schedule from now on."""
        self._tries = self.retry_count

    async def close(self) -> None:
        return None


def own_host_only(label: str, route: Route, request: MapRequest) -> None:
    """NAT-PMP, and PCP without THIRD_PARTY, map only the asking host's ports: refuse another."""
    if request.internal_host not in (None, str(route.local)):
        raise RouterError(
            f"{label} maps only this host's ports ({route.local}), not {request.internal_host}",
            reason="unsupported",
            hint="use --method upnp to map a port for another host",
        )


def port_taken(label: str, request: MapRequest, offered: int) -> RouterError:
    """A fixed external port was asked for and the router offered another one instead."""
    return RouterError(
        f"{label}: external port {request.external_port}/{request.protocol} is taken "
        f"(the router offered {offered})",
        reason="conflict",
        hint='pick another external port, or use external_port = "any"',
    )


class Route(NamedTuple):
    """The default route: the router's address and ours on that link."""

    gateway: ipaddress.IPv4Address
    interface: str
    local: ipaddress.IPv4Address


def default_route(table: str = "/proc/net/route") -> Route:
    """The IPv4 default route from the kernel's table; RouterError if there is none."""
    try:
        with open(table, encoding="ascii") as f:
            lines = f.read().splitlines()[1:]
    except OSError as exc:
        raise RouterError(
            f"cannot read the routing table {table}: {exc.strerror}", reason="unreachable"
        ) from exc
    best: tuple[int, str, ipaddress.IPv4Address] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, destination, gateway, flags, metric, mask = (
            fields[0], fields[1], fields[2], int(fields[3], 16), int(fields[6]), fields[7],
        )  # fmt: skip
        up_gateway = 0x1 | 0x2
        if destination != "00000000" or mask != "00000000" or flags & up_gateway != up_gateway:
            continue
        address = ipaddress.IPv4Address(struct.pack("<I", int(gateway, 16)))
        if best is None or metric < best[0]:
            best = (metric, iface, address)
    if best is None:
        raise RouterError(
            "no IPv4 default route, so no router to ask",
            reason="unreachable",
            hint="connect to a network, or give the router with --gateway",
        )
    return Route(best[2], best[1], local_address_towards(best[2]))


def route_via(gateway: str) -> Route:
    """A Route for an explicitly given router address."""
    try:
        address = ipaddress.IPv4Address(gateway)
    except ValueError as exc:
        raise RouterError(f"gateway {gateway!r} is not an IPv4 address", reason="unreachable") from exc
    return Route(address, "", local_address_towards(address))


def local_address_towards(gateway: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
    """The source address the kernel picks for packets to `gateway` (a connect, no packet sent)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect((str(gateway), 9))
        return ipaddress.IPv4Address(sock.getsockname()[0])
    except OSError as exc:
        raise RouterError(f"no route to the router {gateway}: {exc.strerror}", reason="unreachable") from exc
    finally:
        with contextlib.suppress(OSError):
            sock.close()
