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
from dataclasses import dataclass

from portfwd.addr import UnixPath
from portfwd.errors import BindError, PortfwdError
from portfwd.logevents import event
from portfwd.relay import transparent
from portfwd.relay.balance import Backend, Pool
from portfwd.relay.bandwidth import Shaper
from portfwd.relay.describe import relay_path, targets_text
from portfwd.relay.forwarder import RelayPath, TcpForwarder
from portfwd.relay.health import Checker
from portfwd.relay.limits import Limits
from portfwd.relay.listener import DescriptorListener, bind_ip, bind_unix
from portfwd.relay.mmsg import Batch
from portfwd.relay.poller import Poller
from portfwd.relay.splice import PipePool, splice_available
from portfwd.relay.udp import UdpForwarder
from portfwd.services.base import Change, Owned, Reloadable
from portfwd.specs import RuleSpec
from portfwd.state import BackendStats, Listener, State

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _RuleRun:
    """What one rule has running: its TCP listeners with forwarders, and UDP forwarders."""

    tcp: list[tuple[DescriptorListener, TcpForwarder]]
    udp: list[UdpForwarder]
    checker: Checker | None = None

    def close_listeners(self) -> None:
        """Stop listening (and checking backends); a UDP forwarder also ends its flows (they
        have no listener of their own)."""
        if self.checker is not None:
            self.checker.stop()
        for listener, _ in self.tcp:
            listener.close()
        for udp in self.udp:
            udp.close("rule removed")


def _accepting(listener: socket.socket, forwarder: TcpForwarder) -> DescriptorListener:
    """Wire a listening socket to its forwarder, both ways (serve clients; pause on exhaustion)."""
    accepting = DescriptorListener(listener, forwarder.serve, forwarder.label)
    forwarder.exhausted = accepting.pause
    return accepting


class RuleSet(Reloadable[tuple[RuleSpec, ...]]):
    """Runs the [[forward]] rules; a rule that cannot bind is reported and skipped."""

    name = "rules"

    def __init__(self, rules: tuple[RuleSpec, ...], state: State, *, user: str | None = None) -> None:
        self.rules = rules
        self.state = state
        self.user = user  #: the user privileges drop to (a transparent rule's check asks)
        #: Whether splice(2) works here; decided at start, before the first rule binds.
        self.splice = False
        self._runs: dict[RuleSpec, _RuleRun] = {}
        self._retired: list[_RuleRun] = []  # removed by a reload; their sessions drain
        self._pipes = PipePool()
        self._poller = Poller()  # the splice relays' sockets
        self._batch: Batch | None = None  # the UDP forwarders' recvmmsg/sendmmsg slots
        self._batch_tried = False

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

    def udp_forwarders(self) -> list[UdpForwarder]:
        """The running rules' UDP forwarders (tests look at how they move datagrams)."""
        return [udp for run in self._runs.values() for udp in run.udp]

    def owned(self) -> Owned:
        return Owned(files=[rule.listen.path for rule in self._runs if isinstance(rule.listen, UnixPath)])

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
        if not wanted:
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
                        listener = bind_ip(
                            what,
                            listen.host,
                            port,
                            socket.SOCK_STREAM,
                            backlog=rule.backlog,
                            dual_stack=rule.dual_stack,
                            tcp_keepalive=rule.tcp_keepalive,
                        )
                        forwarder = TcpForwarder(
                            rule, port, self.state, path, self._pipes, self._poller, limits, shaper, pool
                        )
                        run.tcp.append((_accepting(listener, forwarder), forwarder))
                    if rule.protocol.has_udp:
                        udp_socket = bind_ip(
                            what, listen.host, port, socket.SOCK_DGRAM, backlog=0, dual_stack=rule.dual_stack
                        )
                        batch = self._udp_batch() if rule.relay != "protocol" else None
                        run.udp.append(UdpForwarder(rule, port, udp_socket, self.state, batch, pool))
        except BindError:
            run.close_listeners()
            raise
        for accepting, _ in run.tcp:
            accepting.start()
        for udp in run.udp:
            udp.start()
        if pool is not None and rule.health.interval:
            run.checker = Checker(pool, rule.listen, datagram=not rule.protocol.has_tcp)
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

        def changed(backend: Backend, up: bool, why: str) -> None:
            name = backend.spec.name
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

        return Pool(rule.backends, rule.balance, rule.health, stats.backends, changed)

    def _announce(self, rule: RuleSpec, path: str, run: _RuleRun) -> None:
        relay = path if rule.protocol.has_tcp else "udp"
        listen = str(rule.listen)
        protocol = "tcp" if isinstance(rule.listen, UnixPath) else rule.protocol.value
        stats = self.state.rule(rule.label)
        target = targets_text(rule)
        stats.listen, stats.connect, stats.protocol, stats.relay = listen, target, protocol, relay
        stats.running = True
        stats.idle_timeout = rule.idle_timeout or 0.0
        self.state.listeners.append(Listener(rule.label, listen, protocol, relay))
        self.state.add_listening(rule.label, path, [accepting.listener for accepting, _ in run.tcp])
        self.state.add_listening(rule.label, "udp", [udp.listener for udp in run.udp])
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
