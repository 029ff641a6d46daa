"""`portfwd server`: an SSH server that only forwards, for stock `ssh -N -L/-R/-D` clients.

Public-key authentication only, for configured users only. Each user gets the targets
(`permit_open`) and listen addresses (`permit_listen`) the admin allowed, from the source
networks allowed (`from`), narrowed further by OpenSSH authorized_keys options (`permitopen`,
`permitlisten`, `from`, `restrict`, `no-port-forwarding`). Relayed connections go through the
same session layer as the client side (ssh/sessions.py) and are counted in the one state model.

Each connection's login and policy is ssh/serverconn.py, the rules ssh/policy.py, the `-R`
ports and sockets ssh/remote.py; this module owns the listener and what they share.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import asyncssh

from portfwd import sshalgorithms
from portfwd.errors import BindError, RuntimeFailure, UpstreamError
from portfwd.logevents import event
from portfwd.relay.listener import keepalive
from portfwd.relay.upstream import describe_error
from portfwd.specs import ServerSpec
from portfwd.ssh.bridge import Bridge
from portfwd.ssh.cork import CorkedConnector
from portfwd.ssh.errors import channel_refusal, ssh_error
from portfwd.ssh.limits import Channels, Failures, Startups
from portfwd.ssh.remote import Remotes
from portfwd.ssh.serverconn import ServerConnection
from portfwd.ssh.sessions import Sessions
from portfwd.state import State

__all__ = ["TunnelServer", "load_host_key"]

log = logging.getLogger(__name__)

#: How long failed logins from one address are remembered (and it is refused once over the limit).
PENALTY_WINDOW = 60.0
UPSTREAM_TIMEOUT = 10.0


def load_host_key(path: str) -> asyncssh.SSHKey:
    """The server's ed25519 host key: read it, or create it (mode 0600) on first start."""
    key_path = Path(os.path.expanduser(path))
    try:
        return asyncssh.read_private_key(str(key_path))
    except FileNotFoundError:
        pass
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise RuntimeFailure(f"cannot read host key {key_path}: {exc}", field="server.host_key") from exc
    key = asyncssh.generate_private_key("ssh-ed25519")
    try:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.export_private_key())
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot create host key {key_path}: {exc.strerror}",
            field="server.host_key",
            hint="pick a writable path",
        ) from exc
    log.warning(
        "server: created host key %s (%s)",
        key_path,
        key.get_fingerprint(),
        extra=event("server.hostkey_created", file=str(key_path), key=key.get_fingerprint()),
    )
    return key


class TunnelServer:
    """Owns the SSH listener, the users, the -R ports in use and the failed-login memory."""

    def __init__(self, config: ServerSpec, state: State, *, fast_path: bool = True) -> None:
        self.config = config
        self.fast_path = fast_path
        self.state = state
        self.users = {user.name: user for user in config.users}
        self.remotes = Remotes(self, config)  # -R ports and sockets by key (remote.py)
        self.sessions = Sessions(state, "ssh-server", logger=log, released=self._released)
        self._failures = Failures(config.max_auth_failures, PENALTY_WINDOW)
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self.startups = Startups(config.max_startups)
        self.channels = Channels(config.max_channels, config.max_channels_per_user)
        self.fingerprint = ""

    async def start(self) -> None:
        """Load (or create) the host key and listen. Raises RuntimeFailure or BindError."""
        key = load_host_key(self.config.host_key)
        self.fingerprint = key.get_fingerprint()
        listen = self.config.listen
        host, port = listen.host, listen.port
        try:
            self._acceptor = await asyncssh.listen(
                host or "",
                port,
                server_host_keys=sshalgorithms.host_keypairs(key, self.config.host_key_algorithms),
                server_factory=lambda: ServerConnection(self),
                password_auth=False,
                kbdint_auth=False,
                allow_pty=False,
                agent_forwarding=False,
                x11_forwarding=False,
                login_timeout=self.config.login_grace_time,
                keepalive_interval=self.config.client_alive_interval,
                keepalive_count_max=self.config.client_alive_count,
                tunnel=CorkedConnector(),
                # OpenSSH's algorithm sets or stricter, SHA-2 RSA signatures only, no library banner.
                **sshalgorithms.server_options(self.config.kex, self.config.ciphers, self.config.macs),
            )
        except OSError as exc:
            raise BindError(
                f"cannot listen on {listen}: {ssh_error(exc).message.lower()}",
                field="server.listen",
                hint="pick another port",
            ) from exc
        self.state.add_listening("server", "ssh", self._acceptor.sockets, "server")
        log.info(
            "server: listening on %s for %d user(s); host key %s",
            listen,
            len(self.users),
            self.fingerprint,
            extra=event("server.listening", listen=str(listen), users=len(self.users), key=self.fingerprint),
        )

    async def stop_accepting(self) -> None:
        """Stop taking new SSH connections (shutdown begins; live sessions may drain)."""
        if self._acceptor is not None:
            self.state.remove_listening(["server"], "server")
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None

    async def stop(self) -> None:
        """Close everything: the listener, the -R ports, the relays (awaiting their tasks)."""
        await self.stop_accepting()
        self.remotes.close()
        await self.sessions.stop("shutdown")

    # ------------------------------------------------------------------ failed logins
    def penalized(self, address: str) -> bool:
        return self._failures.blocked(address)

    def failed_login(self, address: str, times: int = 1) -> None:
        self.state.server_auth_failures += times
        for _ in range(times):
            self._failures.note(address)

    # ------------------------------------------------------------------ relays
    def bridge(self, owner: ServerConnection, client: str, target: str, *, channel_is_client: bool) -> Bridge:
        """A new session of `owner`'s, counted against its channel caps until it ends."""
        bridge = self.sessions.bridge(
            owner.stats.stats, client, target, channel_is_client=channel_is_client, owner=owner
        )
        self.channels.opened(id(owner), owner.user_name)
        return bridge

    def _released(self, owner: ServerConnection) -> None:
        self.channels.closed(id(owner), owner.user_name)

    def orphans(self, owner: ServerConnection) -> None:
        """Close `owner`'s bridges whose channel never opened: with the connection gone, asyncssh
        will not attach them, and their upstream sockets would otherwise wait for ever."""
        for bridge in self.sessions.owned_by(owner):
            if bridge.chan is None:
                bridge.close("the client went away")

    def no_room(self, owner: ServerConnection, client: socket.socket, what: str) -> bool:
        """True (and the -R client closed, logged) when `owner` is at its channel cap."""
        refusal = self.channels.refusal(id(owner), owner.user_name)
        if refusal is None:
            return False
        owner.stats.stats.count_error("limit")
        log.warning(
            "server: %s: connection to %s refused: %s",
            owner.label,
            what,
            refusal,
            extra=event(
                "server.channel_refused", user=owner.user_name, client=owner.source, what=what, reason=refusal
            ),
        )
        client.close()
        return True

    async def open_upstream(
        self, owner: ServerConnection, client: str, target: tuple[str, int] | str
    ) -> asyncssh.SSHTCPSession[bytes]:
        """A -L/-D channel: connect the target first, then accept the channel with a bridge."""
        text = f"unix:{target}" if isinstance(target, str) else f"{target[0]}:{target[1]}"
        bridge = self.bridge(owner, client, text, channel_is_client=True)
        try:
            return await self._connect_upstream(owner, client, text, target, bridge)
        except BaseException:
            bridge.close("not opened")  # idempotent: every way out frees the session and its count
            raise

    async def _connect_upstream(
        self, owner: ServerConnection, client: str, text: str, target: tuple[str, int] | str, bridge: Bridge
    ) -> asyncssh.SSHTCPSession[bytes]:
        loop = self.sessions.loop
        deadlines = self.sessions.deadlines
        error: UpstreamError | None = None
        try:
            # One native call connects and builds the transport (faster than connecting with
            # relay.upstream.Connect and wrapping the socket, or a transport of our own: D15 in
            # bench/RESULTS.md).
            if isinstance(target, str):
                await deadlines.within(
                    UPSTREAM_TIMEOUT, loop.create_unix_connection(bridge.socket_protocol, target)
                )
            else:
                transport, _ = await deadlines.within(
                    UPSTREAM_TIMEOUT, loop.create_connection(bridge.socket_protocol, target[0], target[1])
                )
                upstream = transport.get_extra_info("socket")
                if self.config.tcp_keepalive and upstream is not None:
                    keepalive(upstream)
        except TimeoutError:
            error = UpstreamError(f"no answer within {UPSTREAM_TIMEOUT:g}s", reason="timeout")
        except OSError as exc:
            error = describe_error(exc)  # the relay's words ("connection refused"), and its reason
        except ValueError:  # a name the resolver will not take (a label over 63 bytes, a NUL)
            error = UpstreamError("cannot resolve: not a valid host name", reason="resolve")
        if error is None and owner.gone:  # the SSH connection ended while we connected
            error = UpstreamError("the client went away", reason="closed")
        if error is not None:
            refusal = ssh_error(error)
            owner.stats.stats.count_error(refusal.reason)
            log.info(
                "server: %s -> %s failed: %s",
                client,
                text,
                refusal.message,
                extra=event(
                    "session.failed",
                    rule=owner.stats.stats.name,
                    client=client,
                    target=text,
                    reason=refusal.message,
                ),
            )
            bridge.close(refusal.message)
            raise channel_refusal(refusal, refusal.message.capitalize())
        return bridge.channel_session()
