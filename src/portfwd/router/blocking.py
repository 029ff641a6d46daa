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

from portfwd.router.base import Deadline, Retransmission

T = TypeVar("T")

#: Larger than any PCP (1100 bytes) or NAT-PMP answer, so nothing is cut off.
_DATAGRAM = 2048


class Exchange:
    """Like `router.udp.exchange`, blocking; `__call__` is `async` only to fit the drivers' awaits.

    With a `Deadline` (a one-shot command's `--timeout`) every wait is cut to what is left of
    it, and the deadline is told while an answer is awaited, so it can say what is being tried.
    """

    def __init__(self, deadline: Deadline | None = None) -> None:
        self.deadline = deadline

    async def __call__(
        self,
        where: tuple[str, int],
        request: bytes,
        parse: Callable[[bytes], T],
        schedule: Iterator[float],
        *,
        label: str,
        source: str | None = None,
    ) -> T:
        decide = Retransmission(where, label)
        deadline = self.deadline
        if deadline is not None:
            deadline.asking(label, f"{where[0]}:{where[1]}")
        began = time.monotonic()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            try:
                if source:
                    sock.bind((source, 0))
                sock.connect(where)
            except OSError as exc:
                raise decide.cannot_reach(exc) from exc
            for wait in schedule:
                until = time.monotonic() + wait
                if deadline is not None:
                    if deadline.left() <= 0:
                        raise deadline.expired()
                    until = min(until, deadline.end)
                try:
                    sock.send(request)
                    # Bounded by time: every pass either reads a datagram or times out, and a
                    # timeout ends the try, except once when the deadline has something to say.
                    while (left := until - time.monotonic()) > 0:
                        if deadline is not None:
                            left = min(left, deadline.waiting(label, where[0]))
                        sock.settimeout(left)
                        try:
                            data = sock.recv(_DATAGRAM)
                        except TimeoutError:
                            continue
                        if answer := decide.received(parse, data):
                            return answer[0]
                except OSError as exc:
                    raise decide.failed(exc) from exc
            if deadline is not None and deadline.left() <= 0:
                raise deadline.expired()
            raise decide.silent(time.monotonic() - began)


#: Without a deadline: the drivers' own schedules (the RFCs', or `--tries`).
exchange = Exchange()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Finish a driver call made with this module's `exchange`; it completes without suspending."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("a one-shot router call waited for the event loop; give it router.blocking.exchange")
