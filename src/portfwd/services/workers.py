"""`workers = N`: the shareable rules relayed by N processes that look like one instance.

The main process binds every listener (as root, if it must) as a SO_REUSEPORT group, one
socket per process (services/rules.py), serves the first socket of each group itself and hands
the others to N - 1 worker processes it starts after dropping privileges (`python -m
portfwd.cli.worker`, links in workerwire.py). The kernel spreads new clients over the group.

- One instance: `status`, `/metrics` and the control socket are the main process's; before
  each read it asks every worker for its snapshot (`refresh`) and folds them in (merge.py).
  Reload is the main process's too: it tells each worker which rules it now relays, handing
  over the sockets of new ones; a worker keeps its live sessions of kept rules.
- A worker that dies is logged and started again (with a growing pause if it dies at once
  again); the main process still holds its sockets, so the clients queued on them wait for
  the new worker instead of being lost. Nothing else stops.
- Shutdown: each worker stops accepting and drains for `drain_timeout`, as the main process
  does, and is waited for; one that will not end is killed.

Why processes and not threads: the relays are Python, and the GIL lets one thread run it at a
time. Why the main process serves too: with N = cores, N relaying processes use every core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from typing import Any

from portfwd.errors import PortfwdError
from portfwd.logevents import event
from portfwd.services.base import Change, Reloadable
from portfwd.services.rules import RuleSet
from portfwd.services.workerwire import pairs, read_answer, send_order
from portfwd.specs import RuleSpec
from portfwd.state import State
from portfwd.status import Snapshot, StatusError, WorkerRow

log = logging.getLogger(__name__)

#: How long a status question waits for a worker's answer.
ANSWER_TIMEOUT = 2.0
#: Restart pauses of a worker that keeps dying at once: 0.1 s doubling to 10 s; a worker that
#: ran for RESTART_RESET seconds starts the count again.
RESTART_MIN, RESTART_MAX, RESTART_RESET = 0.1, 10.0, 30.0


class _Worker:
    """One worker process and the main process's end of its links."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.orders: socket.socket | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.has: dict[RuleSpec, int] = {}  # the rules it was handed, with their ids
        self.started = 0.0
        self.restarts = 0
        self.last_exit = ""
        self.pause = RESTART_MIN
        self.answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.listen_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def row(self) -> WorkerRow:
        running = self.process is not None and self.process.returncode is None
        return WorkerRow(
            index=self.index,
            pid=self.pid,
            state="running" if running else "restarting",
            started=self.started,
            restarts=self.restarts,
            last_exit=self.last_exit,
        )


class Workers(Reloadable[tuple[RuleSpec, ...]]):
    """Starts, feeds, asks, restarts and stops the worker processes."""

    name = "workers"

    def __init__(self, rules: RuleSet, state: State, count: int, drain_timeout: float) -> None:
        self.rules = rules
        self.state = state
        self.count = count
        self.drain_timeout = drain_timeout
        self._workers: list[_Worker] = []
        self._ids: dict[RuleSpec, int] = {}
        self._question = 0
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> bool:
        return False  # the rules are what runs; workers only share them

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> list[PortfwdError]:
        return []  # launched after the privilege drop (Runtime calls launch)

    async def launch(self) -> None:
        """Start the workers, if any rule can be shared (called once everything is bound and
        privileges are dropped: the workers run as the user the main process became)."""
        if self.count <= 1 or not self.rules.shared(1):
            return
        self.state.refresher = self.refresh
        for index in range(1, self.count):
            worker = _Worker(index)
            self._workers.append(worker)
            await self._spawn(worker)
        self._rows()

    async def _spawn(self, worker: _Worker) -> None:
        (orders, orders_child), (answers, answers_child) = pairs()
        fds = (orders_child.fileno(), answers_child.fileno())
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "portfwd.cli.worker",
                str(fds[0]),
                str(fds[1]),
                str(worker.index),
                pass_fds=fds,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            orders_child.close()
            answers_child.close()
        worker.started = time.time()
        orders.settimeout(5.0)  # orders are small and the worker reads them at once
        worker.orders = orders
        worker.reader, worker.writer = await asyncio.open_unix_connection(sock=answers)
        worker.has = {}
        worker.listen_task = asyncio.get_running_loop().create_task(self._listen(worker))
        watch = asyncio.get_running_loop().create_task(self._watch(worker, worker.process))
        self._tasks.add(watch)
        watch.add_done_callback(self._tasks.discard)
        await self._hand_over(worker)

    async def _hand_over(self, worker: _Worker) -> None:
        """Tell `worker` which rules it relays now, handing over the sockets of those it has not."""
        shared = self.rules.shared(worker.index)
        if worker.orders is None:
            return
        try:
            for rule, copies in shared:
                if rule in worker.has:
                    continue
                ident = self._ids.setdefault(rule, len(self._ids) + 1)
                send_order(
                    worker.orders, {"op": "add", "id": ident, "rule": rule}, [s.fileno() for s in copies]
                )
                worker.has[rule] = ident
            wanted = {rule for rule, _ in shared}
            worker.has = {rule: ident for rule, ident in worker.has.items() if rule in wanted}
            await self._ask(worker, {"op": "apply", "ids": list(worker.has.values())}, 10.0)
        except (OSError, TimeoutError, EOFError, asyncio.IncompleteReadError) as exc:
            log.warning("worker %d: could not hand over its rules: %s", worker.index, exc)

    async def _ask(self, worker: _Worker, order: dict[str, Any], seconds: float) -> dict[str, Any]:
        assert worker.orders is not None
        self._question += 1
        order = {**order, "id": self._question}
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        worker.answers[self._question] = answer
        try:
            send_order(worker.orders, order)
            async with asyncio.timeout(seconds):
                return await answer
        finally:
            worker.answers.pop(order["id"], None)

    async def _listen(self, worker: _Worker) -> None:
        """Route the worker's answers to the questions waiting for them, until it goes."""
        assert worker.reader is not None
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ValueError):
            while True:
                answer = await read_answer(worker.reader)
                waiting = worker.answers.get(answer.get("id", 0))
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)

    async def _watch(self, worker: _Worker, process: asyncio.subprocess.Process) -> None:
        """Wait for the worker to end; unless shutting down, log it and start another."""
        code = await process.wait()
        self._close_links(worker)
        if self._stopping:
            return
        worker.last_exit = _exit_text(code)
        ran = time.time() - worker.started
        worker.pause = RESTART_MIN if ran > RESTART_RESET else min(RESTART_MAX, worker.pause * 2)
        log.warning(
            "worker %d (pid %d) %s after %.1fs; starting it again in %gs",
            worker.index,
            process.pid,
            worker.last_exit,
            ran,
            worker.pause,
            extra=event(
                "worker.died",
                worker=worker.index,
                pid=process.pid,
                reason=worker.last_exit,
                delay_s=worker.pause,
            ),
        )
        self._rows()
        await asyncio.sleep(worker.pause)
        if self._stopping:
            return
        worker.restarts += 1
        await self._spawn(worker)
        log.info(
            "worker %d started again (pid %d)",
            worker.index,
            worker.pid,
            extra=event("worker.started", worker=worker.index, pid=worker.pid),
        )
        self._rows()

    def _close_links(self, worker: _Worker) -> None:
        if worker.listen_task is not None:
            worker.listen_task.cancel()
        if worker.writer is not None:
            worker.writer.close()
        if worker.orders is not None:
            worker.orders.close()
        worker.orders = worker.reader = worker.writer = None
        for waiting in worker.answers.values():
            if not waiting.done():
                waiting.set_exception(EOFError("the worker ended"))

    def _rows(self) -> None:
        self.state.workers = [worker.row() for worker in self._workers]

    # ------------------------------------------------------------------ one instance
    async def refresh(self) -> None:
        """Ask every running worker for its snapshot (at once, each for up to ANSWER_TIMEOUT);
        a worker that does not answer is left out of this picture."""
        self._rows()
        live = [worker for worker in self._workers if worker.orders is not None]
        answers = await asyncio.gather(
            *(self._ask(worker, {"op": "status"}, ANSWER_TIMEOUT) for worker in live), return_exceptions=True
        )
        peers = []
        for answer in answers:
            if isinstance(answer, dict):
                with contextlib.suppress(StatusError):
                    peers.append(Snapshot.from_json(answer.get("status")))
        self.state.peers = peers

    # ------------------------------------------------------------------ reload
    async def retire(self, part: tuple[RuleSpec, ...]) -> Change:
        """The rule set retired what the new plan dropped: the workers let go of it too, before
        anything binds its ports again."""
        for worker in self._workers:
            await self._hand_over(worker)
        return Change()

    async def apply(self, part: tuple[RuleSpec, ...]) -> Change:
        if self.count > 1 and not self._workers and self.rules.shared(1):
            await self.launch()  # the first shareable rule came with this reload
            return Change()
        for worker in self._workers:
            await self._hand_over(worker)
        return Change()

    # ------------------------------------------------------------------ stop
    async def stop_accepting(self) -> None:
        """Every worker stops accepting and drains its sessions (each on its own clock)."""
        self._stopping = True
        for worker in self._workers:
            if worker.orders is not None:
                with contextlib.suppress(OSError):
                    send_order(worker.orders, {"op": "stop", "drain": self.drain_timeout})

    async def stop(self) -> None:
        """Wait for the workers to end (each drains for drain_timeout since stop_accepting, then
        closes what is left), then kill what has not ended."""
        self._stopping = True
        processes = [worker.process for worker in self._workers if worker.process is not None]
        waiting = [asyncio.ensure_future(process.wait()) for process in processes]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=self.drain_timeout + 5.0)
            for process in processes:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if late:
                await asyncio.wait(late, timeout=5.0)
        for task in list(self._tasks):
            task.cancel()
        for worker in self._workers:
            self._close_links(worker)
        self.state.refresher = None
        self.state.peers = []


def _exit_text(code: int) -> str:
    """How a process ended, in words: `exited with 1`, `killed by SIGKILL`."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with {code}"
