"""The forward rules as one service: bind, announce and close their listeners, keep them on reload.

Rules are keyed by their (frozen) spec, so a reload can tell which rules are unchanged (kept
with their listeners and live sessions), removed (stop listening; their sessions drain) or
new (started). The relay resources the rules share live here too: the splice pipe pool, the
epoll set of the splice relays and the UDP forwarders' recvmmsg/sendmmsg slots.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from portfwd.addr import HostPorts, UnixPath
from portfwd.counters import BackendStats
from portfwd.errors import ActionError, BindError, PortfwdError
from portfwd.logevents import event
from portfwd.relay import transparent
from portfwd.relay.balance import Backend, Pool
from portfwd.relay.bandwidth import Shaper
from portfwd.relay.describe import relay_path, targets_text
from portfwd.relay.forwarder import RelayPath, TcpForwarder
from portfwd.relay.health import Checker
from portfwd.relay.limits import Limits
from portfwd.relay.listener import (
    DescriptorListener,
    bind_group,
    bind_ip,
    bind_shared,
    bind_unix,
    shared_queues,
)
from portfwd.relay.mmsg import Batch
from portfwd.relay.native import NativeListener, NativeRelays, native_reason
from portfwd.relay.native import available as native_available
from portfwd.relay.nativeforward import NativeForwarder
from portfwd.relay.poller import Poller
from portfwd.relay.splice import PipePool, splice_available
from portfwd.relay.udp import UdpForwarder
from portfwd.services.base import Change, Owned, Reloadable
from portfwd.specs import RuleSpec
from portfwd.state import Listener, State

log = logging.getLogger(__name__)


#: A TCP listener and what serves its clients: Python's (relay/forwarder.py) or the C engine's
#: (relay/native.py), which have the same interface.
Accepting = DescriptorListener | NativeListener
Forwarder = TcpForwarder | NativeForwarder


@dataclass(slots=True)
class _RuleRun:
    """What one rule has running: its TCP listeners with forwarders, and UDP forwarders."""

    tcp: list[tuple[Accepting, Forwarder]]
    udp: list[UdpForwarder]
    checker: Checker | None = None
    pool: Pool | None = None
    #: With workers: each worker's copies of the listeners (bind order), held open here so a
    #: worker that dies loses none of the clients queued on them.
    siblings: list[list[socket.socket]] | None = None
    #: How many accept queues the processes share for each TCP listener (`bind_shared`: worker
    #: w's copy is a duplicate of queue w % queues, this process's is queue 0); 0: a socket of
    #: a SO_REUSEPORT group each.
    queues: int = 0
    #: Per worker that is down: this process serving its copies meanwhile.
    adopted: dict[int, list[Accepting | UdpForwarder]] = field(default_factory=dict)

    def release(self, worker: int) -> None:
        """Stop serving worker `worker`'s copies (it serves them again); they stay open."""
        for item in self.adopted.pop(worker, []):
            if isinstance(item, UdpForwarder):
                item.close("worker back")
            else:
                item.close()

    def close_listeners(self) -> None:
        """Stop listening (and checking backends); a UDP forwarder also ends its flows (they
        have no listener of their own)."""
        for worker in list(self.adopted):
            self.release(worker)
        if self.checker is not None:
            self.checker.stop()
        for copies in self.siblings or ():
            for sock in copies:
                sock.close()
        self.siblings = None
        for listener, _ in self.tcp:
            listener.close()
        for udp in self.udp:
            udp.close("rule removed")


def _accepting(listener: socket.socket, forwarder: Forwarder) -> Accepting:
    """Wire a listening socket to its forwarder, both ways (serve clients; pause on exhaustion)."""
    if isinstance(forwarder, NativeForwarder):
        return NativeListener(listener, forwarder)
    accepting = DescriptorListener(listener, forwarder.serve, forwarder.label)
    forwarder.exhausted = accepting.pause
    return accepting


def _impose(run: _RuleRun, mode: str) -> None:
    """Make every listener of `run` (and the copies it serves for a worker that is down) follow
    `mode`: "paused" holds accepts, "draining" refuses new clients, "" takes them."""
    adopted = [item for items in run.adopted.values() for item in items]
    listeners = [accepting for accepting, _ in run.tcp]
    listeners += [item for item in adopted if not isinstance(item, UdpForwarder)]
    for accepting in listeners:
        if mode == "paused":
            accepting.hold()
        else:
            accepting.release()
    for _, forwarder in run.tcp:
        forwarder.refusing = mode == "draining"
    for udp in [*run.udp, *(item for item in adopted if isinstance(item, UdpForwarder))]:
        udp.refusing = mode == "draining"
        if mode == "paused":
            udp.hold()
        else:
            udp.release()


def shareable(rule: RuleSpec) -> bool:
    """Whether every worker may relay a rule: an IP listener, and nothing counted across its
    connections that must stay one count (connection limits, a rule-wide bandwidth). Other
    rules are relayed by the main process alone."""
    return not isinstance(rule.listen, UnixPath) and not (
        rule.max_connections or rule.max_connections_per_source or rule.rate or rule.bandwidth
    )


#: A worker's sockets for a rule, handed over by the main process (bind order), or None.
Given = Callable[[RuleSpec], list[socket.socket] | None]


class RuleSet(Reloadable[tuple[RuleSpec, ...]]):
    """Runs the [[forward]] rules; a rule that cannot bind is reported and skipped.

    With `workers` > 1 (the main process), each shareable rule's listeners are bound with a
    socket per process: shared accept queues (`bind_shared`: the C engine's TCP rules) or a
    SO_REUSEPORT group. This process serves the first, and keeps the others for the workers
    (`siblings`). In a worker, `given` hands over those sockets instead of binding, and the
    lines the main process logs already are not repeated.
    """

    name = "rules"

    def __init__(
        self,
        rules: tuple[RuleSpec, ...],
        state: State,
        *,
        user: str | None = None,
        workers: int = 1,
        given: Given | None = None,
    ) -> None:
        self.rules = rules
        self.state = state
        self.user = user  #: the user privileges drop to (a transparent rule's check asks)
        self.workers = workers
        self.given = given
        #: Told of each backend's active-check verdict as it changes (the workers follow it).
        self.health_changed: Callable[[RuleSpec, int, bool], None] | None = None
        #: A worker: told when its own connects take a backend down passively (it tells the
        #: main process, whose next passing check then reaches it: `reported`).
        self.passive_down: Callable[[RuleSpec, int], None] | None = None
        #: Whether splice(2) works here; decided at start, before the first rule binds.
        self.splice = False
        self._runs: dict[RuleSpec, _RuleRun] = {}
        self._retired: list[_RuleRun] = []  # removed by a reload; their sessions drain
        self._pipes = PipePool()
        self._poller = Poller()  # the splice relays' sockets
        self._native = NativeRelays(state)  # the C engine, for the rules it can relay
        self._batch: Batch | None = None  # the UDP forwarders' recvmmsg/sendmmsg slots
        self._batch_tried = False
        #: Rules paused or draining (by name, so a reload that changes a rule keeps its mode).
        self.modes: dict[str, str] = {}

    # ------------------------------------------------------------------ what runs
    @property
    def active(self) -> bool:
        return bool(self._runs)

    @property
    def running(self) -> int:
        """How many rules listen."""
        return len(self._runs)

    @property
    def sockets(self) -> int:
        """How many listening sockets the rules have."""
        return sum(len(run.tcp) + len(run.udp) for run in self._runs.values())

    def tcp_forwarders(self) -> list[Forwarder]:
        """The running rules' TCP forwarders, one per listening port (tests look at which path
        relays them: Python's or the C engine's)."""
        return [forwarder for run in self._runs.values() for _, forwarder in run.tcp]

    def udp_forwarders(self) -> list[UdpForwarder]:
        """The running rules' UDP forwarders (tests look at how they move datagrams)."""
        return [udp for run in self._runs.values() for udp in run.udp]

    def adopt(self, worker: int, skip: set[RuleSpec] | None = None) -> None:
        """Serve worker `worker`'s copies of every shared listener here, while it is down: the
        kernel keeps giving that copy its share of new clients, who must not wait for it (a
        copy of this process's own accept queue is skipped: served already). The copies are
        served through duplicates, so releasing them leaves the originals open."""
        for rule, run in self._runs.items():
            if run.siblings is None or worker in run.adopted or (skip and rule in skip):
                continue
            serving: list[Accepting | UdpForwarder] = run.adopted.setdefault(worker, [])
            streams = iter(run.tcp)
            datagrams = iter(run.udp)
            for sock in run.siblings[worker - 1]:
                if run.queues and worker % run.queues == 0 and sock.type == socket.SOCK_STREAM:
                    next(streams)  # this process accepts from that queue already
                    continue
                copy = sock.dup()  # (EMFILE: raised to the caller; what started is recorded)
                try:
                    copy.setblocking(False)
                    if sock.type == socket.SOCK_STREAM:
                        _, forwarder = next(streams)
                        accepting: Accepting = (
                            NativeListener(copy, forwarder)
                            if isinstance(forwarder, NativeForwarder)
                            else DescriptorListener(copy, forwarder.serve, forwarder.label)
                        )
                        serving.append(accepting)
                        accepting.start()
                    else:
                        mine = next(datagrams)
                        udp = UdpForwarder(rule, mine.port, copy, self.state, mine.batch, mine.pool)
                        serving.append(udp)
                        udp.start()
                except BaseException:
                    if not serving or getattr(serving[-1], "listener", None) is not copy:
                        copy.close()
                    raise
            _impose(run, self.modes.get(rule.label, ""))

    def release(self, worker: int, rules: set[RuleSpec]) -> None:
        """Worker `worker` serves its copies of `rules` again (the rules it was handed)."""
        for rule, run in self._runs.items():
            if rule in rules:
                run.release(worker)

    def verdicts(self, rule: RuleSpec) -> list[tuple[int, bool]]:
        """A rule's backends that its active checks hold down: (index, False) each."""
        run = self._runs.get(rule)
        pool = run.pool if run is not None else None
        return [
            (backend.index, False) for backend in (pool.backends if pool else ()) if not backend.checked_up
        ]

    def reported(self, rule: RuleSpec, index: int) -> None:
        """The main process: a worker's connects took backend `index` of `rule` down passively."""
        run = self._runs.get(rule)
        if run is not None and run.pool is not None and 0 <= index < len(run.pool.backends):
            run.pool.reported(index)

    def impose(self, rule: RuleSpec, index: int, up: bool) -> None:
        """A worker: take the main process's verdict on a backend of `rule`."""
        run = self._runs.get(rule)
        if run is not None and run.pool is not None and index < len(run.pool.backends):
            run.pool.impose(index, up)

    def shared(self, worker: int) -> list[tuple[RuleSpec, list[socket.socket]]]:
        """What worker `worker` (1 to workers - 1) relays: each shareable rule with its copies
        of the rule's listeners, in config order."""
        return [
            (rule, run.siblings[worker - 1]) for rule, run in self._runs.items() if run.siblings is not None
        ]

    def owned(self) -> Owned:
        return Owned(files=[rule.listen.path for rule in self._runs if isinstance(rule.listen, UnixPath)])

    # ------------------------------------------------------------------ operator actions
    def set_mode(self, name: str, mode: str, *, strict: bool = True) -> None:
        """Pause (`paused`: new clients wait in the backlog), drain (`draining`: new clients are
        refused, live sessions go on) or resume (`""`) rule `name`, in this process; a rule of
        that name started later (a reload, a worker handed it) starts in that mode.

        Raises ActionError when `strict` and no rule of that name runs here.
        """
        runs = [run for rule, run in self._runs.items() if rule.label == name]
        if not runs and strict:
            raise ActionError(f"no running rule named {name!r}", kind="missing")
        if mode:
            self.modes[name] = mode
        else:
            self.modes.pop(name, None)
        for run in runs:
            _impose(run, mode)
        self.state.rule(name).mode = mode

    def knows(self, name: str) -> bool:
        """Whether a rule of that name runs here."""
        return any(rule.label == name for rule in self._runs)

    async def check_backend(self, name: str, backend: str) -> tuple[bool, str]:
        """Check backend `backend` of rule `name` now, as its active checks do (the result counts
        toward rise and fall); a pass ends a passive down, in every worker too; without active
        checks a failure is only noted. Returns (passed, what happened). Raises ActionError (no
        such rule or backend)."""
        found = [(rule, run) for rule, run in self._runs.items() if rule.label == name]
        if not found:
            raise ActionError(f"no running rule named {name!r}", kind="missing")
        rule, run = found[0]
        pool = run.pool
        if pool is None:
            raise ActionError(f"rule {name!r} has one target and no backends to check", kind="conflict")
        chosen = [item for item in pool.backends if item.spec.name == backend]
        if not chosen:
            names = ", ".join(item.spec.name for item in pool.backends)
            raise ActionError(f"rule {name!r} has no backend {backend!r} (it has {names})", kind="missing")
        checker = run.checker or Checker(
            pool, rule.listen, datagram=not rule.protocol.has_tcp, proxy_protocol=rule.proxy_protocol
        )
        ok, result = await checker.probe(chosen[0])
        if run.checker is not None or ok:
            pool.checked(chosen[0], ok, result)
        if ok and pool.verdict is not None:  # a pass ends a passive down in every worker too
            pool.verdict(chosen[0], True)
        else:  # no active checks to bring it back: a failure is shown, never held against it
            chosen[0].stats.last_check, chosen[0].stats.last_check_result = time.time(), result
        return ok, result

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> list[PortfwdError]:
        self.splice = splice_available()
        failures = self._start_rules(list(self.rules))
        await self._check_transparent(list(self.rules))
        return failures

    async def _check_transparent(self, rules: list[RuleSpec]) -> None:
        """Warn, once per start or reload, about what transparent rules lack on this host (the
        capability, the policy routing); `portfwd check` says the same."""
        wanted = [rule for rule in rules if rule.transparent and rule in self._runs]
        if not wanted or self.given is not None:  # a worker: the main process said it
            return
        for line in await asyncio.to_thread(transparent.problems, wanted, user=self.user):
            log.warning("%s", line, extra=event("rule.problem", reason=line))

    async def retire(self, part: tuple[RuleSpec, ...]) -> Change:
        removed = [rule for rule in self._runs if rule not in part]
        for rule in removed:
            run = self._runs.pop(rule)
            run.close_listeners()
            self._retired.append(run)
            self.state.listeners = [item for item in self.state.listeners if item.rule != rule.label]
            self.state.remove_listening([rule.label])
            self.state.rule(rule.label).running = False
            if self.given is None:  # a worker's main process says it
                log.info(
                    "%s: removed by reload; stopped listening, live sessions drain",
                    rule.label,
                    extra=event("rule.removed", rule=rule.label),
                )
        return Change(removed=tuple(rule.label for rule in removed))

    async def apply(self, part: tuple[RuleSpec, ...]) -> Change:
        retired = await self.retire(part)
        kept = len(self._runs)
        # dict.fromkeys: one start per distinct rule, in the new config's order
        added = [rule for rule in dict.fromkeys(part) if rule not in self._runs]
        self.rules = part
        failures = self._start_rules(added)
        await self._check_transparent(added)
        self.state.order_rules(rule.label for rule in part)  # status shows the config's order
        return Change(
            kept=kept,
            removed=retired.removed,
            added=tuple(rule.label for rule in added if rule in self._runs),
            tried=len(added),
            failures=tuple(failures),
        )

    async def stop_accepting(self) -> None:
        self.state.remove_listening([rule.label for rule in self._runs])
        for run in self._runs.values():
            run.close_listeners()

    async def stop(self) -> None:
        """Close the connects still pending and every session left (tunnels and the server have
        closed theirs by now), then release the shared relay resources."""
        for run in [*self._runs.values(), *self._retired]:
            for _, forwarder in run.tcp:
                forwarder.close_pending()
        self.state.close_all("shutdown")
        await asyncio.sleep(0)  # let the close callbacks of aborted transports run
        self._runs.clear()
        self._retired.clear()
        self._pipes.close()
        self._poller.close()
        self._native.close()
        if self._batch is not None:
            self._batch.close()
            self._batch = None

    # ------------------------------------------------------------------ one rule
    def _start_rules(self, rules: list[RuleSpec]) -> list[PortfwdError]:
        failures: list[PortfwdError] = []
        for rule in rules:
            try:
                self._runs[rule] = self._start_rule(rule)
            except BindError as exc:
                failures.append(exc)
                log.error("%s", exc.line(), extra=event("rule.failed", rule=rule.label, reason=exc.message))
        return failures

    def _path_for(self, rule: RuleSpec) -> RelayPath:
        if rule.relay == "splice" and not self.splice:
            log.warning('%s: relay = "splice" is not possible here; using the protocol path', rule.label)
        return relay_path(rule, self.splice)

    def _udp_batch(self) -> Batch | None:
        """The process's batched-UDP slots, made at the first UDP rule; None where impossible."""
        if not self._batch_tried:
            self._batch_tried = True
            self._batch = Batch.create()
        return self._batch

    def _start_rule(self, rule: RuleSpec) -> _RuleRun:
        """Bind every listening socket of `rule`, then serve them. Raises BindError (nothing of
        the rule is left open then)."""
        what = rule.where
        run = _RuleRun([], [])
        path = self._path_for(rule)
        limits = (
            Limits(rule.max_connections, rule.max_connections_per_source, rule.rate)
            if rule.max_connections or rule.max_connections_per_source or rule.rate
            else None
        )
        shaper = (
            Shaper(rule.bandwidth, rule.bandwidth_per_connection)
            if rule.bandwidth or rule.bandwidth_per_connection
            else None
        )
        pool = self._pool(rule)
        kept = native_reason(rule) if path == "splice" and native_available() else None
        native = path == "splice" and native_available() and kept is None
        if kept is not None and rule.protocol.has_tcp:
            log.debug("%s: relayed in Python, not the C engine: %s", what, kept)
        handed = self.given(rule) if self.given is not None else None
        copies = self.workers - 1 if self.given is None and self.workers > 1 and shareable(rule) else 0
        groups: list[list[socket.socket]] = []
        # With workers, the C engine's processes share accept queues (up to QUEUE_SHARERS a
        # queue; unless `reuseport`): whichever process is awake takes every client waiting,
        # where a SO_REUSEPORT group's hash leaves one process idle while clients queue at the
        # other's socket (bench/RESULTS.md, D30). Python's relays keep a queue each (their loop
        # would wake in every process for each client); UDP keeps its group (a flow stays with
        # one process).
        shared = rule.reuseport is False or (rule.reuseport is None and native)
        run.queues = shared_queues(copies + 1) if shared and copies else 0

        def bind(port: int, kind: socket.SocketKind) -> socket.socket:
            if handed is not None:
                return handed.pop(0)
            assert isinstance(listen, HostPorts)
            stream = kind == socket.SOCK_STREAM
            backlog, keep = (rule.backlog, rule.tcp_keepalive) if stream else (0, False)
            if run.queues and stream:
                group = bind_shared(
                    what, listen.host, port, copies + 1, backlog=backlog, dual_stack=rule.dual_stack,
                    tcp_keepalive=keep,
                )  # fmt: skip
                groups.append(group[1:])
                return group[0]
            if copies:
                group = bind_group(
                    what, listen.host, port, kind, copies + 1, backlog=backlog, dual_stack=rule.dual_stack,
                    tcp_keepalive=keep,
                )  # fmt: skip
                groups.append(group[1:])
                return group[0]
            return bind_ip(
                what, listen.host, port, kind, backlog=backlog, dual_stack=rule.dual_stack, tcp_keepalive=keep
            )

        forwarder: Forwarder
        try:
            listen = rule.listen
            if isinstance(listen, UnixPath):
                listener = bind_unix(what, listen.path, backlog=rule.backlog)
                forwarder = TcpForwarder(
                    rule, None, self.state, path, self._pipes, self._poller, limits, shaper, pool
                )
                run.tcp.append((_accepting(listener, forwarder), forwarder))
            else:
                for port in listen.ports.ports():
                    if rule.protocol.has_tcp:
                        listener = bind(port, socket.SOCK_STREAM)
                        forwarder = (
                            NativeForwarder(rule, port, self.state, self._native, pool)
                            if native
                            else TcpForwarder(
                                rule, port, self.state, path, self._pipes, self._poller, limits, shaper, pool
                            )
                        )
                        run.tcp.append((_accepting(listener, forwarder), forwarder))
                    if rule.protocol.has_udp:
                        udp_socket = bind(port, socket.SOCK_DGRAM)
                        batch = self._udp_batch() if rule.relay != "protocol" else None
                        run.udp.append(UdpForwarder(rule, port, udp_socket, self.state, batch, pool, limits))
        except BindError:
            run.siblings = [[sock for group in groups for sock in group]]
            run.close_listeners()
            raise
        run.pool = pool
        if copies:  # per worker: its socket of each group, in bind order
            run.siblings = [[group[index] for group in groups] for index in range(copies)]
        for accepting, _ in run.tcp:
            accepting.start()
        for udp in run.udp:
            udp.start()
        _impose(run, self.modes.get(rule.label, ""))  # before the loop runs: nobody slips in
        if pool is not None and rule.health.interval and self.given is None:  # workers are told
            run.checker = Checker(
                pool, rule.listen, datagram=not rule.protocol.has_tcp, proxy_protocol=rule.proxy_protocol
            )
            run.checker.start()
        self._announce(rule, path, run)
        return run

    def _pool(self, rule: RuleSpec) -> Pool | None:
        """The rule's backends as a pool (None: it has one target), their stats on its RuleStats."""
        if not rule.backends:
            return None
        stats = self.state.rule(rule.label)
        stats.balance = rule.balance
        stats.backends = [
            BackendStats(backend.name, str(backend.connect), backend.weight, backend.backup)
            for backend in rule.backends
        ]
        label = rule.label
        quiet = self.given is not None

        def changed(backend: Backend, up: bool, why: str) -> None:
            name = backend.spec.name
            run = self._runs.get(rule)
            if not up and run is not None:
                adopted = [item for items in run.adopted.values() for item in items]
                for udp in [*run.udp, *adopted]:
                    if isinstance(udp, UdpForwarder):
                        udp.close_flows_to(backend.stats, "backend down")
            if quiet:  # a worker: the main process checks the same backends and says it
                return
            if up:
                log.info(
                    "%s: backend %s is up (%s)",
                    label,
                    name,
                    why,
                    extra=event("backend.up", rule=label, backend=name, reason=why),
                )
            else:
                log.warning(
                    "%s: backend %s is down: %s",
                    label,
                    name,
                    why,
                    extra=event("backend.down", rule=label, backend=name, reason=why),
                )

        pool = Pool(rule.backends, rule.balance, rule.health, stats.backends, changed)
        if not quiet:

            def verdict(backend: Backend, up: bool) -> None:
                if self.health_changed is not None:
                    self.health_changed(rule, backend.index, up)

            pool.verdict = verdict
        else:

            def passive(backend: Backend) -> None:
                if self.passive_down is not None:
                    self.passive_down(rule, backend.index)

            pool.passive = passive
        return pool

    def _announce(self, rule: RuleSpec, path: str, run: _RuleRun) -> None:
        relay = path if rule.protocol.has_tcp else "udp"
        listen = str(rule.listen)
        protocol = "tcp" if isinstance(rule.listen, UnixPath) else rule.protocol.value
        stats = self.state.rule(rule.label)
        target = targets_text(rule)
        stats.listen, stats.connect, stats.protocol, stats.relay = listen, target, protocol, relay
        stats.running = True
        stats.mode = self.modes.get(rule.label, "")
        stats.idle_timeout = rule.idle_timeout or 0.0
        self.state.listeners.append(Listener(rule.label, listen, protocol, relay))
        self.state.add_listening(rule.label, path, [accepting.listener for accepting, _ in run.tcp])
        self.state.add_listening(rule.label, "udp", [udp.listener for udp in run.udp])
        for worker, copies in enumerate(run.siblings or (), 1):  # this process holds them too
            if not run.queues or worker < run.queues:  # (not the duplicates of a queue listed)
                self.state.add_listening(
                    rule.label, path, [sock for sock in copies if sock.type == socket.SOCK_STREAM]
                )
            self.state.add_listening(
                rule.label, "udp", [sock for sock in copies if sock.type == socket.SOCK_DGRAM]
            )
        if self.given is not None:
            return  # a worker: the main process said it
        log.info(
            "%s: listening on %s/%s -> %s (%s)",
            rule.label,
            listen,
            protocol,
            target,
            relay,
            extra=event(
                "rule.listening",
                rule=rule.label,
                listen=listen,
                protocol=protocol,
                target=target,
                path=relay,
            ),
        )
