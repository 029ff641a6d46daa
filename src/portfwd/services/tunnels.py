"""The SSH tunnels as one service: one `Tunnel` per [[tunnel]], kept, removed or added on reload.

It lists each tunnel's local listeners (-L, -D; both halves of `localhost`) in the state, and
lets status read the SSH connection's own addresses when it is asked.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from portfwd.errors import PortfwdError
from portfwd.logevents import event
from portfwd.services.base import Change, Owned, Reloadable
from portfwd.specs import TunnelSpec
from portfwd.ssh.client import Tunnel
from portfwd.ssh.lean import fast_path
from portfwd.state import State, address_text

log = logging.getLogger(__name__)

#: Called by a tunnel that cannot go on without lying to its user; ends the process.
Fatal = Callable[[PortfwdError], None]


def link_addresses(tunnel: Tunnel) -> tuple[str, str] | None:
    """The (local, peer) addresses of the tunnel's SSH connection while it has one."""
    conn = tunnel.conn
    if conn is None:
        return None
    return address_text(conn.get_extra_info("sockname")), address_text(conn.get_extra_info("peername"))


def listener_names(tunnel: Tunnel) -> list[str]:
    """The names the tunnel's forwards have in status (and their listeners in `state.listeners`)."""
    return [forward.stats.stats.name for forward in tunnel.forwards]


def log_fast_path(wanted: bool) -> None:
    """Say whether the SSH fast path runs: a warning only when it was wanted and cannot."""
    decided = fast_path(wanted)
    if decided.on or not wanted:
        log.debug("%s", decided.reason)
    else:
        log.warning("%s", decided.reason)


class Tunnels(Reloadable[tuple[TunnelSpec, ...]]):
    """Runs the [[tunnel]]s. A tunnel keeps reconnecting on its own; `fatal` ends the process
    (host key refused, ExitOnForwardFailure)."""

    name = "tunnels"

    def __init__(
        self,
        tunnels: tuple[TunnelSpec, ...],
        state: State,
        fatal: Fatal,
        *,
        exit_on_auth: bool,
        fast_path: bool,
    ) -> None:
        self.tunnels = tunnels
        self.state = state
        self.fatal = fatal
        self.exit_on_auth = exit_on_auth
        self.fast_path = fast_path  # decided at start and kept across reloads
        self._running: dict[TunnelSpec, Tunnel] = {}

    @property
    def active(self) -> bool:
        return bool(self._running)

    def running(self) -> list[Tunnel]:
        """The tunnels, in start order (tests look at their connections)."""
        return list(self._running.values())

    def owned(self) -> Owned:
        return Owned(files=[path for tunnel in self._running.values() for path in tunnel.socket_paths()])

    async def start(self) -> list[PortfwdError]:
        return self._start(list(self.tunnels))

    def _start(self, tunnels: list[TunnelSpec]) -> list[PortfwdError]:
        failures: list[PortfwdError] = []
        for spec in tunnels:
            tunnel = Tunnel(
                spec, self.state, self.fatal, exit_on_auth=self.exit_on_auth, fast_path=self.fast_path
            )
            failures.extend(tunnel.start())
            self._running[spec] = tunnel
            self._announce(tunnel)
        return failures

    def _announce(self, tunnel: Tunnel) -> None:
        """List the local listeners the tunnel bound, and let status read its SSH connection."""
        tunnel.stats.link = functools.partial(link_addresses, tunnel)
        for forward in tunnel.forwards:
            path = "socks" if forward.spec.is_socks else "ssh"
            sockets = [listener.listener for listener in forward.listeners]
            self.state.add_listening(forward.stats.stats.name, path, sockets, "tunnel")

    async def retire(self, part: tuple[TunnelSpec, ...]) -> Change:
        """Stop the tunnels `part` no longer has; a kept one that failed for good (a host key,
        a first connect, reconnect_attempts) is stopped too, so that `apply` starts it again:
        "failed until reload" means a reload tries it afresh."""
        for spec, tunnel in list(self._running.items()):
            if spec in part and tunnel.stats.state == "failed":
                self._running.pop(spec)
                self.state.remove_listening(listener_names(tunnel), "tunnel")
                await tunnel.stop()
                self.state.tunnels.remove(tunnel.stats)
                log.info(
                    "%s: failed; started again by reload",
                    tunnel.label,
                    extra=event("tunnel.restarted", tunnel=tunnel.label),
                )
        gone = [spec for spec in self._running if spec not in part]
        for spec in gone:
            tunnel = self._running.pop(spec)
            self.state.remove_listening(listener_names(tunnel), "tunnel")
            await tunnel.stop()
            self.state.tunnels.remove(tunnel.stats)
            log.info(
                "%s: tunnel removed by reload",
                tunnel.label,
                extra=event("tunnel.removed", tunnel=tunnel.label),
            )
        return Change(removed=tuple(spec.label for spec in gone))

    async def apply(self, part: tuple[TunnelSpec, ...]) -> Change:
        retired = await self.retire(part)
        kept = len(self._running)
        added = [spec for spec in part if spec not in self._running]
        self.tunnels = part
        failures = self._start(added)
        return Change(
            kept=kept,
            removed=retired.removed,
            added=tuple(spec.label for spec in added),
            tried=len(added),
            failures=tuple(failures),
        )

    async def stop_accepting(self) -> None:
        for tunnel in self._running.values():
            self.state.remove_listening(listener_names(tunnel), "tunnel")
            tunnel.stop_accepting()

    async def stop(self) -> None:
        for tunnel in self._running.values():
            self.state.remove_listening(listener_names(tunnel), "tunnel")
            await tunnel.stop()
        self._running.clear()
