"""The SSH session layer the tunnel client and the tunnel server share: spawn, bridge, attach, close.

`Sessions` owns every task that serves one connection and every Bridge it makes. Each task runs
inside a per-session `try/finally` (`_guard`): an unexpected error is logged once, the client
socket is closed unless a transport already owns it, and the session's bridges are closed, so
State never keeps a session nobody relays. `stop()` cancels the tasks and awaits them, then
closes whatever bridges remain.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from portfwd.counters import RuleStats
from portfwd.logevents import event
from portfwd.relay.deadline import Deadlines
from portfwd.relay.sessionlog import log_closed
from portfwd.ssh.bridge import Bridge
from portfwd.ssh.errors import ssh_error
from portfwd.state import State

log = logging.getLogger(__name__)

#: SSH channel window and packet size. asyncssh's defaults (2 MiB, 32 KiB) cap one channel's
#: throughput at window/RTT; 8 MiB windows with 256 KiB packets are faster (bench/RESULTS.md, D9).
WINDOW = 8 * 1024 * 1024
PACKET = 256 * 1024


class _Scope:
    """What one session task owns until it hands it on: its client socket and its bridges.

    Found by the task itself (`Sessions._scope`), not through a ContextVar: a transport keeps a
    copy of the context it was made in for the connection's life, and a context changed per
    task cost about a hundred bytes per idle connection (bench/tunnel.py).
    """

    __slots__ = ("bridges", "client")

    def __init__(self, client: socket.socket | None, bridge: Bridge | None) -> None:
        self.client = client
        self.bridges: list[Bridge] = [] if bridge is None else [bridge]


class Sessions:
    """The tasks and bridges of one tunnel or one server, and their accounting in State.

    `kind` is the session path State records (`ssh`, `ssh-server`). With `label`, each closed
    session is logged (`label: client -> target closed (why): ...`); `released(owner)` is called
    when a bridge made for `owner` ends (the server's per-user channel counts).
    """

    def __init__(
        self,
        state: State,
        kind: str,
        *,
        label: str | None = None,
        logger: logging.Logger = log,
        released: Callable[[Any], None] | None = None,
    ) -> None:
        self.state = state
        self.kind = kind
        self.label = label
        self.log = logger
        self.released = released
        self.deadlines = Deadlines()  # channel opens, upstream connects, hand-backs: one timer
        self._loop: asyncio.AbstractEventLoop | None = None  # see `loop`
        self._tasks: dict[asyncio.Task[None], _Scope] = {}  # every session task, with what it owns
        self._owners: dict[Bridge, Any] = {}  # every live bridge, and whom it was made for

    # ------------------------------------------------------------------ tasks
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, asked for once: on Python 3.11 each `get_running_loop()` (and each
        `current_task()` without a loop) is a getpid() system call, and a session asked for it
        several times (bench/RESULTS.md, D17). So a Sessions is bound to the loop it first ran
        on (one per process, in portfwd)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def spawn(
        self,
        coro: Coroutine[Any, Any, None],
        *,
        client: socket.socket | None = None,
        bridge: Bridge | None = None,
    ) -> None:
        """Serve one session in a task of its own; `client` and `bridge` are closed if it fails."""
        scope = _Scope(client, bridge)
        task = self.loop.create_task(self._guard(coro, scope))
        self._tasks[task] = scope  # before the task first runs (on a later turn of the loop)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    def _scope(self) -> _Scope | None:
        """The scope of the session task running now, if it is one of ours."""
        task = asyncio.current_task(self.loop)
        return self._tasks.get(task) if task is not None else None

    async def _guard(self, coro: Coroutine[Any, Any, None], scope: _Scope) -> None:
        why = "shutdown"
        try:
            await coro
            scope.client = None
            scope.bridges.clear()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the per-session boundary (STYLE.md): log once, keep serving
            why = f"error: {ssh_error(exc).message}"
            self.log.error(
                "%s: session ended by an unexpected error: %s: %s",
                self.label or "server",
                type(exc).__name__,
                exc,
                exc_info=exc,
                extra=event(
                    "session.error", rule=self.label or "server", reason=f"{type(exc).__name__}: {exc}"
                ),
            )
        finally:
            if scope.client is not None:
                scope.client.close()
            for bridge in scope.bridges:
                bridge.close(why)

    async def stop(self, reason: str = "shutdown") -> None:
        """Cancel every session task and wait for it, then end the sessions still relaying."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.close_all(reason)
        self.deadlines.close()

    # ------------------------------------------------------------------ bridges
    def bridge(
        self, stats: RuleStats, client: str, target: str, *, channel_is_client: bool, owner: Any = None
    ) -> Bridge:
        """A new session in State and its Bridge (closed by `_closed`, exactly once)."""
        session = self.state.open_session(stats, client, target, self.kind)
        bridge = Bridge(session, self._closed, channel_is_client=channel_is_client)
        session.relay = bridge
        self._owners[bridge] = owner
        scope = self._scope()
        if scope is not None:
            scope.bridges.append(bridge)
        return bridge

    def owned_by(self, owner: Any) -> list[Bridge]:
        """The live bridges made for `owner`."""
        return [bridge for bridge, held_by in self._owners.items() if held_by is owner]

    def close_all(self, reason: str) -> None:
        """End every live session now (shutdown, link lost)."""
        for bridge in list(self._owners):
            bridge.close(reason)

    async def attach(self, bridge: Bridge, sock: socket.socket, side: str = "client") -> bool:
        """Give a connected socket to the bridge (asyncio wraps it in a transport).

        False (the socket closed, the session ended as `side: why`) when asyncio cannot.
        """
        scope = self._scope()
        if scope is not None and scope.client is sock:
            scope.client = None  # the transport owns it now: closing it twice could hit a reused fd
        try:
            await self.loop.connect_accepted_socket(bridge.socket_protocol, sock)
        except OSError as exc:
            sock.close()
            bridge.close(f"{side}: {ssh_error(exc).message}")
            return False
        return True

    def _closed(self, bridge: Bridge, reason: str) -> None:
        owner = self._owners.pop(bridge, None)
        if self.released is not None and owner is not None:
            self.released(owner)
        session = bridge.session
        session.relay = None
        if self.label is not None and session.id in self.state.sessions:
            log_closed(self.label, session, reason, self.log)
        self.state.close_session(session, reason)
