"""The splice path's per-connection work in C (relay/_native.c), for the rules that need no more.

Why: in Python a relayed connection costs 20-25 µs of interpreter time around the same system
calls haproxy makes in 5 (bench/RESULTS.md, "Workers, measured why"), which kept conn/s at
0.64-0.71x haproxy's however the Python was tuned. The C engine accepts, connects and splices
with the splice relay's semantics; Python keeps the session's record (State), its two log lines
and everything status, metrics, reload, drain and shutdown do, once per session, from the
engine's batched events.

A rule takes this path (`native_reason` is None) when it is a TCP rule on the splice path whose
targets are IP literals and that needs nothing Python must look at on a client's bytes or
count across clients: no routes, connection limits, bandwidth, PROXY headers read from a load
balancer, or transparent mode. Its allow/deny lists are the engine's (a denied client reaches
Python only for its line), and so is the PROXY header it sends; with several backends the
rule's Pool (balance.py) picks each client's backend and the next one after a failed connect,
called from the engine (nativeforward.py). Every other rule keeps relay/forwarder.py.
`PORTFWD_NATIVE=0` in the environment keeps every rule in Python (an A/B bench, or a suspected
bug in the C).

The module imports where the extension was not built (no compiler): `available()` says False.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from portfwd.acl import Network
from portfwd.addr import Endpoint, HostPorts
from portfwd.logevents import event
from portfwd.relay import sessionlog
from portfwd.relay.listener import KEEPALIVE, AcceptLoop
from portfwd.relay.splice import PIPE_SIZE
from portfwd.relay.upstream import literal_addresses
from portfwd.specs import RuleSpec
from portfwd.state import State

if TYPE_CHECKING:
    from portfwd.relay.nativeforward import NativeForwarder

_native: Any
try:
    from portfwd.relay import _native
except ImportError:  # built without a compiler: the Python relays do it all
    _native = None

log = logging.getLogger("portfwd.relay.forwarder")  # the logger the Python path's lines come from

#: How a connect failed, in the engine's FAILED and RETRY events.
FAIL_CONNECT, FAIL_SOCKET, FAIL_TIMEOUT, FAIL_PROXY = 0, 1, 2, 3


def available() -> bool:
    """Whether the C engine was built and is not turned off (`PORTFWD_NATIVE=0`)."""
    return _native is not None and os.environ.get("PORTFWD_NATIVE", "1") != "0"


def native_reason(rule: RuleSpec) -> str | None:
    """None when `rule` can be relayed by the C engine (on the splice path); else what keeps it
    in Python (logged at debug level, `-v`, when a rule starts)."""
    if not isinstance(rule.listen, HostPorts) or not rule.protocol.has_tcp:
        return "not a TCP listener on an IP address"
    targets = [backend.connect for backend in rule.backends] or [rule.connect]
    if not all(map(_literal, targets)):
        return "a target is not an IP address"
    lacks = {
        "routes": bool(rule.route),
        "connection limits": bool(rule.max_connections or rule.max_connections_per_source or rule.rate),
        "bandwidth": bool(rule.bandwidth or rule.bandwidth_per_connection),
        "accept_proxy_protocol": rule.accept_proxy,
        "transparent": rule.transparent,
    }
    for name, present in lacks.items():
        if present:
            return f"it has {name}"
    return None


def _literal(target: Endpoint) -> bool:
    return isinstance(target, HostPorts) and literal_addresses((target.host, target.ports.first)) is not None


class NativeRelays:
    """One process's C engine: made at the first rule that takes it, watched by the loop as
    one reader, its events handed to the forwarders (their listeners are the tokens)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._engine: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def started(self) -> bool:
        """Whether the engine was made (a rule took it)."""
        return self._engine is not None

    @property
    def engine(self) -> Any:
        """The engine (made on first use)."""
        if self._engine is None:
            assert _native is not None
            engine = self._engine = _native.Engine(PIPE_SIZE, KEEPALIVE)
            engine.closed = self._closed
            engine.mode = self._mode
            engine.dispatch = self._dispatch
            self._loop = asyncio.get_running_loop()
            # The engine's own run() is the reader: a wake-up that opens or closes no session
            # (most of them: a request, a response) runs no Python.
            self._loop.add_reader(engine.fileno(), engine.run)
            self.state.syncers.append(self._sync)
        return self._engine

    @staticmethod
    def _mode() -> int:
        """Who writes the session lines of this batch: the engine (1 text, 2 JSON) when the
        front end's batched handler is the only one, else Python (0)."""
        lines = sessionlog.direct
        return lines.engine_lines(log.name) if lines is not None else 0

    def _dispatch(self, events: list[tuple[Any, ...]], mode: int) -> None:
        """The events of one batch of the engine's (see _native.c), in order."""
        lines = sessionlog.direct
        written = mode != 0  # the engine wrote the open and closed lines of this batch
        for item in events:
            kind = item[0]
            try:
                if kind == 0:  # OPEN: listener, link, client, connect seconds
                    item[1].forwarder.opened(item[2], item[3], item[4], written)
                elif kind == 5:  # CLOSED: link, reason
                    item[1].token.forwarder.closed(item[1], item[2], written)
                elif kind == 6:  # LINES: the open and closed lines, formatted (last)
                    if lines is not None:
                        lines.put_lines(item[1])
                elif kind == 8:  # RETRY (several backends): listener, link, how, errno, elapsed, timeout
                    item[1].forwarder.retry(item[2], item[3], item[4], item[5], item[6])
                elif kind == 1:  # FAILED: listener, client, how, errno, timeout, backend, counted, link
                    item[1].forwarder.failed(item[1], *item[2:])
                elif kind == 7:  # DENIED by allow/deny: listener, client
                    item[1].forwarder.denied(item[2])
                elif kind == 3:  # REFUSED (draining): listener, count
                    item[1].forwarder.stats.count_error("draining", item[2])
                else:  # EXHAUSTED or ACCEPT_FAILED: listener, errno
                    item[1].accept_error(item[2], kind == 2)
            except Exception:  # per-session boundary: one bad record never stops the others
                log.exception("native relay: event %r failed", kind)
                if kind == 8:  # a link waiting for its next backend must not wait forever
                    item[2].fail()

    def _closed(self, link: Any, reason: str) -> None:
        """A close Python asked for (idle timeout, shutdown, an operator)."""
        link.token.forwarder.closed(link, reason)

    def _sync(self) -> None:
        """Copy the live C sessions' byte counts into their sessions (status, rates, idle)."""
        for session in self.state.sessions.values():
            link: Any = session.relay
            if type(link) is _link_type:
                session.bytes_up = link.up
                session.bytes_down = link.down

    def close(self) -> None:
        """Stop watching and release the engine (its sessions were closed first)."""
        if self._engine is None:
            return
        assert self._loop is not None
        if not self._loop.is_closed():
            self._loop.remove_reader(self._engine.fileno())
        if self._sync in self.state.syncers:
            self.state.syncers.remove(self._sync)
        # The engine and this object refer to each other until now.
        self._engine.closed = self._engine.mode = self._engine.dispatch = None
        self._engine.close()
        self._engine = None


_link_type: Any = _native.Link if _native is not None else None


def _networks(networks: tuple[Network, ...]) -> tuple[tuple[bytes, int], ...]:
    """An allow or deny list as the engine takes it: (packed address, prefix length) each."""
    return tuple((network.network_address.packed, network.prefixlen) for network in networks)


class NativeListener(AcceptLoop[int]):
    """A listening socket served by the C engine: DescriptorListener's interface (start, hold,
    release, pause, close), the accepting done in C."""

    def __init__(self, listener: socket.socket, forwarder: NativeForwarder) -> None:
        super().__init__(listener, forwarder.label)
        self.forwarder = forwarder
        self._fd = listener.fileno()
        self._started = False
        forwarder.listeners.append(self)

    def start(self) -> None:
        """Begin accepting (the engine watches the listener from now on)."""
        if self._started or self._closed:
            return
        rule = self.forwarder.rule
        forwarder = self.forwarder
        engine = forwarder.relays.engine
        engine.listen(
            self._fd,
            self,
            forwarder.targets,
            rule.connect_timeout,
            rule.tcp_keepalive,
            forwarder.texts,
            _networks(rule.allow),
            _networks(rule.deny),
            forwarder.pick if forwarder.pool is not None else None,
            rule.proxy_protocol,
            forwarder.local,
            forwarder.balance(),
        )
        self._started = True
        if self._held or self._paused is not None:
            engine.watch(self._fd, False)
        if forwarder.refusing:
            engine.refuse(self._fd, True)

    def _watch(self, on: bool) -> None:
        if self._started and not self._closed:
            self.forwarder.relays.engine.watch(self._fd, on)

    def _forget(self) -> None:
        if self._started:
            self.forwarder.relays.engine.unlisten(self._fd)

    def refuse(self, on: bool) -> None:
        """Reset new clients (draining) or take them again."""
        if self._started and not self._closed:
            self.forwarder.relays.engine.refuse(self._fd, on)

    def accept_error(self, code: int, exhausted: bool) -> None:
        """The engine could not accept: out of descriptors or memory (it stopped watching this
        listener: resume later), or another error (logged)."""
        why = os.strerror(code)
        if exhausted:
            self.pause(why)
            return
        label = self.forwarder.label
        log.warning("%s: accept failed: %s", label, why, extra=event("accept.failed", rule=label, reason=why))
