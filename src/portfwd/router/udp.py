"""One UDP request/answer exchange with the router, retransmitted on the protocol's schedule.

The socket is connected to the router, so an ICMP "port unreachable" (a router without
NAT-PMP/PCP) arrives as ConnectionRefusedError at once instead of a long silence; `auto`
moves on to the next method within milliseconds.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from typing import TypeVar

from portfwd.errors import RouterError
from portfwd.proto.natpmp import NatPmpReplyError
from portfwd.proto.pcp import PcpReplyError

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


def doubling(first: float, count: int, cap: float = 1024.0, jitter: float = 0.0) -> Iterator[float]:
    """Waits between tries: `first`, doubling up to `cap`, `count` of them, with ± `jitter`."""
    wait = first
    for _ in range(count):
        yield wait * (1 + random.uniform(-jitter, jitter)) if jitter else wait
        wait = min(wait * 2, cap)


async def exchange(
    where: tuple[str, int],
    request: bytes,
    parse: Callable[[bytes], T],
    schedule: Iterator[float],
    *,
    label: str,
    source: str | None = None,
) -> T:
    """Send `request` until `parse` accepts an answer; each wait comes from `schedule`.

    `parse` raises for datagrams that are not our answer; a stray one is skipped, but an error
    that carries the router's result code (`result` attribute not None) is the answer.
    """
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.create_datagram_endpoint(
            _Answers, remote_addr=where, local_addr=(source, 0) if source else None
        )
    except OSError as exc:
        raise RouterError(
            f"{label}: cannot reach {where[0]}:{where[1]}: {exc.strerror}", reason="unreachable"
        ) from exc
    last: Exception | None = None
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
                    raise RouterError(
                        f"{label}: {where[0]}:{where[1]} refused (no {label} service there)",
                        reason="unsupported",
                    ) from item
                try:
                    return parse(item)
                except (NatPmpReplyError, PcpReplyError) as exc:
                    if exc.result is not None:
                        raise
                    last = exc
        detail = f"; last datagram: {last}" if last else ""
        raise RouterError(f"{label}: no answer from {where[0]}:{where[1]}{detail}", reason="unreachable")
    finally:
        transport.close()
