"""Opening the connection to a forward's target: resolve at connect time, never block the loop.

Host names are resolved for every new client (a DNS change takes effect at once); IP literals
skip the resolver. Every failure becomes an UpstreamError with a short `reason` label that the
metrics count and the log line shows. A transparent rule's connections leave from the client's
own address (IP_TRANSPARENT; the routing it needs is checked by relay/transparent.py).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

from portfwd.errors import UpstreamError
from portfwd.relay.listener import keepalive

Addresses = list[tuple[int, Any]]  # (family, sockaddr): ("10.0.0.5", 80) or "/run/app.sock"
ConnectDone = Callable[[socket.socket | None, UpstreamError | None], None]

_REASONS = {
    errno.ECONNREFUSED: "refused",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.ETIMEDOUT: "timeout",
    errno.ENOENT: "refused",
}


_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
# Linux values; Python 3.11's socket module has no IPV6_TRANSPARENT.
_IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
_IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def _literal(host: str, port: int) -> Addresses | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return [(family, (host, port))]


def describe_error(exc: OSError) -> UpstreamError:
    """An OSError from connecting as an UpstreamError: words for people, a reason for counters."""
    if isinstance(exc, socket.gaierror):
        return UpstreamError(f"cannot resolve: {exc.strerror}", reason="resolve")
    return UpstreamError(_words(exc), reason=_REASONS.get(exc.errno or 0, "error"))


def client_source(addresses: Addresses, source: str) -> tuple[Addresses, str, UpstreamError | None]:
    """The targets a transparent connect may try from client address `source`, and the address
    to bind: an IPv4-mapped IPv6 client ("::ffff:10.1.0.2", from a dual-stack listener) leaves
    as IPv4. A connection cannot leave from an address of the other family, so targets of that
    family are dropped; when none is left, the error says why (reason "transparent").
    """
    if ":" not in source:
        family, bind = socket.AF_INET, source
    elif source[:7].lower() == "::ffff:" and "." in source:
        family, bind = socket.AF_INET, source[7:]
    else:
        family, bind = socket.AF_INET6, source
    usable = [address for address in addresses if address[0] == family]
    if usable or not addresses:
        return usable, bind, None
    client, target = ("IPv4", "IPv6") if family == socket.AF_INET else ("IPv6", "IPv4")
    error = UpstreamError(
        f"transparent: the client {source} is {client} but the target is {target}; a connection "
        f"cannot leave from an {client} address for an {target} one",
        reason="transparent",
    )
    return usable, bind, error


def bind_to_client(upstream: socket.socket, family: int, source: str) -> None:
    """Make `upstream` leave from the client's address `source` (port chosen at connect time).

    Raises UpstreamError(reason="transparent"): no privilege (EPERM), or the bind failed.
    """
    try:
        if family == socket.AF_INET6:
            upstream.setsockopt(socket.IPPROTO_IPV6, _IPV6_TRANSPARENT, 1)
        else:
            upstream.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise UpstreamError(
                "transparent: leaving from the client's address needs root or CAP_NET_ADMIN "
                "(IP_TRANSPARENT: operation not permitted)",
                reason="transparent",
            ) from exc
        raise UpstreamError(f"transparent: IP_TRANSPARENT: {_words(exc)}", reason="transparent") from exc
    try:
        # Without this, bind() would pick the port from the client address alone, so at most
        # ~28000 connections per client address to all targets together; at connect() the
        # kernel picks one per (client, target) pair.
        upstream.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        upstream.bind((source, 0))
    except OSError as exc:
        raise UpstreamError(
            f"transparent: cannot bind the client's address {source}: {_words(exc)}", reason="transparent"
        ) from exc


def _words(exc: OSError) -> str:
    words = exc.strerror or str(exc) or type(exc).__name__
    return words[:1].lower() + words[1:]


def stream_options(conn: socket.socket, family: int) -> None:
    """Set TCP_NODELAY on a TCP socket (no-op for Unix sockets): relays must not add latency."""
    if family != socket.AF_UNIX:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def resolve(host: str, port: int, kind: socket.SocketKind) -> Addresses:
    """Resolve `host` to (family, sockaddr) pairs without blocking the loop.

    Raises UpstreamError(reason="resolve") when the name does not resolve.
    """
    literal = _literal(host, port)
    if literal is not None:
        return literal
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=kind)
    except socket.gaierror as exc:
        raise UpstreamError(f"cannot resolve {host!r}: {exc.strerror}", reason="resolve") from exc
    return [(family, sockaddr[:2]) for family, _, _, _, sockaddr in infos]


def literal_addresses(target: tuple[str, int] | str) -> Addresses | None:
    """Addresses for a target that needs no resolver (an IP literal or a Unix path), else None."""
    if isinstance(target, str):
        return [(socket.AF_UNIX, target)]
    return _literal(target[0], target[1])


class Connect:
    """A callback-driven connect: tries `addresses` in order within `timeout` seconds.

    This is the per-client fast path, so it uses no Task and no Future: a non-blocking
    connect(), a writer callback, and a timer. `done(sock, None)` or `done(None, error)` is
    called exactly once, unless `cancel()` came first; when the answer is known at once (see
    `_next`), it is called before the constructor returns.

    With `held` (a list), a first connect() still in progress is not asked again at once: the
    Connect adds itself to `held`, and its owner calls `confirm()` once every client of the
    burst has begun its connect (see TcpForwarder.serve).

    With `source` (a client's IP address as text), every upstream socket leaves from that
    address (transparent mode, see `bind_to_client`); only targets of its family are tried.
    """

    __slots__ = (
        "_addresses", "_bind", "_done", "_family", "_held", "_index", "_keepalive", "_last", "_loop",
        "_pending", "_sockaddr", "_timeout", "_timer", "_waiting",
    )  # fmt: skip

    def __init__(
        self,
        addresses: Addresses,
        timeout: float,
        done: ConnectDone,
        held: list[Connect] | None = None,
        *,
        tcp_keepalive: bool = True,
        source: str | None = None,
    ) -> None:
        self._keepalive = tcp_keepalive
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up only to wait (a getpid() each time)
        self._addresses = addresses
        self._done: ConnectDone | None = done
        self._index = 0
        self._last: OSError | None = None
        self._pending: socket.socket | None = None  # waiting for the writer callback
        self._held = held
        self._waiting: socket.socket | None = None  # waiting for confirm()
        self._sockaddr: Any = None
        self._family = 0
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None  # armed at the first wait (a loop timer costs)
        self._bind: str | None = None  # transparent: the client's address, of the targets' family
        if source is not None:
            self._addresses, self._bind, refused = client_source(addresses, source)
            if refused is not None:
                self._finish(None, refused)
                return
        self._next()

    def _next(self) -> None:
        while self._index < len(self._addresses):
            family, sockaddr = self._addresses[self._index]
            self._index += 1
            try:
                # On Linux made non-blocking by the kernel: no ioctl(FIONBIO) afterwards.
                upstream = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
            except OSError as exc:  # EMFILE/ENFILE: out of descriptors; this client fails
                words = (exc.strerror or str(exc)).lower()
                self._finish(None, UpstreamError(f"cannot open a socket: {words}", reason="resources"))
                return
            if not _NONBLOCK:
                upstream.setblocking(False)
            if self._keepalive and family != socket.AF_UNIX:
                try:
                    keepalive(upstream)
                except OSError as exc:
                    upstream.close()
                    self._last = exc
                    continue
            if self._bind is not None:
                try:
                    bind_to_client(upstream, family, self._bind)
                except UpstreamError as exc:  # the same for every target: no use trying the next
                    upstream.close()
                    self._finish(None, exc)
                    return
            code = upstream.connect_ex(sockaddr)
            if code == errno.EINPROGRESS:
                held, self._held = self._held, None
                if held is not None:
                    self._waiting, self._sockaddr, self._family = upstream, sockaddr, family
                    held.append(self)
                    return
                code = self._again(upstream, sockaddr)
            if self._went(upstream, family, code):
                return
        if self._last is None:
            self._finish(None, UpstreamError("the target resolved to no address", reason="resolve"))
        else:
            self._finish(None, describe_error(self._last))

    @staticmethod
    def _again(upstream: socket.socket, sockaddr: Any) -> int:
        """Ask a connect() in progress how it went, without waiting.

        To loopback (and to this host's own addresses) the handshake is over by the time
        connect() returns; asking again says so (EISCONN) or gives the refusal, without a writer
        callback and a trip through the loop. Elsewhere it says EALREADY: still under way.
        """
        code = upstream.connect_ex(sockaddr)
        return 0 if code == errno.EISCONN else code

    def _went(self, upstream: socket.socket, family: int, code: int) -> bool:
        """Act on connect()'s answer: True when done or waiting, False to try the next address."""
        if code == 0:
            self._connected(upstream, family)
            return True
        if code in (errno.EINPROGRESS, errno.EALREADY):
            self._pending = upstream
            self._family = family
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.add_writer(upstream.fileno(), self._writable)
            if self._timer is None:
                self._timer = loop.call_later(self._timeout, self._expired, self._timeout)
            return True
        upstream.close()
        self._last = OSError(code, os.strerror(code))
        return False

    def confirm(self) -> None:
        """Go on with a connect that was held (see the class docstring)."""
        upstream, self._waiting = self._waiting, None
        if upstream is None:
            return
        if self._done is None:  # cancelled meanwhile
            upstream.close()
            return
        if not self._went(upstream, self._family, self._again(upstream, self._sockaddr)):
            self._next()

    def _writable(self) -> None:
        upstream = self._pending
        if upstream is None:
            return
        self._pending = None
        assert self._loop is not None  # set when the wait began
        self._loop.remove_writer(upstream.fileno())
        code = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            upstream.close()
            self._last = OSError(code, os.strerror(code))
            self._next()
            return
        self._connected(upstream, self._family)

    def _connected(self, upstream: socket.socket, family: int) -> None:
        try:
            stream_options(upstream, family)
        except OSError as exc:
            upstream.close()
            self._finish(None, describe_error(exc))
            return
        self._finish(upstream, None)

    def _expired(self, timeout: float) -> None:
        self._drop_pending()
        self._finish(None, UpstreamError(f"no answer within {timeout:g}s", reason="timeout"))

    def _drop_pending(self) -> None:
        if self._pending is not None:
            assert self._loop is not None  # set when the wait began
            self._loop.remove_writer(self._pending.fileno())
            self._pending.close()
            self._pending = None

    def _finish(self, upstream: socket.socket | None, error: UpstreamError | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        done, self._done = self._done, None
        if done is not None:
            done(upstream, error)
        elif upstream is not None:
            upstream.close()

    def cancel(self) -> None:
        """Abandon the attempt; `done` will not be called."""
        self._done = None
        if self._timer is not None:
            self._timer.cancel()
        self._drop_pending()
        if self._waiting is not None:
            self._waiting.close()
            self._waiting = None
