"""`portfwd ssh -W host:port`: stdin and stdout joined to one direct-tcpip channel, as ssh -W.

No listener, no control socket, no reconnect: one connection (through the jump hosts, host key
checked as for every tunnel), one channel to host:port, bytes both ways, and the end when the
far side closes (or stdin ends and then the far side closes), so portfwd works as ssh's
ProxyCommand. Reading stdin blocks, so a daemon thread does it and hands chunks to the loop;
stdout is written in the loop: a slow reader slows the channel, which is the backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading

import asyncssh

from portfwd.errors import RuntimeFailure
from portfwd.specs import TunnelSpec
from portfwd.ssh import connection
from portfwd.ssh.errors import ssh_error

__all__ = ["run"]

log = logging.getLogger(__name__)
CHUNK = 64 * 1024


def _stdin_reader(loop: asyncio.AbstractEventLoop, chunks: asyncio.Queue[bytes]) -> None:
    """In a daemon thread: read stdin until EOF (b"") or an error, handing each chunk to the loop."""
    while True:
        try:
            chunk = os.read(0, CHUNK)
        except OSError:
            chunk = b""
        loop.call_soon_threadsafe(chunks.put_nowait, chunk)
        if not chunk:
            return


def _write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(1, view)
        view = view[written:]


async def _relay(spec: TunnelSpec, host: str, port: int, fast_path: bool) -> None:
    jumps: list[asyncssh.SSHClientConnection] = []
    conn: asyncssh.SSHClientConnection | None = None
    try:
        try:
            conn = await connection.connect(spec, fast_path, jumps, lambda reason: None)
            reader, writer = await conn.open_connection(host, port)
        except (OSError, asyncssh.Error) as exc:
            error = ssh_error(exc)
            raise RuntimeFailure(f"{spec.label}: -W {host}:{port}: {error.message}") from exc
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes] = asyncio.Queue()
        threading.Thread(target=_stdin_reader, args=(loop, chunks), daemon=True, name="stdin").start()

        async def upstream() -> None:
            while chunk := await chunks.get():
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

        sending = loop.create_task(upstream())
        try:
            while chunk := await reader.read(CHUNK):
                _write_all(chunk)
        except (OSError, asyncssh.Error) as exc:  # stdout closed, or the link failed
            log.debug("-W %s:%d ended: %s", host, port, ssh_error(exc).message)
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, asyncssh.Error):
                await sending
    finally:
        await connection.close([item for item in (conn, *reversed(jumps)) if item is not None])


def run(spec: TunnelSpec, host: str, port: int, *, fast_path: bool = True) -> None:
    """Join stdin/stdout to host:port through the tunnel's server until either side ends.

    Raises RuntimeFailure (one line) when the connection or the channel cannot be opened.
    """
    asyncio.run(_relay(spec, host, port, fast_path))  # the process then exits: EOF on stdout
