"""A worker process (`workers = N`): relays the rules the main process hands it, on its sockets.

Started by the main process (services/workers.py) as `python -m portfwd.cli.worker ORDERS
ANSWERS INDEX VERSION DRAIN`, after the main process dropped its privileges. A worker of
another version than its main process (portfwd upgraded underneath a running instance) exits
at once with WRONG_VERSION: it would not read the main process's orders right. It binds nothing: every
listening socket comes over the ORDERS link (workerwire.py). It logs like the main process (the
settings come in PORTFWD_LOG_SETUP) to the same stderr, and answers status questions with a
snapshot of its own, which the main process folds into the instance's.

Signals: SIGINT and SIGHUP are the main process's to act on (a terminal's Ctrl-C reaches the
whole process group); SIGTERM (systemd stops the whole unit) stops accepting and drains for
the instance's `drain_timeout`, as the main process does; a `stop` order with no drain (the
second signal to the main process) closes what is left at once. When the main process goes
away, the worker stops too (PR_SET_PDEATHSIG and the end of the link), so no worker outlives
its instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
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
        self.rules.passive_down = self._passive_down
        self.writer: asyncio.StreamWriter | None = None
        self.done = asyncio.Event()
        self.aborted = asyncio.Event()
        self.drain = 0.0
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def _passive_down(self, rule: RuleSpec, backend: int) -> None:
        """Tell the main process (unasked) that this process's connects took a backend down:
        its next passing check is then sent here too, and ends it (`impose`)."""
        ident = next((ident for ident, known in self.known.items() if known == rule), None)
        if ident is not None and self.writer is not None:
            self.writer.write(frame({"event": "passive", "rule": ident, "backend": backend}))

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
        """Stop accepting and drain for `drain` seconds; a second stop with none ends the drain."""
        if self.done.is_set():
            if drain <= 0:
                self.aborted.set()
            return
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
                # What lives as long as the process, out of the cyclic GC's full scans, as the
                # main process does once bound (bench/RESULTS.md, D8).
                gc.collect()
                gc.freeze()
                await self.answer(
                    {"id": order["id"], "failures": [failure.line() for failure in change.failures]}
                )
            elif op == "health":
                rule = self.known.get(order["rule"])
                if rule is not None:
                    self.rules.impose(rule, int(order["backend"]), bool(order["up"]))
            elif op == "status":
                limit = order.get("limit")
                status = self.state.status(limit if type(limit) is int else None).to_json()
                omitted = self.state.sessions_omitted if type(limit) is int else 0
                await self.answer({"id": order["id"], "status": status, "omitted": omitted})
            elif op == "rates":
                rates = {name: (rule.rate_up, rule.rate_down) for name, rule in self.state.rules.items()}
                await self.answer({"id": order["id"], "rules": rates})
            elif op == "mode":
                self.rules.set_mode(str(order["name"]), str(order["mode"]), strict=False)
                if "id" in order:  # the API waits for every worker to follow
                    await self.answer({"id": order["id"]})
            elif op == "sync":  # the orders before this one are carried out
                await self.answer({"id": order["id"]})
            elif op == "close":
                closed = self.state.end(int(order["session"]), str(order["reason"]))
                await self.answer({"id": order["id"], "closed": closed})
            elif op == "stop":
                self.stop(float(order.get("drain", 0.0)))


async def serve(orders_fd: int, answers_fd: int, index: int, drain: float) -> None:
    orders = socket.socket(fileno=orders_fd)
    orders.setblocking(False)
    answers = socket.socket(fileno=answers_fd)
    worker = Worker(orders, answers, index)
    loop = asyncio.get_running_loop()
    _, worker.writer = await asyncio.open_unix_connection(sock=answers)
    loop.add_signal_handler(signal.SIGTERM, worker.stop, drain)
    async with asyncio.TaskGroup() as tasks:
        await worker.rules.start()
        sampler = Sampler(worker.state, tasks)
        await sampler.start()
        loop.add_reader(orders.fileno(), worker.on_orders)
        following = tasks.create_task(worker.follow())
        await worker.done.wait()
        await worker.rules.stop_accepting()
        if worker.state.sessions and worker.drain > 0 and not worker.aborted.is_set():
            worker.state.on_empty = worker.aborted.set  # drained: the same end as an abort
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(worker.drain):
                    await worker.aborted.wait()
        loop.remove_reader(orders.fileno())
        following.cancel()
        await sampler.stop()
        await worker.rules.stop()
    worker.writer.close()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    from portfwd import __version__
    from portfwd.services.workers import WRONG_VERSION

    orders_text, answers_text, index_text, version, drain_text = argv
    if version != __version__:
        print(f"portfwd worker: this is portfwd {__version__}, the instance runs {version}", file=sys.stderr)
        return WRONG_VERSION
    orders_fd, answers_fd, index, drain = (
        int(orders_text),
        int(answers_text),
        int(index_text),
        float(drain_text),
    )
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

        uvloop.run(serve(orders_fd, answers_fd, index, drain))
    except Exception:  # the worker's boundary: say why, and let the main process start another
        log.exception("worker %d failed", index)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
