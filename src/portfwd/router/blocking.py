"""PCP and NAT-PMP without an event loop, for one-shot commands (`portfwd map add`, `map ip`).

A router answers a MAP request in about a millisecond; importing asyncio takes forty. The
drivers in `pcp.py` and `natpmp.py` are coroutines that only ever await their `exchange`, so
with this module's exchange, which blocks on a plain socket and never suspends, `run` finishes
them in one step and no loop is needed. `portfwd run` gives them `router/udp.py` instead.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from portfwd.router.base import Retransmission

T = TypeVar("T")

#: Larger than any PCP (1100 bytes) or NAT-PMP answer, so nothing is cut off.
_DATAGRAM = 2048


async def exchange(
    where: tuple[str, int],
    request: bytes,
    parse: Callable[[bytes], T],
    schedule: Iterator[float],
    *,
    label: str,
    source: str | None = None,
) -> T:
    """Like `router.udp.exchange`, blocking; an `async def` only to fit the drivers' awaits."""
    decide = Retransmission(where, label)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        try:
            if source:
                sock.bind((source, 0))
            sock.connect(where)
        except OSError as exc:
            raise decide.cannot_reach(exc) from exc
        for wait in schedule:
            deadline = time.monotonic() + wait
            try:
                sock.send(request)
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    try:
                        data = sock.recv(_DATAGRAM)
                    except TimeoutError:
                        break
                    if answer := decide.received(parse, data):
                        return answer[0]
            except OSError as exc:
                raise decide.failed(exc) from exc
        raise decide.silent()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Finish a driver call made with this module's `exchange`; it completes without suspending."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("a one-shot router call waited for the event loop; give it router.blocking.exchange")
