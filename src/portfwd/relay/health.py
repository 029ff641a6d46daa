"""Active health checks of a rule's backends (haproxy's `check inter rise fall`).

Each backend is probed every `interval` by a task of its own, started a share of the interval
apart so the probes of a rule do not go out together. A TCP check connects (then sends `send`
and waits for `expect` in the answer, if given); a UDP rule's check sends `send` as a datagram
and waits for an answer holding `expect`. Each result goes to the pool (relay/balance.py),
which counts rise and fall. Checks never touch the relays: they run beside them on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from portfwd.addr import Endpoint, HostPorts
from portfwd.errors import UpstreamError
from portfwd.proto.proxy import local_header
from portfwd.relay.balance import Backend, Pool
from portfwd.relay.forwarder import Target, resolve_target
from portfwd.relay.upstream import describe_error, resolve

#: How much of an answer a check reads looking for `expect`.
EXPECT_LIMIT = 64 * 1024


class Checker:
    """Probes every backend of one pool until stopped."""

    def __init__(self, pool: Pool, listen: Endpoint, datagram: bool, proxy_protocol: int = 0) -> None:
        self.pool = pool
        self.datagram = datagram
        #: With proxy_protocol, each TCP check begins with a LOCAL header (v2) or UNKNOWN (v1),
        #: as the PROXY protocol has them for a proxy's own connections (haproxy's check-send-proxy).
        self.local_header = local_header(proxy_protocol) if proxy_protocol and not datagram else b""
        first = listen.ports.first if isinstance(listen, HostPorts) else None
        #: What each backend's check reaches: its target for the rule's first listening port.
        self.targets: list[Target] = [
            resolve_target(listen, backend.spec.connect, first) for backend in pool.backends
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        interval = self.pool.health.interval
        count = len(self.pool.backends)
        for index, backend in enumerate(self.pool.backends):
            delay = interval * index / count
            self._tasks.append(asyncio.get_running_loop().create_task(self._every(backend, delay)))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    async def _every(self, backend: Backend, delay: float) -> None:
        health = self.pool.health
        await asyncio.sleep(delay)
        while True:
            began = time.monotonic()
            try:
                ok, result = await self.probe(backend)
            except Exception as exc:  # noqa: BLE001 - a check's boundary: it fails, checking goes on
                ok, result = False, f"check failed: {type(exc).__name__}"
            self.pool.checked(backend, ok, result)
            await asyncio.sleep(max(0.0, health.interval - (time.monotonic() - began)))

    async def probe(self, backend: Backend) -> tuple[bool, str]:
        """One check of `backend`: (passed, what happened, in words)."""
        health = self.pool.health
        target = self.targets[backend.index]
        began = time.monotonic()
        try:
            async with asyncio.timeout(health.timeout):
                if self.datagram:
                    answer = await self._datagram(target)
                else:
                    answer = await self._stream(target)
        except TimeoutError:
            return False, f"timeout after {health.timeout:g}s"
        except UpstreamError as exc:
            return False, exc.message
        except OSError as exc:
            return False, describe_error(exc).message
        if health.expect and health.expect not in answer:
            return False, f"no {_show(health.expect)} in the answer"
        return True, f"ok in {(time.monotonic() - began) * 1000:.1f} ms"

    async def _stream(self, target: Target) -> bytes:
        health = self.pool.health
        if isinstance(target, str):
            reader, writer = await asyncio.open_unix_connection(target)
        else:
            family, sockaddr = (await resolve(target[0], target[1], socket.SOCK_STREAM))[0]
            reader, writer = await asyncio.open_connection(sockaddr[0], sockaddr[1], family=family)
        try:
            if self.local_header:  # the backend wants a PROXY header first: a health check's
                writer.write(self.local_header)
            if health.send:
                writer.write(health.send)
                await writer.drain()
            answer = b""
            while health.expect and health.expect not in answer and len(answer) < EXPECT_LIMIT:
                chunk = await reader.read(EXPECT_LIMIT - len(answer))
                if not chunk:
                    break
                answer += chunk
            return answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _datagram(self, target: Target) -> bytes:
        assert not isinstance(target, str)  # config: UDP reaches IP targets only
        family, sockaddr = (await resolve(target[0], target[1], socket.SOCK_DGRAM))[0]
        loop = asyncio.get_running_loop()
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.setblocking(False)
            probe.connect(sockaddr)
            await loop.sock_sendall(probe, self.pool.health.send)
            return await loop.sock_recv(probe, EXPECT_LIMIT)


def _show(data: bytes) -> str:
    """`expect` for a result line: quoted, unprintable bytes escaped, at most 40 characters."""
    text = data.decode("latin-1").encode("unicode_escape").decode("ascii")
    return '"' + (text if len(text) <= 40 else text[:37] + "...") + '"'
