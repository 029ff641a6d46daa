"""One UDP request/answer exchange with the router on the event loop (`portfwd run`).

The socket is connected to the router, so an ICMP "port unreachable" (a router without
NAT-PMP/PCP) arrives as ConnectionRefusedError at once instead of a long silence; `auto`
moves on to the next method within milliseconds. One-shot commands use `router/blocking.py`,
which makes the same decisions (`Retransmission`) with a plain socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TypeVar

from portfwd.router.base import Retransmission

T = TypeVar("T")


class _Answers(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | OSError] = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.queue.full():
            self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and not self.queue.full():
            self.queue.put_nowait(exc)


async def exchange(
    where: tuple[str, int],
    request: bytes,
    parse: Callable[[bytes], T],
    schedule: Iterator[float],
    *,
    label: str,
    source: str | None = None,
) -> T:
    """Send `request` until `parse` accepts an answer; each wait comes from `schedule`."""
    decide = Retransmission(where, label)
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.create_datagram_endpoint(
            _Answers, remote_addr=where, local_addr=(source, 0) if source else None
        )
    except OSError as exc:
        raise decide.cannot_reach(exc) from exc
    began = loop.time()
    try:
        for wait in schedule:
            transport.sendto(request)
            deadline = loop.time() + wait
            while (left := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(protocol.queue.get(), left)
                except TimeoutError:
                    break
                if isinstance(item, OSError):
                    raise decide.failed(item) from item
                if answer := decide.received(parse, item):
                    return answer[0]
        raise decide.silent(loop.time() - began)
    finally:
        transport.close()
