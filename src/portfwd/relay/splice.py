"""Zero-copy TCP relay for Linux: `os.splice` through one pipe per direction, driven by the loop.

Theory of operation. Each direction (client->upstream, upstream->client) borrows a pipe from a
shared pool when its source becomes readable and gives it back, empty, when the burst is over,
so an idle connection holds no pipe and 5,000 idle clients cost no extra descriptors. When the
source is readable we splice socket->pipe and at once pipe->destination. If the destination
would block, we stop reading the source and wait for the destination to be writable
(backpressure: the pipe is the only buffer, so memory per connection is bounded by the pipe
size). A read of 0 bytes is EOF: once the pipe is empty we shut down the destination's write
side at once and leave the other direction running (half-close). The relay ends when both
directions are done or on any error.

The FIN follows the last bytes without delay: when epoll says the peer's FIN is in
(EPOLLRDHUP), we read on to the EOF in the same wake-up, and pass it on there and then. Why: a
client that closes as soon as its response is complete would otherwise close first, and hold
the TIME_WAIT the server holds when nothing stands in between. wrk through the relay in the
netns lab collected 14,000 of them in 3 s, after which its connects slowed to 800 a second;
with the FIN passed on at once, 18,000-20,000 a second throughout.

Bytes are counted from splice's return values, so counting costs one integer add per call.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
from collections.abc import Callable

from portfwd.counters import Session, SessionOwner
from portfwd.relay import libc
from portfwd.relay.poller import IN, OUT, RDHUP, READABLE, WRITABLE, Poller

F_SETPIPE_SZ = 1031
#: 1 MiB (the default fs.pipe-max-size) costs less CPU per Gbit than smaller pipes (bench/RESULTS.md,
#: D6). Pipes are lent per burst, so idle sessions hold none; over the per-user pipe quota
#: (non-root, many simultaneous bursts) F_SETPIPE_SZ fails and the default 64 KiB still works.
PIPE_SIZE = 1024 * 1024
#: Splices per readiness event before yielding to other connections (fairness).
ROUNDS_PER_WAKEUP = 8
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

_RESET = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN)


def splice_available() -> bool:
    """True when os.splice moves bytes between a stream socket and a pipe on this system.

    Probed once with a socketpair, so kernels, seccomp filters or sandboxes that refuse
    splice make the runtime choose the Protocol path instead of failing per connection.
    """
    if not hasattr(os, "splice"):
        return False
    left, right = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        left.sendall(b"x")
        return os.splice(right.fileno(), write_end, 1) == 1 and os.read(read_end, 1) == b"x"
    except OSError:
        return False
    finally:
        left.close()
        right.close()
        os.close(read_end)
        os.close(write_end)


class PipePool:
    """Empty pipes kept for reuse, so a short connection does not pay pipe2 + fcntl + close x2.

    A relay gives its pipes back only when they are known empty (every byte spliced in was
    spliced out); anything else is closed. At most `capacity` pipes are kept.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        """An empty non-blocking pipe (read end, write end). Raises OSError (e.g. EMFILE)."""
        if self._free:
            return self._free.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Over the per-user pipe quota the default size still works, only slower.
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
        return read_end, write_end

    def give(self, read_end: int, write_end: int) -> None:
        """Return an empty pipe."""
        if len(self._free) < self.capacity:
            self._free.append((read_end, write_end))
        else:
            os.close(read_end)
            os.close(write_end)

    def close(self) -> None:
        """Close every pooled pipe."""
        for read_end, write_end in self._free:
            os.close(read_end)
            os.close(write_end)
        self._free.clear()


class _Direction:
    """One direction of a splice relay: source socket -> pipe -> destination socket."""

    __slots__ = ("blocked", "dst", "eof", "pending", "pipe_r", "pipe_w", "reading", "relay", "src", "upward")

    def __init__(self, relay: SpliceRelay, src: int, dst: int, upward: bool) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.upward = upward
        self.pipe_r = -1
        self.pipe_w = -1
        self.pending = 0
        self.eof = False
        self.reading = True  # waiting for the source to be readable
        self.blocked = False  # waiting for the destination to be writable

    def on_readable(self, hangup: int = 0) -> None:
        """Move what the source has; with `hangup` (its FIN is in) read on to the EOF."""
        relay = self.relay
        if self.pipe_w < 0:
            try:
                self.pipe_r, self.pipe_w = relay.pipes.take()
            except OSError as exc:  # out of descriptors: end this session, keep the others
                relay.close(f"cannot make a pipe: {(exc.strerror or str(exc)).lower()}")
                return
        for _ in range(ROUNDS_PER_WAKEUP):
            try:
                moved = os.splice(self.src, self.pipe_w, PIPE_SIZE, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                relay.fail(exc, self.upward)
                return
            if moved == 0:
                self.eof = True
                self.reading = False  # ready() ignores the source from now on
                if self.pending == 0:
                    self.release()
                    relay.finish(self)  # which also stops watching the source, when it must
                else:
                    relay.watch(self.src)
                return
            self.pending += moved
            if self.upward:
                relay.session.bytes_up += moved
            else:
                relay.session.bytes_down += moved
            if not self.flush():
                if not relay.closed:
                    self.reading = False
                    self.blocked = True
                    relay.watch(self.src)
                    relay.watch(self.dst)
                return
            if moved < PIPE_SIZE and not hangup:
                break
        self.release()

    def release(self) -> None:
        """Lend the (empty) pipe back to the pool between bursts: idle sessions hold no pipe."""
        if self.pipe_r >= 0 and self.pending == 0:
            self.relay.pipes.give(self.pipe_r, self.pipe_w)
            self.pipe_r = self.pipe_w = -1

    def flush(self) -> bool:
        """Move pipe contents to the destination; False when it would block (or failed)."""
        while self.pending:
            try:
                moved = os.splice(self.pipe_r, self.dst, self.pending, flags=_FLAGS)
            except BlockingIOError:
                return False
            except OSError as exc:
                self.relay.fail(exc, not self.upward)
                return False
            self.pending -= moved
        return True

    def on_writable(self) -> None:
        if not self.flush():
            return
        relay = self.relay
        if relay.closed:
            return
        self.blocked = False
        relay.watch(self.dst)
        self.release()
        if self.eof:
            relay.finish(self)
        else:
            self.reading = True
            relay.watch(self.src)

    def close(self) -> None:
        if self.pipe_r < 0:
            return
        if self.pending == 0:
            self.relay.pipes.give(self.pipe_r, self.pipe_w)
        else:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
        self.pipe_r = self.pipe_w = -1


_SHUTDOWN: Callable[[int, int], int] | None = libc.function("shutdown", (ctypes.c_int, ctypes.c_int))


def _shutdown_write(fd: int) -> None:
    """shutdown(fd, SHUT_WR) on a bare descriptor (there is no os.shutdown). Raises OSError.

    Through libc directly: wrapping the descriptor in a socket object for its shutdown() costs
    a getsockname() and an object per call (bench/RESULTS.md, D7).
    """
    if _SHUTDOWN is not None:
        if _SHUTDOWN(fd, socket.SHUT_WR) != 0:
            raise libc.last_error()
        return
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        holder.shutdown(socket.SHUT_WR)
    finally:
        holder.detach()


class SpliceRelay:
    """Relays two connected non-blocking stream sockets with os.splice until both sides finish.

    The relay is given the two sockets as bare descriptors and owns them from then on, so an
    idle session holds two ints instead of two socket objects. Readiness comes from
    relay/poller.py's epoll set (each socket is watched for what its two directions wait for:
    reading as a source, writing as a blocked destination). `owner.relay_closed(session,
    reason)` is called exactly once when the relay ends; the descriptors are closed by then.
    """

    __slots__ = (
        "_client_mask",
        "_done",
        "_down",
        "_owner",
        "_up",
        "_upstream_mask",
        "client",
        "closed",
        "pipes",
        "poller",
        "session",
        "upstream",
    )

    def __init__(
        self,
        client: int,
        upstream: int,
        session: Session,
        owner: SessionOwner,
        pipes: PipePool,
        poller: Poller,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.session = session
        self._owner = owner
        self.pipes = pipes
        self.poller = poller
        self.closed = False
        self._done: str | None = None  # the side that finished first
        self._up = _Direction(self, self.client, self.upstream, upward=True)
        self._down = _Direction(self, self.upstream, self.client, upward=False)
        self._client_mask = 0
        self._upstream_mask = 0

    def start(self) -> None:
        """Begin relaying in both directions."""
        self.watch(self.client)
        self.watch(self.upstream)

    def watch(self, fd: int) -> None:
        """Bring the poller's interest in `fd` in line with what its two directions wait for."""
        if self.closed:
            return
        client = fd == self.client
        source, destination = (self._up, self._down) if client else (self._down, self._up)
        want = (IN | RDHUP if source.reading else 0) | (OUT if destination.blocked else 0)
        have = self._client_mask if client else self._upstream_mask
        if want == have:
            return
        poller = self.poller
        if not have:
            poller.register(fd, want, self)
        elif want:
            poller.modify(fd, want)
        else:
            poller.unregister(fd)
        if client:
            self._client_mask = want
        else:
            self._upstream_mask = want

    def ready(self, fd: int, events: int) -> None:
        """The poller: `fd` (client or upstream) can be read from, written to, or failed."""
        source, destination = (self._up, self._down) if fd == self.client else (self._down, self._up)
        if events & READABLE and source.reading:
            source.on_readable(events & RDHUP)
        if events & WRITABLE and destination.blocked and not self.closed:
            destination.on_writable()

    def finish(self, direction: _Direction) -> None:
        """A direction saw EOF and drained: pass the half-close on, end when both are done."""
        if self._done is not None:
            self.close(f"{self._done} closed")
            return
        self._done = "client" if direction.upward else "upstream"
        self.watch(direction.src)  # epoll is level-triggered: stop watching the source that ended
        with contextlib.suppress(OSError):  # the peer is already gone; the other side will notice
            _shutdown_write(direction.dst)

    def fail(self, exc: OSError, client_side: bool) -> None:
        """An I/O error on one side ends the whole relay."""
        side = "client" if client_side else "upstream"
        if exc.errno in _RESET:
            self.close(f"{side} reset")
        else:
            self.close(f"{side} error: {exc.strerror or exc}")

    def close(self, reason: str) -> None:
        """Stop relaying, release both descriptors and pipes, report `reason` once."""
        if self.closed:
            return
        self.closed = True
        for fd in (self.client, self.upstream):
            self.poller.forget(fd)  # closing takes it out of the epoll set
            os.close(fd)
        self._up.close()
        self._down.close()
        self._owner.relay_closed(self.session, reason)
