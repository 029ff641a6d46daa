"""Listening sockets: binding (with reasons a person understands) and a TCP accept loop.

The accept loop is a reader callback on the listening socket that accepts in batches, so one
wakeup serves a burst of clients: as socket objects (TcpListener, for the tunnels and the
control endpoints) or as bare descriptors (DescriptorListener, the forwarder's hot path).
When the process runs out of file descriptors (EMFILE) it stops accepting for a moment
instead of spinning on a readable socket it cannot serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import logging
import os
import socket
import stat
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from portfwd.errors import BindError
from portfwd.logevents import event
from portfwd.relay import libc

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64
#: Whether a socket accepted from a listener made by bind_ip already has TCP_NODELAY.
NODELAY_INHERITED = sys.platform == "linux"
ACCEPT_RETRY_DELAY = 0.5
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

_WHY = {
    errno.EACCES: "permission denied",
    errno.EADDRINUSE: "address already in use",
    errno.EADDRNOTAVAIL: "address not available on this machine",
    errno.EAFNOSUPPORT: "address family not supported (is IPv6 disabled?)",
}


def bind_error(what: str, where: str, exc: OSError, port: int | None) -> BindError:
    words = _WHY.get(exc.errno or 0, (exc.strerror or str(exc)).lower())
    hint = None
    if exc.errno == errno.EACCES and port is not None and port < 1024:
        hint = "ports below 1024 need root (with user = ...) or CAP_NET_BIND_SERVICE; see README, Low ports"
    elif exc.errno == errno.EADDRINUSE:
        hint = "another program (or rule) listens there; pick another port or stop it"
    return BindError(f"cannot listen on {where}: {words}", field=what, hint=hint)


def _family_for(host: str) -> tuple[int, str]:
    """Choose the socket family for a listen host; "" is every address, dual-stack if possible."""
    if host == "":
        return (socket.AF_INET6, "::") if socket.has_ipv6 and _ipv6_works() else (socket.AF_INET, "0.0.0.0")
    if ":" in host:
        return socket.AF_INET6, host
    try:
        socket.inet_aton(host)
        return socket.AF_INET, host
    except OSError:
        pass
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])


@functools.cache
def _ipv6_works() -> bool:
    """Whether this kernel can bind IPv6 at all; probed once (a 1000-port range binds 1000 times)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


#: TCP keepalive on relayed connections (idle seconds, seconds between probes, probes): a peer
#: that vanished (no FIN, no RST: a laptop closed, a NAT that forgot) is found within about
#: two minutes of silence, and its session and descriptors go, instead of staying forever.
KEEPALIVE = (60, 10, 6)


def keepalive(sock: socket.socket) -> None:
    """Turn on TCP keepalive with KEEPALIVE's timing. Raises OSError."""
    idle, interval, count = KEEPALIVE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


def bind_ip(
    what: str,
    host: str,
    port: int,
    kind: socket.SocketKind,
    *,
    backlog: int,
    dual_stack: bool,
    tcp_keepalive: bool = True,
    reuseport: bool = False,
) -> socket.socket:
    """Open a non-blocking TCP (listening) or UDP socket on host:port.

    With `reuseport`, the socket joins a SO_REUSEPORT group: the workers' copies of a listener
    (`workers = N`) bind the same address, and the kernel spreads new clients over them
    (`bind_group` makes such a group safely).

    `host == ""` binds every address: one IPv6 socket that also takes IPv4 where the kernel has
    IPv6, else 0.0.0.0. An explicit `::` stays IPv6-only unless `dual_stack`. With
    `tcp_keepalive`, accepted clients inherit KEEPALIVE from the listener (Linux copies socket
    options to accepted sockets): no system call per client.
    Raises BindError naming the rule (`what`), the address and the errno in words.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
    try:
        family, address = _family_for(host)
    except OSError as exc:
        raise BindError(f"cannot resolve listen host {host!r}: {exc}", field=what) from exc
    listener = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit it on Linux: no setsockopt per client (NODELAY_INHERITED).
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tcp_keepalive:
                keepalive(listener)
        if family == socket.AF_INET6:
            v6only = 0 if (host == "" or dual_stack) else 1
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        if reuseport:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((address, port))
        if kind == socket.SOCK_STREAM:
            listener.listen(backlog)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        raise bind_error(what, where, exc, port) from exc
    return listener


def bind_group(
    what: str,
    host: str,
    port: int,
    kind: socket.SocketKind,
    count: int,
    *,
    backlog: int,
    dual_stack: bool,
    tcp_keepalive: bool = True,
) -> list[socket.socket]:
    """`count` sockets on one address in a SO_REUSEPORT group (one per worker process).

    A plain socket is bound first and closed: if the address is held by anyone (another
    portfwd with workers included, whose group would otherwise take ours in), that bind fails
    and the rule is refused as a single socket would be. Raises BindError; nothing stays open.
    """
    probe = bind_ip(what, host, port, kind, backlog=backlog, dual_stack=dual_stack, tcp_keepalive=False)
    probe.close()
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            group.append(
                bind_ip(
                    what,
                    host,
                    port,
                    kind,
                    backlog=backlog,
                    dual_stack=dual_stack,
                    tcp_keepalive=tcp_keepalive,
                    reuseport=True,
                )
            )
    except BindError:
        for sock in group:
            sock.close()
        raise
    return group


#: The most processes that share one accept queue (`bind_shared`). Each of them wakes for a
#: client that arrives while they all sleep (the C engine's epoll is itself watched by the
#: event loop's, and EPOLLEXCLUSIVE does not reach through a nested epoll), and all but one find
#: nothing: past this many, the processes split into queues of at most this many, which form a
#: SO_REUSEPORT group.
QUEUE_SHARERS = 4


def shared_queues(count: int) -> int:
    """How many accept queues `count` processes get from `bind_shared`; process i (0: the main
    one) takes clients from queue i % shared_queues(count)."""
    return -(-count // QUEUE_SHARERS)


def bind_shared(
    what: str, host: str, port: int, count: int, *, backlog: int, dual_stack: bool, tcp_keepalive: bool = True
) -> list[socket.socket]:
    """A TCP listening socket for each of `count` processes, index 0 first, where processes
    share accept queues (the C engine's rules), where `bind_group` gives each its own: up to
    QUEUE_SHARERS processes one socket and its duplicates, more a SO_REUSEPORT group of such.

    Whichever process of a queue is awake accepts every client waiting; a group's hash puts
    each client in one process's queue, which may wait while another process idles. A queue's
    backlog is `backlog` for each process on it (the kernel caps it at net.core.somaxconn), as
    a socket each had. The copies share one open file: its non-blocking flag too (nothing may
    make a listener blocking). Raises BindError; nothing stays open.
    """
    queues = shared_queues(count)
    depth = min(backlog * -(-count // queues), 65535)
    if queues == 1:
        kind = socket.SOCK_STREAM
        originals = [
            bind_ip(what, host, port, kind, backlog=depth, dual_stack=dual_stack, tcp_keepalive=tcp_keepalive)
        ]
    else:
        originals = bind_group(
            what, host, port, socket.SOCK_STREAM, queues, backlog=depth, dual_stack=dual_stack,
            tcp_keepalive=tcp_keepalive,
        )  # fmt: skip
    group = list(originals)
    try:
        group.extend(originals[index % queues].dup() for index in range(queues, count))
    except OSError as exc:
        for sock in group:
            sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"
        raise bind_error(what, where, exc, port) from exc
    return group


def bind_unix(what: str, path: str, *, backlog: int) -> socket.socket:
    """Listen on a Unix stream socket, replacing a stale socket file left by a dead process.

    Raises BindError if the path is taken by a live listener or by a file that is not a socket.
    """
    where = f"unix:{path}"
    with contextlib.suppress(FileNotFoundError):
        mode = os.stat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise BindError(
                f"cannot listen on {where}: the path exists and is not a socket",
                field=what,
                hint="remove the file or choose another path",
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody answers: a stale socket from a process that died
        else:
            raise BindError(
                f"cannot listen on {where}: another program is listening there",
                field=what,
                hint="stop it or choose another path",
            )
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(backlog)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        raise bind_error(what, where, exc, None) from exc
    return listener


Client = TypeVar("Client")


class AcceptLoop(Generic[Client]):
    """The accept loop shared by both listeners: batches, the EMFILE pause, closing."""

    def __init__(self, listener: socket.socket, label: str) -> None:
        self.listener = listener
        self._label = label
        self._loop = asyncio.get_running_loop()
        self._paused: asyncio.TimerHandle | None = None
        self._closed = False
        self._held = False

    def start(self) -> None:
        """Begin accepting."""
        if not self._held:
            self._watch(True)

    def _watch(self, on: bool) -> None:
        """Take clients from the listener when it is readable (on), or stop."""
        if on:
            self._loop.add_reader(self.listener.fileno(), self._on_accept)
        else:
            self._loop.remove_reader(self.listener.fileno())

    def _forget(self) -> None:
        """Stop watching the listener for good (it is about to be closed)."""
        self._loop.remove_reader(self.listener.fileno())

    def hold(self) -> None:
        """Stop accepting until `release`: new clients wait in the kernel's backlog (a paused
        rule, as haproxy's `disable frontend`); the socket stays bound."""
        if self._held or self._closed:
            return
        self._held = True
        self._watch(False)

    def release(self) -> None:
        """Accept again after `hold` (unless paused for exhaustion: that resumes on its own)."""
        if not self._held:
            return
        self._held = False
        if self._paused is None and not self._closed:
            self._watch(True)

    def _accept(self) -> tuple[Client, Any]:
        """One client and its address. Raises OSError (BlockingIOError when none is waiting)."""
        raise NotImplementedError

    def _serve(self, batch: list[tuple[Client, Any]]) -> None:
        """Hand over the clients accepted in one wakeup."""
        raise NotImplementedError

    def _on_accept(self) -> None:
        batch = []
        for _ in range(ACCEPT_BATCH):
            try:
                batch.append(self._accept())
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self.pause(exc.strerror or str(exc))
                    break
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR):
                    continue  # that client went away before we accepted it
                why = exc.strerror or str(exc)
                log.warning(
                    "%s: accept failed: %s",
                    self._label,
                    why,
                    extra=event("accept.failed", rule=self._label, reason=why),
                )
                break
        if batch:
            self._serve(batch)

    def pause(self, why: str) -> None:
        """Stop accepting for ACCEPT_RETRY_DELAY: the process is out of descriptors or memory.

        Accepting would only hand clients a reset; waiting lets closing sessions free resources.
        """
        if self._paused is not None or self._closed:
            return
        log.warning(
            "%s: cannot accept more clients (%s); pausing accepts for %.1fs",
            self._label,
            why,
            ACCEPT_RETRY_DELAY,
            extra=event("accept.paused", rule=self._label, reason=why, delay_s=ACCEPT_RETRY_DELAY),
        )
        self._watch(False)
        self._paused = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if not self._closed and not self._held:
            self._watch(True)

    def close(self) -> None:
        """Stop accepting and close the listening socket (and its Unix path)."""
        if self._closed:
            return
        self._closed = True
        if self._paused is not None:
            self._paused.cancel()
        self._forget()
        path = self.listener.getsockname() if self.listener.family == socket.AF_UNIX else None
        self.listener.close()
        if isinstance(path, str) and path:
            with contextlib.suppress(OSError):
                os.unlink(path)


class TcpListener(AcceptLoop[socket.socket]):
    """Accepts clients on a listening stream socket and hands each to `serve(client, peer)`."""

    def __init__(
        self, listener: socket.socket, serve: Callable[[socket.socket, Any], None], label: str
    ) -> None:
        super().__init__(listener, label)
        self._serve_one = serve

    def _accept(self) -> tuple[socket.socket, Any]:
        return self.listener.accept()

    def _serve(self, batch: list[tuple[socket.socket, Any]]) -> None:
        for client, peer in batch:
            self._serve_one(client, peer)


_ACCEPT4 = (
    libc.function("accept4", (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int))
    if sys.platform == "linux"
    else None
)
_ACCEPT_FLAGS = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)
_ADDRESS_SIZE = 128  # sizeof(struct sockaddr_storage)


class DescriptorListener(AcceptLoop[int]):
    """Hands the clients of each wakeup to `serve([(fd, peer), ...])` as bare descriptors,
    non-blocking, with TCP_NODELAY (IP) on: for the forwarder, whose relays work on descriptors
    and which begins the burst's upstream connects together (TcpForwarder.serve).

    Why not socket.accept(): it wraps the client in a socket object, whose constructor checks
    the descriptor with getsockname(2), and the client then needs ioctl(FIONBIO) to become
    non-blocking. On Linux accept4(2) gives a non-blocking descriptor and the peer's address in
    one call (bench/RESULTS.md, design measurement D3). Elsewhere the same
    through socket objects.
    """

    def __init__(
        self, listener: socket.socket, serve: Callable[[list[tuple[int, Any]]], None], label: str
    ) -> None:
        super().__init__(listener, label)
        self._serve_batch = serve
        self._fd = listener.fileno()
        self._nodelay = listener.family != socket.AF_UNIX and not NODELAY_INHERITED
        self._ipv4 = listener.family == socket.AF_INET
        self._address = ctypes.create_string_buffer(_ADDRESS_SIZE)
        self._view = memoryview(self._address).cast("B")
        self._length = ctypes.c_uint32(_ADDRESS_SIZE)
        self._pointers = (ctypes.addressof(self._address), ctypes.addressof(self._length))

    def _accept(self) -> tuple[int, Any]:
        if _ACCEPT4 is None:
            return self._accept_portable()
        self._length.value = _ADDRESS_SIZE
        address, length = self._pointers
        fd: int = _ACCEPT4(self._fd, address, length, _ACCEPT_FLAGS)
        if fd < 0:
            raise libc.last_error()
        if self._ipv4:  # the common case, read in place
            return fd, libc.sockaddr_in(self._view)
        return fd, libc.sockaddr(bytes(self._view[: self._length.value]))

    def _serve(self, batch: list[tuple[int, Any]]) -> None:
        self._serve_batch(batch)

    def _accept_portable(self) -> tuple[int, Any]:
        client, peer = self.listener.accept()
        try:
            client.setblocking(False)
            if self._nodelay:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # it went away already: the loop skips it like an aborted accept
            client.close()
            raise ConnectionAbortedError(errno.ECONNABORTED, "client went away") from exc
        return client.detach(), peer


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class StreamListener:
    """portfwd's accept loop feeding an asyncio-streams handler: for the control socket and /metrics.

    Not `asyncio.start_server`: with uvloop, merely having such a server object in the loop
    costs CPU on every *relayed* connection (bench/RESULTS.md, D4). This reuses TcpListener (and
    its EMFILE pause) and wraps each accepted client in streams.
    """

    def __init__(self, listener: socket.socket, handle: StreamHandler, label: str, limit: int) -> None:
        self._handle = handle
        self._limit = limit
        self._unix = listener.family == socket.AF_UNIX
        self._accepting = TcpListener(listener, self._accept, label)
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Begin accepting."""
        self._accepting.start()

    def _accept(self, client: socket.socket, peer: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client: socket.socket) -> None:
        try:
            client.setblocking(False)
            if self._unix:
                reader, writer = await asyncio.open_unix_connection(sock=client, limit=self._limit)
            else:
                reader, writer = await asyncio.open_connection(sock=client, limit=self._limit)
        except OSError:
            client.close()
            return
        await self._handle(reader, writer)

    def close(self) -> None:
        """Stop accepting (removing a Unix socket file) and cancel requests in progress."""
        self._accepting.close()
        for task in list(self._tasks):
            task.cancel()
