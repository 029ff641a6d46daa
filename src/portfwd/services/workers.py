"""`workers = N`: the shareable rules relayed by N processes that look like one instance.

The main process binds every listener (as root, if it must) with a socket per process
(services/rules.py): duplicates of shared accept queues for the C engine's TCP rules (whichever
process is awake takes the clients waiting), else a SO_REUSEPORT group (the kernel spreads new
clients over it). It serves the first socket itself and hands the others to N - 1 worker
processes it starts after dropping privileges (`python -m portfwd.cli.worker`, links in
workerwire.py).

- One instance: `status`, `/metrics` and the control socket are the main process's; before
  each read it asks every worker for its snapshot (`refresh`) and folds them in (merge.py).
  Reload is the main process's too: it tells each worker which rules it now relays, handing
  over the sockets of new ones; a worker keeps its live sessions of kept rules.
- A worker that dies is logged and started again (with a growing pause if it dies at once
  again). Until the new one has its rules, the main process serves the dead one's sockets
  itself (`RuleSet.adopt`): the kernel keeps giving them their share of new clients, and
  nobody is left waiting. A worker that cannot start (its interpreter out of reach of the
  user privileges dropped to, a different portfwd installed since) is not retried in a loop
  forever: its share stays with the main process, and one line says why.
- Shutdown: each worker stops accepting and drains for `drain_timeout`, as the main process
  does, and is waited for; one that will not end is killed.

Why processes and not threads: the relays are Python, and the GIL lets one thread run it at a
time. Why the main process serves too: with N = cores, N relaying processes use every core.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys
import time
from typing import Any

from portfwd import __version__, merge
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
#: How long a worker may take to start and take its rules.
HAND_OVER_TIMEOUT = 15.0
#: Restart pauses of a worker that keeps dying at once: 0.1 s doubling to 10 s; a worker that
#: ran for RESTART_RESET seconds starts the count again.
RESTART_MIN, RESTART_MAX, RESTART_RESET = 0.1, 10.0, 30.0
#: The exit code of a worker that is not the main process's version (cli/worker.py).
WRONG_VERSION = 3


class _Worker:
    """One worker process and the main process's end of its links."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.orders: socket.socket | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.has: dict[RuleSpec, int] = {}  # the rules it was handed, with their ids
        self.ready = False  # it took its rules (else the main process serves its sockets)
        self.started = 0.0
        self.restarts = 0
        self.last_exit = ""
        self.pause = RESTART_MIN
        self.answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.listen_task: asyncio.Task[None] | None = None
        self.last: Snapshot | None = None  # its last answer, for a status it is late for
        self.lock = asyncio.Lock()  # one hand-over at a time (a reload during a restart's)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def row(self) -> WorkerRow:
        running = self.process is not None and self.process.returncode is None and self.ready
        return WorkerRow(
            index=self.index,
            pid=self.pid,
            state="running" if running else "down",
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
        self._departed: list[Snapshot] = []  # what workers that ended had counted
        rules.health_changed = self._health  # the workers follow the main process's checks

    @property
    def active(self) -> bool:
        return False  # the rules are what runs; workers only share them

    @property
    def running(self) -> bool:
        """Whether any worker was started."""
        return bool(self._workers)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> list[PortfwdError]:
        return []  # launched after the privilege drop (Runtime calls launch)

    async def launch(self) -> None:
        """Start the workers, if any rule can be shared (called once everything is bound and
        privileges are dropped: the workers run as the user the main process became). Until a
        worker has its rules, this process serves its sockets."""
        if self.count <= 1 or not self.rules.shared(1) or self._workers:
            return
        self.state.refresher = self.refresh
        self.state.rate_reader = self.rates
        self._workers = [_Worker(index) for index in range(1, self.count)]
        for worker in self._workers:
            self._adopt(worker)
        await asyncio.gather(*(self._start(worker) for worker in self._workers))
        self._rows()

    async def _start(self, worker: _Worker) -> bool:
        """Start `worker` and hand it its rules; False (logged) when it could not be started."""
        try:
            await self._spawn(worker)
        except OSError as exc:
            worker.last_exit = f"cannot start: {(exc.strerror or str(exc)).lower()}"
            log.error(
                "worker %d %s (%s); this process serves its share",
                worker.index,
                worker.last_exit,
                sys.executable,
                extra=event("worker.failed", worker=worker.index, reason=worker.last_exit),
            )
            return False
        return True

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
                __version__,
                repr(self.drain_timeout),
                pass_fds=fds,
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            orders.close()
            answers.close()
            raise
        finally:
            orders_child.close()
            answers_child.close()
        worker.started = time.time()
        worker.ready = False
        orders.setblocking(False)  # a worker that stops reading is not waited for (see _order)
        worker.orders = orders
        worker.reader, worker.writer = await asyncio.open_unix_connection(sock=answers)
        worker.has = {}
        worker.listen_task = asyncio.get_running_loop().create_task(self._listen(worker))
        watch = asyncio.get_running_loop().create_task(self._watch(worker, worker.process))
        self._tasks.add(watch)
        watch.add_done_callback(self._tasks.discard)
        if self._stopping:
            self._order(worker, {"op": "stop", "drain": 0.0})
            return
        await self._hand_over(worker)

    def _order(self, worker: _Worker, order: dict[str, Any], fds: list[int] | None = None) -> bool:
        """Send an order; a worker whose link is full (it stopped reading) is killed, to be
        started again: False then."""
        if worker.orders is None:
            return False
        try:
            send_order(worker.orders, order, fds)
        except OSError as exc:
            log.warning("worker %d does not take orders (%s); stopping it", worker.index, exc)
            self._kill(worker)
            return False
        return True

    def _adopt(self, worker: _Worker) -> None:
        """Serve the worker's copies here while it does not; a failure (out of descriptors) is
        logged: the copies it could not take wait for the worker."""
        try:  # the rules a worker that is up relays stay its own
            self.rules.adopt(worker.index, set(worker.has) if worker.ready else None)
        except OSError as exc:
            log.error("worker %d is down and its sockets cannot be served here: %s", worker.index, exc)

    def _health(self, rule: RuleSpec, index: int, up: bool) -> None:
        """A backend's active checks changed their verdict: every worker follows it."""
        for worker in self._workers:
            ident = worker.has.get(rule)
            if ident is not None and worker.ready:
                self._order(worker, {"op": "health", "rule": ident, "backend": index, "up": up})

    def _kill(self, worker: _Worker) -> None:
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()

    async def _hand_over(self, worker: _Worker) -> None:
        """Tell `worker` which rules it relays now, handing over the sockets of those it has
        not; this process stops serving its copies of each rule the worker took. One at a
        time; a reload while the worker took its rules is caught up with at once."""
        async with worker.lock:
            for _ in range(3):  # the rules may change while the worker answers (a reload)
                applied = await self._hand_over_once(worker)
                if applied is None or applied == {rule for rule, _ in self.rules.shared(worker.index)}:
                    return

    async def _hand_over_once(self, worker: _Worker) -> set[RuleSpec] | None:
        """One round of `_hand_over`: the rules the worker now relays (None: it failed)."""
        if worker.orders is None:
            return None
        shared = self.rules.shared(worker.index)
        for rule, copies in shared:
            if rule in worker.has:
                continue
            ident = self._ids.setdefault(rule, len(self._ids) + 1)
            fds = [sock.fileno() for sock in copies]
            if not self._order(worker, {"op": "add", "id": ident, "rule": rule}, fds):
                return None
            worker.has[rule] = ident
        wanted = {rule for rule, _ in shared}
        worker.has = {rule: ident for rule, ident in worker.has.items() if rule in wanted}
        for name, mode in self.rules.modes.items():  # before its rules start: none slips through
            self._order(worker, {"op": "mode", "name": name, "mode": mode})
        try:
            order = {"op": "apply", "ids": list(worker.has.values())}
            answer = await self._ask(worker, order, HAND_OVER_TIMEOUT)
        except (TimeoutError, EOFError, OSError) as exc:
            why = exc or "no answer"
            log.warning("worker %d did not take its rules (%s); stopping it", worker.index, why)
            self._kill(worker)
            return None
        for line in answer.get("failures", []):
            log.error("worker %d: %s", worker.index, line)
        for rule, ident in worker.has.items():  # the backends the checks hold down, as of now
            for index, up in self.rules.verdicts(rule):
                self._order(worker, {"op": "health", "rule": ident, "backend": index, "up": up})
        worker.ready = True
        self.rules.release(worker.index, set(worker.has))
        self._rows()
        return set(worker.has)

    async def _ask(self, worker: _Worker, order: dict[str, Any], seconds: float) -> dict[str, Any]:
        self._question += 1
        ident = self._question
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        worker.answers[ident] = answer
        try:
            if not self._order(worker, {**order, "id": ident}):
                raise EOFError("the worker is gone")
            async with asyncio.timeout(seconds):
                return await answer
        finally:
            worker.answers.pop(ident, None)

    async def _listen(self, worker: _Worker) -> None:
        """Route the worker's answers to the questions waiting for them, until it goes."""
        assert worker.reader is not None
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ValueError):
            while True:
                answer = await read_answer(worker.reader)
                if answer.get("event") == "passive":  # its connects took a backend down there
                    rule = next(
                        (rule for rule, ident in worker.has.items() if ident == answer.get("rule")), None
                    )
                    if rule is not None:
                        self.rules.reported(rule, int(answer.get("backend", -1)))
                    continue
                waiting = worker.answers.get(answer.get("id", 0))
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)

    def _passive(self, worker: _Worker, report: dict[str, Any]) -> None:
        """A worker's connects took a backend down passively: the main process's next passing
        check of it is sent to the workers (Pool.reported)."""
        for rule, ident in worker.has.items():
            if ident == report.get("rule") and type(report.get("backend")) is int:
                self.rules.reported(rule, report["backend"])

    async def _watch(self, worker: _Worker, process: asyncio.subprocess.Process) -> None:
        """Wait for the worker to end; unless shutting down, serve its share here, log it, and
        start another (not one of another version: that would fail the same way)."""
        code = await process.wait()
        self._close_links(worker)
        if self._stopping:
            return
        self._adopt(worker)
        worker.ready = False
        self._depart(worker)
        ran = time.time() - worker.started
        if code == WRONG_VERSION:
            worker.last_exit = "not started again: the portfwd installed is not the one running"
            log.error(
                "worker %d (pid %d) %s; restart portfwd to run the new one on every core",
                worker.index,
                process.pid,
                worker.last_exit,
                extra=event("worker.failed", worker=worker.index, reason=worker.last_exit),
            )
            self._rows()
            return
        worker.last_exit = _exit_text(code)
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
        while not self._stopping:
            await asyncio.sleep(worker.pause)
            if self._stopping:
                return
            worker.restarts += 1
            if await self._start(worker):
                log.info(
                    "worker %d started again (pid %d)",
                    worker.index,
                    worker.pid,
                    extra=event("worker.started", worker=worker.index, pid=worker.pid),
                )
                self._rows()
                return
            worker.pause = min(RESTART_MAX, worker.pause * 2)

    def _depart(self, worker: _Worker) -> None:
        """Keep what a worker that ended had counted (its totals; nothing live), so the
        instance's counters never go back."""
        last, worker.last = worker.last, None
        if last is None:
            return
        rules = tuple(
            dataclasses.replace(
                row,
                connections_active=0,
                udp_flows_active=0,
                rate_up=0.0,
                rate_down=0.0,
                # its health is gone with it (merge.py reads a worker's "down" as its passive down)
                backends=tuple(
                    dataclasses.replace(b, sessions_active=0, state="up", why="") for b in row.backends
                ),
            )
            for row in last.rules
        )
        self._departed.append(dataclasses.replace(last, rules=rules, sessions=(), workers=()))
        if len(self._departed) > 1:  # folded into one: a crash loop must not grow this
            merged = merge.rules(self._departed[0].rules, [item.rules for item in self._departed[1:]])
            closed = [row for item in self._departed for row in item.closed]
            self._departed = [
                dataclasses.replace(self._departed[0], rules=tuple(merged), closed=tuple(closed[-200:]))
            ]

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
    async def rates(self) -> dict[str, tuple[float, float]]:
        """Each rule's byte rates (up, down) summed over the running workers."""
        live = [worker for worker in self._workers if worker.orders is not None and worker.ready]
        answers = await asyncio.gather(
            *(self._ask(worker, {"op": "rates"}, ANSWER_TIMEOUT) for worker in live), return_exceptions=True
        )
        summed: dict[str, tuple[float, float]] = {}
        for answer in answers:
            rules = answer.get("rules") if isinstance(answer, dict) else None
            for name, pair in (rules if isinstance(rules, dict) else {}).items():
                up, down = summed.get(name, (0.0, 0.0))
                summed[name] = (up + float(pair[0]), down + float(pair[1]))
        return summed

    async def refresh(self, limit: int | None = None) -> None:
        """Ask every running worker for its snapshot (at once, each for up to ANSWER_TIMEOUT),
        with at most `limit` live sessions each; a worker late to answer is shown as it last
        answered."""
        self._rows()
        live = [worker for worker in self._workers if worker.orders is not None and worker.ready]
        order: dict[str, Any] = {"op": "status"} if limit is None else {"op": "status", "limit": limit}
        answers = await asyncio.gather(
            *(self._ask(worker, order, ANSWER_TIMEOUT) for worker in live), return_exceptions=True
        )
        omitted = 0
        for worker, answer in zip(live, answers, strict=True):
            if isinstance(answer, dict):
                with contextlib.suppress(StatusError):
                    worker.last = Snapshot.from_json(answer.get("status"))
                left_out = answer.get("omitted", 0)
                omitted += left_out if type(left_out) is int else 0
        peers = [worker.last for worker in live if worker.last is not None]
        self.state.peers = [*peers, *self._departed]
        self.state.peers_omitted = omitted

    # ------------------------------------------------------------------ operator actions
    async def set_mode(self, name: str, mode: str) -> None:
        """Every worker follows rule `name`'s mode (RuleSet.set_mode), now and for the rules it
        is handed later; returns once each running worker has (a client that connects after
        the API answered meets the new mode in every process)."""
        order = {"op": "mode", "name": name, "mode": mode}
        live = [worker for worker in self._workers if worker.orders is not None and worker.ready]
        for worker in self._workers:
            if worker not in live:
                self._order(worker, order)  # starting: it takes it before its rules
        await asyncio.gather(
            *(self._ask(worker, order, ANSWER_TIMEOUT) for worker in live), return_exceptions=True
        )

    async def settled(self) -> None:
        """Return once every running worker has carried out the orders sent so far (each takes
        them in order: its answer to this one comes after): a health verdict a check just sent,
        say, so that the API answers only when every process follows it."""
        live = [worker for worker in self._workers if worker.orders is not None and worker.ready]
        await asyncio.gather(
            *(self._ask(worker, {"op": "sync"}, ANSWER_TIMEOUT) for worker in live), return_exceptions=True
        )

    async def end_session(self, ident: int, reason: str) -> bool:
        """Close session `ident` in whichever worker relays it; False when none does."""
        live = [worker for worker in self._workers if worker.orders is not None and worker.ready]
        answers = await asyncio.gather(
            *(
                self._ask(worker, {"op": "close", "session": ident, "reason": reason}, ANSWER_TIMEOUT)
                for worker in live
            ),
            return_exceptions=True,
        )
        return any(isinstance(answer, dict) and answer.get("closed") is True for answer in answers)

    # ------------------------------------------------------------------ reload
    async def retire(self, part: tuple[RuleSpec, ...]) -> Change:
        """The rule set retired what the new plan dropped: the workers let go of it too, before
        anything binds its ports again."""
        await asyncio.gather(*(self._hand_over(worker) for worker in self._workers if worker.orders))
        return Change()

    async def apply(self, part: tuple[RuleSpec, ...]) -> Change:
        if self.count > 1 and not self._workers and self.rules.shared(1):
            await self.launch()  # the first shareable rule came with this reload
            return Change()
        for worker in self._workers:
            self._adopt(worker)  # new rules: served here until the worker has them
        await asyncio.gather(*(self._hand_over(worker) for worker in self._workers if worker.orders))
        return Change()

    # ------------------------------------------------------------------ stop
    async def stop_accepting(self) -> None:
        """Every worker stops accepting and drains its sessions (each on its own clock)."""
        self._stopping = True
        for worker in self._workers:
            self._order(worker, {"op": "stop", "drain": self.drain_timeout})

    def abort(self) -> None:
        """A second signal: the workers close their sessions now, as the main process does."""
        for worker in self._workers:
            self._order(worker, {"op": "stop", "drain": 0.0})

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
        self.state.rate_reader = None
        self.state.peers = []

    async def sessions(self) -> int:
        """Live sessions in the workers (for the drain's line)."""
        await self.refresh()
        return sum(len(peer.sessions) for peer in self.state.peers)


def _exit_text(code: int) -> str:
    """How a process ended, in words: `exited with 1`, `killed by SIGKILL`."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with {code}"
