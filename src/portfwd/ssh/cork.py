"""Coalesce the SSH connection's socket writes: one writev per loop pass instead of two sends a packet.

asyncssh writes every SSH packet to its transport on its own, and precedes each data packet
with an SSH_MSG_IGNORE; on an idle socket each write is a send() syscall, so a 32 KiB channel
packet cost two syscalls, a large part of a tunnel's CPU on bulk transfers (bench/RESULTS.md,
D10). This transport proxy queues the writes and hands them to the real
transport once per event-loop pass with `writelines` (one writev). It plugs in through
asyncssh's documented `tunnel=` hook (an object with `create_connection`), so nothing inside
asyncssh is patched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

#: Flush at once past this many queued bytes, so the server starts decrypting while we encrypt:
#: a 32 KiB data packet goes out at once, together with the small packets queued before it
#: (bench/RESULTS.md, D10: the size hardly matters; batching whole loop passes was slower).
FLUSH_AT = 32 * 1024


class CorkedTransport:
    """A stream transport whose writes are gathered and flushed on the next loop pass."""

    __slots__ = ("_loop", "_pending", "_scheduled", "_size", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []
        self._scheduled = False
        self._size = 0

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)
        if self._size >= FLUSH_AT:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def writelines(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        self._scheduled = False
        self._size = 0
        if self._pending:
            pending, self._pending = self._pending, []
            if not self._transport.is_closing():
                self._transport.writelines(pending)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Corking(asyncio.Protocol):
    """Stands between the loop and asyncssh's connection only to hand it a CorkedTransport."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) or hasattr(transport, "writelines")
        self.inner.connection_made(CorkedTransport(transport))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)


class CorkedConnector:
    """asyncssh `tunnel=` object: the TCP connection to (or from) a peer, with corked writes."""

    async def create_connection(
        self, session_factory: Callable[[], Any], remote_host: str, remote_port: int
    ) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        inner = session_factory()
        transport, _ = await loop.create_connection(lambda: _Corking(inner), remote_host, remote_port)
        return transport, inner

    async def create_server(
        self, session_factory: Callable[[str, int], Any], listen_host: str, listen_port: int
    ) -> asyncio.AbstractServer:
        """The server side (`asyncssh.listen(tunnel=...)`): every accepted connection corked."""
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: _Corking(session_factory("", 0)),
            listen_host or None,
            listen_port,
            reuse_address=True,
            backlog=1024,
        )

    def close(self) -> None:
        """Nothing to close: the connection owns its socket."""

    async def wait_closed(self) -> None:
        """Nothing to wait for."""
