"""In-process peers and helpers for relay tests: upstream servers that record what they saw."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from portfwd import config, planner
from portfwd.runtime import Runtime

MiB = 1024 * 1024
Address = tuple[str, int] | str  # (host, port) or a Unix socket path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_handed_out: set[int] = set()


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out and took back, free for both TCP and UDP.

    `kind` picks which protocol asks first; the other must be free on the same number too, so
    a tcp+udp rule can bind it. A port is never handed out twice in one test process: the
    kernel may give the same free port to two `bind(0)`s in a row, and a test asking for two
    ports means two different ones. Bounded retries.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
    for _ in range(50):
        with socket.socket(family, kind) as probe, socket.socket(family, other) as twin:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
            if port in _handed_out:
                continue
            try:
                twin.bind((host, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise AssertionError("no port free for both TCP and UDP after 50 tries")


def text(address: Address) -> str:
    """Config syntax for an address."""
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_client(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(address, str):
        return await asyncio.open_unix_connection(address)
    return await asyncio.open_connection(address[0], address[1])


async def read_all(reader: asyncio.StreamReader, limit: int = 64 * MiB) -> bytes:
    """Read until EOF (bounded), returning everything."""
    chunks = []
    total = 0
    while total <= limit:
        chunk = await reader.read(256 * 1024)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


@dataclass
class Peer:
    """An upstream server. `mode` picks its behaviour; `received` holds sha256 of what each client sent.

    Modes: echo (echo, pass EOF on), exchange (send `payload` while reading, EOF after sending),
    reply_after_eof (read to EOF, then answer the sha256 of what came), send_first (send `payload`
    and EOF at once, then read to EOF).
    """

    mode: str
    payload: bytes = b""
    received: list[str] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    address: Address = ("127.0.0.1", 0)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, where: Address) -> Address:
        if isinstance(where, str):
            self.server = await asyncio.start_unix_server(self._handle, where)
            self.address = where
        else:
            self.server = await asyncio.start_server(self._handle, where[0], where[1])
            port = self.server.sockets[0].getsockname()[1]
            self.address = (where[0], port)
        return self.address

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.append(writer.get_extra_info("peername"))
        try:
            if self.mode == "echo":
                while chunk := await reader.read(256 * 1024):
                    writer.write(chunk)
                    await writer.drain()
                writer.write_eof()
            elif self.mode == "exchange":

                async def send() -> None:
                    writer.write(self.payload)
                    await writer.drain()
                    writer.write_eof()

                sender = asyncio.create_task(send())
                self.received.append(sha(await read_all(reader)))
                await sender
            elif self.mode == "reply_after_eof":
                data = await read_all(reader)
                self.received.append(sha(data))
                writer.write(sha(data).encode())
                await writer.drain()
            elif self.mode == "send_first":
                writer.write(self.payload)
                await writer.drain()
                writer.write_eof()
                self.received.append(sha(await read_all(reader)))
            await writer.drain()
        except (ConnectionError, OSError):
            self.received.append("error")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            self.done.set()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            if isinstance(self.address, str):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address)


@contextlib.asynccontextmanager
async def peer(mode: str, where: Address, payload: bytes = b"") -> AsyncIterator[Peer]:
    server = Peer(mode, payload)
    await server.start(where)
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running(data: dict[str, Any]) -> AsyncIterator[Runtime]:
    """Run a portfwd Runtime in this event loop for the body of the `async with`."""
    # One process: these tests read the runtime's own state (test_workers.py runs several).
    data = {"drain_timeout": "1s", "control": {"enabled": False}, "workers": 1, **data}
    runtime = Runtime(planner.plan(config.validate(data)))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0, what: str = "condition") -> None:
    """Wait (bounded) for a condition that an event in this loop will make true."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - the condition is state, not an event we can await
            await asyncio.sleep(0.01)
    assert condition(), what
