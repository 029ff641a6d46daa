"""One listening port of one rule on the C engine (relay/native.py): what TcpForwarder is on the
Python path, once per session rather than once per socket event.

The engine accepts, picks nothing, connects and relays; this records each session in the
state (status, metrics, drain), logs what the engine did not write itself, and, for a rule
with several backends, asks the rule's Pool (relay/balance.py) which backend each client gets
and which it tries next after a failed connect, so balancing and health are the same code on
both paths.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from portfwd.counters import Session
from portfwd.errors import UpstreamError
from portfwd.printable import printable
from portfwd.relay.balance import Backend, Pool
from portfwd.relay.forwarder import Target, format_target, resolve_target
from portfwd.relay.native import FAIL_PROXY, FAIL_SOCKET, FAIL_TIMEOUT, NativeRelays
from portfwd.relay.proxyout import listening_address
from portfwd.relay.sessionlog import log_closed, log_denied, log_failed, log_opened
from portfwd.relay.upstream import describe_error
from portfwd.specs import RuleSpec
from portfwd.state import State

if TYPE_CHECKING:
    from portfwd.relay.native import NativeListener

log = logging.getLogger("portfwd.relay.forwarder")  # the logger the Python path's lines come from

#: (label, label in JSON, target, target in JSON): what the engine's log lines name.
Texts = tuple[str, str, str, str]


class NativeForwarder:
    """Serves the clients of one listening port of one rule on the C engine."""

    def __init__(
        self, rule: RuleSpec, port: int | None, state: State, relays: NativeRelays, pool: Pool | None = None
    ) -> None:
        self.rule = rule
        self.port = port
        self.state = state
        self.relays = relays
        self.pool = pool
        self.label = rule.label
        self.path = "splice"
        self.stats = state.rule(rule.label)
        endpoints = (
            [backend.spec.connect for backend in pool.backends] if pool is not None else [rule.connect]
        )
        self.targets: list[tuple[str, int]] = []
        for endpoint in endpoints:
            target: Target = resolve_target(rule.listen, endpoint, port)
            assert isinstance(target, tuple)  # native_reason: IP literals only
            self.targets.append(target)
        self.target_texts = [format_target(target) for target in self.targets]
        label_text, label_json = printable(self.label), json.dumps(self.label)[1:-1]
        self.texts: tuple[Texts, ...] = tuple(
            (label_text, label_json, printable(text), json.dumps(text)[1:-1]) for text in self.target_texts
        )
        #: The address a PROXY header names as the one clients reached, when known without asking.
        self.local = listening_address(rule.listen, port) if rule.proxy_protocol else None
        #: Each backend's share of connect_timeout (up to three are tried within it: forwarder.py).
        self._attempt = rule.connect_timeout / min(3, len(pool.backends)) if pool is not None else 0.0
        self._hash = pool is not None and pool.balance == "source-hash"
        self._tried: dict[Any, tuple[Backend, ...]] = {}  # links that failed over, what they tried
        self.listeners: list[NativeListener] = []  # every one it had (pending clients name them)
        self._refusing = False
        #: Kept for the interface TcpForwarder has (the engine pauses its own listener).
        self.exhausted: Callable[[str], None] | None = None

    @property
    def refusing(self) -> bool:
        """A draining rule: new clients are reset at once (counted `draining`)."""
        return self._refusing

    @refusing.setter
    def refusing(self, value: bool) -> None:
        self._refusing = value
        for listener in self.listeners:
            listener.refuse(value)

    # ------------------------------------------------------------------ backends
    def balance(self) -> tuple[int, list[int], bytearray, float] | None:
        """What lets the engine pick by itself while every backend is healthy (round-robin and
        first, as the pool would): (mode, weights with 0 for a backup, the pool's flag, each
        backend's share of the connect timeout); None: the pool picks every time."""
        pool = self.pool
        if pool is None or pool.balance not in _HERE:
            return None
        weights = [0 if backend.spec.backup else backend.spec.weight for backend in pool.backends]
        return _HERE[pool.balance], weights, pool.flag, self._attempt

    def pick(self, client: str) -> tuple[int, float]:
        """The engine asks which backend a new client tries first, and for how long."""
        pool = self.pool
        assert pool is not None
        try:
            backend = pool.pick(_source(client) if self._hash else None, time.monotonic())
            assert backend is not None  # a pool has a backend; none was tried yet
        except Exception:  # a bug here must not drop the client unseen: one line, the first backend
            log.exception("%s: picking a backend for %s failed; trying the first", self.label, client)
            backend = pool.backends[0]
        backend.stats.active += 1  # a connect under way counts (least-connections)
        return backend.index, self._attempt

    def retry(self, link: Any, how: int, code: int, elapsed: float, timeout: float) -> None:
        """A connect to one of several backends failed: tell the pool, try the next backend
        while time is left (a client sees no error while any backend is up), else give up."""
        pool = self.pool
        assert pool is not None
        backend = pool.backends[link.backend]
        if link.counted:
            backend.stats.active -= 1
        error = _error(how, code, timeout)
        now = time.monotonic()
        pool.failed(backend, now, error.message)
        tried = (*self._tried.pop(link, ()), backend)
        left = self.rule.connect_timeout - elapsed
        source = _source(link.client_text) if self._hash else None
        while left > 0:
            following = pool.pick(source, now, tried)
            if following is None:
                break
            last = len(tried) + 1 >= min(3, len(pool.backends))  # no share kept for a next one
            seconds = left if last else min(left, self._attempt)
            log.debug(
                "%s: %s -> %s: %s; trying %s",
                self.label,
                link.client_text,
                self.target_texts[backend.index],
                error.message,
                following.spec.name,
            )
            following.stats.active += 1
            index = following.index
            code = link.connect(index, self.targets[index], seconds, self.texts[index])
            if code == 0:
                self._tried[link] = tried
                return
            following.stats.active -= 1
            backend = following
            if code < 0:  # no socket: this host's descriptors, not the backend's fault
                error = _error(FAIL_SOCKET, -code, seconds)
                link.token.pause(error.message)
                break
            error = describe_error(OSError(code, os.strerror(code)))
            pool.failed(following, now, error.message)
            tried = (*tried, following)
        link.fail()
        self._failed(link.client_text, self.target_texts[backend.index], error)

    # ------------------------------------------------------------------ sessions
    def opened(self, link: Any, client: str, seconds: float, written: bool = False) -> None:
        """The engine connected a client: record and log the session (unless the engine
        `written` its line)."""
        self.stats.observe_connect(seconds)
        pool = self.pool
        if pool is None:
            session = self.state.open_session(self.stats, client, self.target_texts[0], "splice")
        else:
            self._tried.pop(link, None)
            backend = pool.backends[link.backend]
            pool.connected(backend)
            session = self.state.open_session(self.stats, client, self.target_texts[backend.index], "splice")
            stats = session.backend = backend.stats
            stats.total += 1
            if not link.counted:  # picked by the engine: counted now
                stats.active += 1
        session.relay = link
        link.session = session
        if not written:
            log_opened(self.label, session)

    def closed(self, link: Any, reason: str, written: bool = False) -> None:
        """A session ended (the engine's reason, or the one Python closed it for)."""
        session: Session | None = link.session
        if session is None:
            return
        link.session = None
        session.bytes_up = link.up
        session.bytes_down = link.down
        if not written:
            log_closed(self.label, session, reason)
        session.relay = None
        self.state.close_session(session, reason)

    def denied(self, client: str) -> None:
        """The engine turned a client away by the rule's allow/deny lists."""
        self.stats.denied_total += 1
        log_denied(self.label, client, "closed")

    def failed(
        self,
        listener: NativeListener,
        client: str,
        how: int,
        code: int,
        timeout: float,
        index: int,
        counted: bool,
        link: Any,
    ) -> None:
        """A client's upstream never connected (or its PROXY header did not go out): count, log
        and keep it among the recently closed."""
        if self.pool is not None:
            self._tried.pop(link, None)
            if counted:
                self.pool.backends[index].stats.active -= 1
        error = _error(how, code, timeout)
        if error.reason == "resources":
            listener.pause(error.message)
        self._failed(client, self.target_texts[index], error)

    def _failed(self, client: str, target: str, error: UpstreamError) -> None:
        self.stats.count_error(error.reason)
        log_failed(self.label, client, target, error.message)
        if error.reason != "proxy_protocol":
            self.state.connect_failed(self.stats, client, target, self.path, f"upstream: {error.message}")

    def close_pending(self) -> None:
        """Abandon clients still waiting for their upstream (shutdown)."""
        self._tried.clear()
        if not self.relays.started:
            return
        for listener in self.listeners:
            self.relays.engine.abandon(listener)


#: The balance methods the engine picks by itself while the pool is healthy, and their codes.
_HERE = {"round-robin": 1, "first": 2}


def _error(how: int, code: int, timeout: float) -> UpstreamError:
    """What the engine's failure (how, errno) means, as the Python path says it."""
    words = os.strerror(code)
    if how == FAIL_TIMEOUT:
        return UpstreamError(f"no answer within {timeout:g}s", reason="timeout")
    if how == FAIL_SOCKET:
        return UpstreamError(f"cannot open a socket: {words.lower()}", reason="resources")
    if how == FAIL_PROXY:
        return UpstreamError("upstream: the PROXY header did not go out", reason="proxy_protocol")
    return describe_error(OSError(code, words))


def _source(client: str) -> str:
    """The address of a client's text (`1.2.3.4:5678`, `[::1]:5678`), as source-hash hashes it."""
    host = client.rsplit(":", 1)[0]
    return (host[1:-1] if host.startswith("[") else host).split("%", 1)[0]
