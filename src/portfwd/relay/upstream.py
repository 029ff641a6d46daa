"""Opening the connection to a forward's target: resolve at connect time, never block the loop.

Host names are resolved for every new client (a DNS change takes effect at once); IP literals
skip the resolver. Every failure becomes an UpstreamError with a short `reason` label that the
metrics count and the log line shows.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket

from portfwd.errors import UpstreamError

_REASONS = {
    errno.ECONNREFUSED: "refused",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.ETIMEDOUT: "timeout",
    errno.ENOENT: "refused",
}


def _literal(host: str, port: int) -> list[tuple[int, tuple[str, int]]] | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return [(family, (host, port))]


def _describe(exc: OSError) -> UpstreamError:
    reason = _REASONS.get(exc.errno or 0, "error")
    words = exc.strerror or str(exc) or type(exc).__name__
    return UpstreamError(words[:1].lower() + words[1:], reason=reason)


def _new_socket(family: int) -> socket.socket:
    try:
        return socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:  # EMFILE/ENFILE: out of descriptors; this client fails, others go on
        raise UpstreamError(
            f"cannot open a socket: {(exc.strerror or str(exc)).lower()}", reason="resources"
        ) from exc


def stream_options(conn: socket.socket) -> None:
    """Set TCP_NODELAY on a TCP socket (no-op for Unix sockets): relays must not add latency."""
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def resolve(host: str, port: int, kind: socket.SocketKind) -> list[tuple[int, tuple[str, int]]]:
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
    return [(family, sockaddr[:2]) for family, _, _, _, sockaddr in infos]  # type: ignore[misc]


async def _connect_ip(
    loop: asyncio.AbstractEventLoop, upstream: socket.socket, sockaddr: tuple[str, int]
) -> None:
    """Non-blocking connect to an already resolved address.

    loop.sock_connect would hand even a literal address to getaddrinfo again on every connect;
    here the kernel is asked directly and we wait for writability. Raises OSError.
    """
    code = upstream.connect_ex(sockaddr)
    if code == 0:
        return
    if code != errno.EINPROGRESS:
        raise OSError(code, os.strerror(code))
    done: asyncio.Future[None] = loop.create_future()
    fd = upstream.fileno()

    def writable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_writer(fd, writable)
    try:
        await done
    finally:
        loop.remove_writer(fd)
    code = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        raise OSError(code, os.strerror(code))


async def open_tcp(host: str, port: int) -> socket.socket:
    """Connect to host:port, trying each resolved address in order.

    Returns a connected non-blocking socket with TCP_NODELAY. Raises UpstreamError. The caller
    bounds the time with `asyncio.timeout` (see `connect_within`).
    """
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, sockaddr in await resolve(host, port, socket.SOCK_STREAM):
        upstream = _new_socket(family)
        try:
            upstream.setblocking(False)
            await _connect_ip(loop, upstream, sockaddr)
        except OSError as exc:
            upstream.close()
            last = exc
            continue
        except BaseException:
            upstream.close()
            raise
        stream_options(upstream)
        return upstream
    if last is None:
        raise UpstreamError(f"{host!r} resolved to no address", reason="resolve")
    raise _describe(last) from last


async def open_unix(path: str) -> socket.socket:
    """Connect to a Unix stream socket. Raises UpstreamError."""
    loop = asyncio.get_running_loop()
    upstream = _new_socket(socket.AF_UNIX)
    try:
        upstream.setblocking(False)
        await loop.sock_connect(upstream, path)
    except OSError as exc:
        upstream.close()
        raise _describe(exc) from exc
    except BaseException:
        upstream.close()
        raise
    return upstream


async def connect_within(target: tuple[str, int] | str, seconds: float) -> socket.socket:
    """Open a TCP (host, port) or Unix (path) target, giving up after `seconds`.

    Raises UpstreamError, with reason "timeout" when the time runs out.
    """
    try:
        async with asyncio.timeout(seconds):
            if isinstance(target, str):
                return await open_unix(target)
            return await open_tcp(target[0], target[1])
    except TimeoutError as exc:
        raise UpstreamError(f"no answer within {seconds:g}s", reason="timeout") from exc
