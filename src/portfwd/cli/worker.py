"""A worker process (`workers = N`): relays the rules the main process hands it, on its sockets.

Started by the main process (services/workers.py) as `python -m portfwd.cli.worker ORDERS
ANSWERS INDEX`, after the main process dropped its privileges. It binds nothing: every
listening socket comes over the ORDERS link (workerwire.py). It logs like the main process (the
settings come in PORTFWD_LOG_SETUP) to the same stderr, and answers status questions with a
snapshot of its own, which the main process folds into the instance's.

Signals: SIGINT and SIGHUP are the main process's to act on (a terminal's Ctrl-C reaches the
whole process group); SIGTERM (systemd stops the whole unit) stops accepting and drains, as the
main process does. When the main process goes away, the worker stops too (PR_SET_PDEATHSIG and
the end of the link), so no worker outlives its instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from portfwd.addr import HostPorts
from portfwd.services.rules import RuleSet
from portfwd.services.sampler import Sampler
from portfwd.services.workerwire import frame, receive_order
from portfwd.specs import RuleSpec
from portfwd.state import State

log = logging.getLogger("portfwd.worker")

_PR_SET_PDEATHSIG = 1
#: Session ids of worker INDEX start at INDEX * ID_SPAN + 1: unique in the merged status.
ID_SPAN = 1_000_000_000


def sockets_of(rule: RuleSpec) -> int:
    """How many listening sockets a rule has, in bind order: per port, TCP then UDP."""
    ports = len(rule.listen.ports) if isinstance(rule.listen, HostPorts) else 1
    return ports * (int(rule.protocol.has_tcp) + int(rule.protocol.has_udp))


class Worker:
    """The worker's state, rules and the orders it follows."""

    def __init__(self, orders: socket.socket, answers: socket.socket, index: int) -> None:
        self.orders = orders
        self.answers = answers
        self.index = index
        self.state = State(first_id=index * ID_SPAN + 1)
        self.state.kind = "worker"
        self.known: dict[int, RuleSpec] = {}
        self.handed: dict[RuleSpec, list[socket.socket]] = {}
        self.loose: list[int] = []  # descriptors of `fds` orders, for the order that follows
        self.rules = RuleSet((), self.state, given=self._given)
        self.writer: asyncio.StreamWriter | None = None
        self.done = asyncio.Event()
        self.drain = 0.0
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def _given(self, rule: RuleSpec) -> list[socket.socket] | None:
        return list(self.handed.pop(rule, []))

    def on_orders(self) -> None:
        """Reader callback: take every order waiting; descriptors become sockets at once."""
        while True:
            try:
                got = receive_order(self.orders)
            except (EOFError, OSError):
                self.stop(0.0)
                return
            if got is None:
                return
            order, fds = got
            fds = self.loose + fds
            self.loose = []
            if order.get("op") == "fds":
                self.loose = fds
                continue
            if order.get("op") == "add":
                rule = order["rule"]
                self.known[order["id"]] = rule
                self.handed[rule] = [socket.socket(fileno=fd) for fd in fds]
                continue
            for fd in fds:  # no other order carries descriptors
                os.close(fd)
            self.queue.put_nowait(order)

    def stop(self, drain: float) -> None:
        self.drain = drain
        self.done.set()

    async def answer(self, answer: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(frame(answer))
            await self.writer.drain()

    async def follow(self) -> None:
        """Carry out orders in the order they came (apply may take a moment; status waits)."""
        while True:
            order = await self.queue.get()
            op = order.get("op")
            if op == "apply":
                wanted = tuple(self.known[ident] for ident in order["ids"] if ident in self.known)
                change = await self.rules.apply(wanted)
                for sockets in self.handed.values():  # handed for a rule not started: not ours
                    for sock in sockets:
                        sock.close()
                self.handed.clear()
                await self.answer(
                    {"id": order["id"], "failures": [failure.line() for failure in change.failures]}
                )
            elif op == "status":
                await self.answer({"id": order["id"], "status": self.state.status().to_json()})
            elif op == "stop":
                self.stop(float(order.get("drain", 0.0)))


async def serve(orders_fd: int, answers_fd: int, index: int) -> None:
    orders = socket.socket(fileno=orders_fd)
    orders.setblocking(False)
    answers = socket.socket(fileno=answers_fd)
    worker = Worker(orders, answers, index)
    loop = asyncio.get_running_loop()
    _, worker.writer = await asyncio.open_unix_connection(sock=answers)
    loop.add_signal_handler(signal.SIGTERM, worker.stop, -1.0)
    async with asyncio.TaskGroup() as tasks:
        await worker.rules.start()
        sampler = Sampler(worker.state, tasks)
        await sampler.start()
        loop.add_reader(orders.fileno(), worker.on_orders)
        following = tasks.create_task(worker.follow())
        await worker.done.wait()
        loop.remove_reader(orders.fileno())
        await worker.rules.stop_accepting()
        drain = worker.drain
        if drain < 0:  # SIGTERM: the drain the main process was configured with is not known here
            drain = 10.0
        if worker.state.sessions and drain > 0:
            drained = asyncio.Event()
            worker.state.on_empty = drained.set
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain):
                    await drained.wait()
        following.cancel()
        await sampler.stop()
        await worker.rules.stop()
    worker.writer.close()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    orders_fd, answers_fd, index = (int(item) for item in argv)
    from portfwd.cli.console import setup_logging

    settings = json.loads(os.environ.get("PORTFWD_LOG_SETUP", "{}") or "{}")
    setup_logging(
        int(settings.get("verbose", 0)),
        bool(settings.get("quiet", False)),
        str(settings.get("format", "text")),
        settings.get("file"),
    )
    try:
        import uvloop

        uvloop.run(serve(orders_fd, answers_fd, index))
    except Exception:  # the worker's boundary: say why, and let the main process start another
        log.exception("worker %d failed", index)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
