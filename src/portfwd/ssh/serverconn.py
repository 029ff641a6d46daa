"""One SSH connection to the tunnel server: login (public keys only), then the policy for each request.

asyncssh calls this object for every step: the connection arrives (failed-login penalty,
max_startups), a user and a key are offered (authorized_keys, `from`), a channel or a `-R` is
asked for (ssh/policy.py). What is allowed is carried out by the TunnelServer; every refusal
is logged, counted, and sent as the channel-open failure ssh/errors.py makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from typing import TYPE_CHECKING, Any

import asyncssh

from portfwd import sshalgorithms
from portfwd.counters import ServerSessionStats
from portfwd.logevents import event
from portfwd.relay.forwarder import format_peer
from portfwd.specs import ServerUserSpec
from portfwd.ssh.errors import Reason, SshError, channel_refusal, ssh_error
from portfwd.ssh.lean import fix, tune
from portfwd.ssh.policy import (
    LINKED,
    NOT_PLAIN,
    forwarding_allowed,
    linked,
    path_permitted,
    permits,
    plain_path,
)
from portfwd.ssh.remote import RemoteAddress, RemoteListener

if TYPE_CHECKING:
    from portfwd.ssh.server import TunnelServer

log = logging.getLogger("portfwd.ssh.server")


class ServerConnection(asyncssh.SSHServer):
    """One SSH connection to the server: authentication, then the policy for every request."""

    def __init__(self, server: TunnelServer) -> None:
        self.server = server
        self.conn: asyncssh.SSHServerConnection = None  # type: ignore[assignment]
        self.source = "?"
        self.source_ip = ""
        self.user: ServerUserSpec | None = None
        self.user_name = ""
        self.keys: asyncssh.SSHAuthorizedKeys | None = None
        self.options: dict[str, Any] = {}
        self.fingerprint = ""
        self.authenticated = False
        self.waiting = False  # counted in the server's max_startups until logged in or gone
        self.auth_failures = 0
        self.began = 0.0
        self.gone = False  # the SSH connection has ended (checked after every await)
        self.stats = ServerSessionStats("", "", "")
        self.listeners: list[RemoteListener] = []  # its -R ports and sockets (ssh/remote.py)

    @property
    def label(self) -> str:
        return f"{self.user_name}@{self.source}"

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.began = asyncio.get_running_loop().time()
        fix(conn)  # before the key exchange, fast path or not: dropbear's guessed packet (lean/kex.py)
        tune(conn, self.server.fast_path)
        peer = conn.get_extra_info("peername")
        self.source = format_peer(peer) if isinstance(peer, tuple) else "?"
        self.source_ip = str(peer[0]) if isinstance(peer, tuple) else ""
        if self.server.penalized(self.source_ip):
            log.warning(
                "server: %s refused: too many failed logins from this address",
                self.source,
                extra=event("server.refused", client=self.source, reason="too many failed logins"),
            )
            asyncio.get_running_loop().call_soon(conn.close)
            return
        if not self.server.startups.admit():
            log.warning(
                "server: %s dropped before authentication: %d connections wait to log in (max_startups)",
                self.source,
                self.server.startups.pending,
                extra=event("server.refused", client=self.source, reason="max_startups"),
            )
            asyncio.get_running_loop().call_soon(conn.abort)
            return
        self.waiting = True

    def _logged_in_or_gone(self) -> None:
        if self.waiting:
            self.waiting = False
            self.server.startups.done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._logged_in_or_gone()
        self.server.orphans(self)
        if not self.authenticated:
            # asyncssh's login timer starts a moment before connection_made: allow for it
            if asyncio.get_running_loop().time() - self.began >= self.server.config.login_grace_time - 0.25:
                log.warning(
                    "server: %s did not log in within login_grace_time; closed",
                    self.source,
                    extra=event("server.refused", client=self.source, reason="login_grace_time"),
                )
            if self.user_name:
                # A connection that never logged in costs its address each failed attempt (at
                # least one); keys tried before a login that succeeds cost nothing (an agent
                # offering several keys, many users behind one NAT).
                self.server.failed_login(self.source_ip, max(1, self.auth_failures))
            elif exc is not None:  # before any login attempt: the key exchange did not get through
                self._kex_failed(exc)
            return
        for listener in list(self.listeners):
            listener.close()
        with contextlib.suppress(ValueError):
            self.server.state.server_sessions.remove(self.stats)
        why = ssh_error(exc).message if exc else "closed"
        log.info(
            "server: %s logged out (%s)",
            self.label,
            why,
            extra=event("server.logout", user=self.user_name, client=self.source, reason=why),
        )

    def _kex_failed(self, exc: Exception) -> None:
        # The reason and the version string may be the peer's own text: the formatters escape it.
        error = ssh_error(exc)
        version = self.conn.get_extra_info("client_version")
        peer = f"{self.source} ({f'version {version}' if version else 'no version line'})"
        fields = event(
            "server.kex_failed", client=self.source, version=str(version or ""), reason=error.message
        )
        if error.reason == Reason.LOST:  # it hung up, or never asked to log in: a probe, a scan
            log.debug("server: %s: closed before logging in: %s", peer, error.message, extra=fields)
        else:
            log.info("server: %s: key exchange failed: %s", peer, error.message, extra=fields)

    def begin_auth(self, username: str) -> bool:
        self.user_name = username
        self.user = self.server.users.get(username)
        if self.user is None:
            log.warning(
                "server: %s: unknown user %s; refused",
                self.source,
                username,
                extra=event("server.auth_failed", user=username, client=self.source, reason="unknown user"),
            )
            return True
        try:
            self.keys = asyncssh.read_authorized_keys(os.path.expanduser(self.user.authorized_keys))
        except (OSError, ValueError, asyncssh.KeyImportError) as exc:
            why = f"cannot read {self.user.authorized_keys}: {ssh_error(exc).message}"
            log.error(
                "server: user %s: %s; refused",
                username,
                why,
                extra=event("server.auth_failed", user=username, client=self.source, reason=why),
            )
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        sshalgorithms.accept_only_safe_signatures(key)  # asyncssh would verify an ssh-rsa (SHA-1) one
        if self._accepts(username, key):
            return True
        self.auth_failures += 1
        if self.auth_failures >= self.server.config.max_auth_tries:
            log.warning(
                "server: %s: %d failed authentication attempts for %s (max_auth_tries); disconnected",
                self.source,
                self.auth_failures,
                username,
                extra=event("server.auth_failed", user=username, client=self.source, reason="max_auth_tries"),
            )
            asyncio.get_running_loop().call_soon(
                self.conn.disconnect,
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                "Too many authentication failures",
            )
        return False

    def _accepts(self, username: str, key: asyncssh.SSHKey) -> bool:
        user, keys = self.user, self.keys
        if user is None or keys is None:
            return False
        address = ipaddress.ip_address(self.source_ip) if self.source_ip else None
        if user.source and (address is None or not any(address in net for net in user.source)):
            log.warning(
                "server: %s: user %s is not allowed from this address (from = ...)",
                self.source,
                username,
                extra=event("server.auth_failed", user=username, client=self.source, reason="from"),
            )
            return False
        options = keys.validate(key, self.source_ip, self.source_ip)
        if options is None:
            return False
        self.options = dict(options)
        self.fingerprint = key.get_fingerprint()
        return True

    def auth_completed(self) -> None:
        self._logged_in_or_gone()
        self.authenticated = True
        self.stats = ServerSessionStats(self.user_name, self.source, self.fingerprint)
        self.stats.stats.idle_timeout = self.server.config.idle_timeout or 0.0
        self.stats.stats.name = f"server {self.label}"
        self.server.state.server_sessions.append(self.stats)
        log.info(
            "server: %s logged in with key %s",
            self.label,
            self.fingerprint,
            extra=event("server.login", user=self.user_name, client=self.source, key=self.fingerprint),
        )

    def session_requested(self) -> bool:
        log.info("server: %s asked for a shell or command; refused (use ssh -N)", self.label)
        return False

    # -------------------------------------------------------------- -L and -D (direct-tcpip)
    def _room_for_a_channel(self, what: str) -> None:
        """Raise the channel-open refusal when this connection or user is at its channel cap."""
        refusal = self.server.channels.refusal(id(self), self.user_name)
        if refusal is not None:
            log.warning(
                "server: %s: %s refused: %s",
                self.label,
                what,
                refusal,
                extra=event(
                    "server.channel_refused",
                    user=self.user_name,
                    client=self.source,
                    what=what,
                    reason=refusal,
                ),
            )
            self.stats.stats.count_error("limit")
            raise channel_refusal(SshError(f"{what}: {refusal}", reason=Reason.SHORTAGE))

    def _denied(self, what: str, why: str) -> None:
        log.warning(
            "server: %s: %s denied: %s",
            self.label,
            what,
            why,
            extra=event(
                "server.channel_denied", user=self.user_name, client=self.source, what=what, reason=why
            ),
        )

    def _deny_open(self, what: str, why: str) -> None:
        self._denied(what, why)
        self.stats.stats.count_error("denied")
        raise channel_refusal(SshError(f"{what}: {why}", reason=Reason.PROHIBITED))

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        assert self.user is not None
        what = f"connect to {dest_host}:{dest_port}"
        if not 0 < dest_port <= 0xFFFF or not 0 <= orig_port <= 0xFFFF:
            # SSH carries ports as uint32; sshd refuses these too (serverloop.c, "invalid ... port").
            self._deny_open(what, "port out of range (1-65535)")
        if not forwarding_allowed(self.options):
            self._deny_open(what, "port forwarding is off for this key (authorized_keys restrict)")
        if not permits(self.user.permit_open, dest_host, dest_port):
            self._deny_open(what, "not in permit_open")
        allowed = self.options.get("permitopen")
        if allowed and (dest_host, dest_port) not in allowed and (dest_host, None) not in allowed:
            self._deny_open(what, "not in the key's permitopen")
        self._room_for_a_channel(what)
        client = f"{orig_host}:{orig_port} via {self.label}"
        return self.server.open_upstream(self, client, (dest_host, dest_port))

    def unix_connection_requested(self, dest_path: str) -> Any:
        assert self.user is not None
        what = f"connect to unix:{dest_path}"
        if not forwarding_allowed(self.options):
            self._deny_open(what, "port forwarding is off for this key (authorized_keys restrict)")
        if not plain_path(dest_path):
            self._deny_open(what, NOT_PLAIN)
        if linked(dest_path):
            self._deny_open(what, LINKED)
        if not path_permitted(self.user.permit_open, dest_path):
            self._deny_open(what, 'not in permit_open (a Unix socket needs its own "unix:/path" entry)')
        self._room_for_a_channel(what)
        return self.server.open_upstream(self, f"unix via {self.label}", dest_path)

    # -------------------------------------------------------------- -R (tcpip-forward)
    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        assert self.user is not None
        what = f"listen on {listen_host or '*'}:{listen_port}"

        def deny(why: str) -> bool:
            self._denied(what, why)
            self.stats.stats.count_error("denied")
            return False

        if not 0 <= listen_port <= 0xFFFF:
            return deny("port out of range (0-65535)")
        if not forwarding_allowed(self.options):
            return deny("port forwarding is off for this key (authorized_keys restrict)")
        bind = self.server.remotes.bind_address(listen_host)
        if not permits(self.user.permit_listen, bind, listen_port) and not permits(
            self.user.permit_listen, listen_host, listen_port
        ):
            return deny("not in permit_listen")
        key_listens = self.options.get("permitlisten")
        if key_listens and not any(
            permits([item if ":" in item else f"*:{item}"], bind, listen_port) for item in key_listens
        ):
            return deny("not in the key's permitlisten")
        return self.server.remotes.listen(self, RemoteAddress(listen_host, bind, listen_port))

    def unix_server_requested(self, listen_path: str) -> Any:
        assert self.user is not None
        what = f"listen on unix:{listen_path}"
        allowed = self.user.permit_listen
        if not forwarding_allowed(self.options):
            reason = "port forwarding is off for this key (authorized_keys restrict)"
        elif not plain_path(listen_path):
            reason = NOT_PLAIN
        elif linked(listen_path):
            reason = LINKED
        elif not path_permitted(allowed, listen_path):
            reason = 'not in permit_listen (a Unix socket needs its own "unix:/path" entry)'
        else:
            return self.server.remotes.listen(self, RemoteAddress(path=listen_path))
        self._denied(what, reason)
        self.stats.stats.count_error("denied")
        return False
