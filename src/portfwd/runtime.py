"""The composition root: turns a Config into running listeners, then drains and cleans up.

The only module that knows every part. It binds every rule (a rule that fails is reported and
skipped unless `strict`), drops root privileges once everything is bound, serves until
SIGTERM/SIGINT, then stops accepting, lets sessions drain for `drain_timeout`, closes the rest,
and removes what it created (Unix socket files, the metrics listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import resource
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from portfwd import __version__
from portfwd.addr import HostPorts, UnixPath, format_host
from portfwd.config import Config, ForwardConfig
from portfwd.errors import BindError, PortfwdError, RuntimeFailure
from portfwd.metrics import MetricsServer
from portfwd.relay.forwarder import RelayPath, TcpForwarder
from portfwd.relay.listener import TcpListener, bind_ip, bind_unix
from portfwd.relay.splice import PipePool, splice_available
from portfwd.relay.udp import UdpForwarder
from portfwd.state import Listener, State

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _RuleRun:
    """What one rule has running: its TCP listeners with forwarders, and UDP forwarders."""

    tcp: list[tuple[TcpListener, TcpForwarder]]
    udp: list[UdpForwarder]


def raise_fd_limit() -> None:
    """Raise the soft open-files limit to the hard one: each relayed TCP client needs 2-6 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _preload() -> None:
    """Import what Python and uvloop load lazily, while files root can read are still readable.

    After the drop the interpreter may sit in a directory the new user cannot enter (pyenv under
    /root); a lazy import then would fail on the first connection (`unknown encoding: idna`).
    """
    "localhost".encode("idna")
    with contextlib.suppress(OSError):
        socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)


def drop_privileges(user: str, group: str | None, owned: list[str] | None = None) -> None:
    """Become `user` (and `group`, else the user's primary group) after binding as root.

    The Unix socket files in `owned` are given to that user first, so that it can still remove
    them at exit. Raises RuntimeFailure when the user/group is unknown, when not started as
    root, or when root could be regained afterwards.
    """
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise RuntimeFailure(f"no such user {user!r}", field="user", hint="name an existing account") from exc
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise RuntimeFailure(f"no such group {group!r}", field="group") from exc
    if os.geteuid() == entry.pw_uid:
        return
    if os.geteuid() != 0:
        raise RuntimeFailure(
            f"switching to user {user!r} needs portfwd started as root",
            field="user",
            hint="start as root, or remove user = and use CAP_NET_BIND_SERVICE",
        )
    _preload()
    for path in owned or []:
        with contextlib.suppress(OSError):
            os.chown(path, entry.pw_uid, gid)
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(entry.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - would mean the kernel ignored setuid
        raise RuntimeFailure("privilege drop failed: root could be regained", field="user")
    log.info("dropped privileges to user %s (uid %d, gid %d)", user, entry.pw_uid, gid)


def _accepting(listener: socket.socket, forwarder: TcpForwarder) -> TcpListener:
    """Wire a listening socket to its forwarder, both ways (serve clients; pause on exhaustion)."""
    accepting = TcpListener(listener, forwarder.serve, forwarder.label)
    forwarder.exhausted = accepting.pause
    return accepting


class Runtime:
    """Runs a Config: start() binds, wait() serves until told to stop, stop() drains and cleans."""

    def __init__(self, config: Config, *, strict: bool = False) -> None:
        self.config = config
        self.strict = strict
        self.state = State()
        self.failures: list[PortfwdError] = []
        self._rules: dict[int, _RuleRun] = {}
        self._metrics: MetricsServer | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._splice = False
        self._pipes = PipePool()
        self._drained: asyncio.Event | None = None

    def _path_for(self, rule: ForwardConfig) -> RelayPath:
        if rule.relay == "protocol" or not self._splice:
            if rule.relay == "splice" and not self._splice:
                log.warning('%s: relay = "splice" is not possible here; using the protocol path', rule.label)
            return "protocol"
        return "splice"

    def _start_rule(self, index: int, rule: ForwardConfig) -> _RuleRun:
        what = f"forward[{index}]" + (f" ({rule.name})" if rule.name else "")
        run = _RuleRun([], [])
        path = self._path_for(rule)
        try:
            listen = rule.listen
            if isinstance(listen, UnixPath):
                listener = bind_unix(what, listen.path, backlog=rule.backlog)
                forwarder = TcpForwarder(rule, None, self.state, path, self._pipes)
                run.tcp.append((_accepting(listener, forwarder), forwarder))
                self._announce(rule, str(listen), "tcp", path)
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
                        )
                        forwarder = TcpForwarder(rule, port, self.state, path, self._pipes)
                        run.tcp.append((_accepting(listener, forwarder), forwarder))
                    if rule.protocol.has_udp:
                        udp_socket = bind_ip(
                            what,
                            listen.host,
                            port,
                            socket.SOCK_DGRAM,
                            backlog=0,
                            dual_stack=rule.dual_stack,
                        )
                        run.udp.append(UdpForwarder(rule, port, udp_socket, self.state))
                self._announce(rule, str(listen), rule.protocol.value, path)
        except BindError:
            for listener_, _ in run.tcp:
                listener_.close()
            for udp in run.udp:
                udp.close()
            raise
        for listener_, _ in run.tcp:
            listener_.start()
        for udp in run.udp:
            udp.start()
        return run

    def _announce(self, rule: ForwardConfig, listen: str, protocol: str, path: str) -> None:
        relay = path if rule.protocol.has_tcp else "udp"
        self.state.listeners.append(Listener(rule.label, listen, protocol, relay))
        log.info("%s: listening on %s/%s -> %s (%s)", rule.label, listen, protocol, rule.connect, relay)

    async def start(self) -> None:
        """Bind every rule and the metrics endpoint, then drop privileges.

        Raises RuntimeFailure when `strict` and any rule failed, or when nothing could start.
        """
        self._stop = asyncio.Event()
        raise_fd_limit()
        self._splice = splice_available()
        for index, rule in enumerate(self.config.forward):
            try:
                self._rules[index] = self._start_rule(index, rule)
            except BindError as exc:
                self.failures.append(exc)
                log.error("%s", exc.line())
        if self.config.metrics is not None:
            listen = self.config.metrics.listen
            assert isinstance(listen, HostPorts)
            host = listen.host or "0.0.0.0"
            metrics = MetricsServer(self.state, host, listen.ports.first)
            try:
                metrics.start()
                self._metrics = metrics
                log.info("metrics: serving %s", metrics.url)
            except BindError as exc:
                self.failures.append(exc)
                log.error("%s", exc.line())
        if self.config.control.socket is not None:
            log.warning(
                "control.socket: the control socket arrives with `portfwd status`; ignored in %s",
                __version__,
            )
        if self.failures and self.strict:
            await self.stop()
            raise RuntimeFailure(f"{self.failures[0].line()} (--strict)")
        if not self._rules and self._metrics is None:
            await self.stop()
            if self.failures:
                raise RuntimeFailure(f"nothing could start: {self.failures[0].line()}")
            raise RuntimeFailure(
                "nothing to run: the config has no [[forward]] rule",
                hint="add one; see portfwd check",
            )
        if self.config.user is not None:
            try:
                rules = self.config.forward
                unix_paths = [rule.listen.path for rule in rules if isinstance(rule.listen, UnixPath)]
                drop_privileges(self.config.user, self.config.group, unix_paths)
            except BaseException:
                await self.stop()
                raise
        listeners = sum(len(run.tcp) + len(run.udp) for run in self._rules.values())
        log.info(
            "portfwd %s ready: %d rule(s), %d listening socket(s)%s%s",
            __version__,
            len(self._rules),
            listeners,
            "" if self._splice else ", splice unavailable (protocol relay everywhere)",
            f", {len(self.failures)} rule(s) failed" if self.failures else "",
        )

    def request_stop(self) -> None:
        """Ask wait() to return (signal handlers call this); a second call closes at once."""
        if self._stop is None:
            return
        if self._stop.is_set():
            self._stopping = True  # second signal: skip the drain
            log.warning("second signal: closing all sessions now")
            if self._drained is not None:
                self._drained.set()
        self._stop.set()

    async def wait(self) -> None:
        """Serve until request_stop()."""
        assert self._stop is not None
        await self._stop.wait()

    def _close_sessions(self, reason: str) -> None:
        for run in self._rules.values():
            for _, forwarder in run.tcp:
                forwarder.close_pending()
        self.state.close_all(reason)

    async def stop(self) -> None:
        """Stop accepting, drain live sessions for drain_timeout, close the rest, release all."""
        for run in self._rules.values():
            for listener, _ in run.tcp:
                listener.close()
            for udp in run.udp:
                udp.close("shutdown")
        if self.state.sessions and not self._stopping:
            log.info(
                "draining %d session(s) for up to %gs", len(self.state.sessions), self.config.drain_timeout
            )
            drained = asyncio.Event()
            self._drained = drained
            self.state.on_empty = drained.set
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.drain_timeout):
                    await drained.wait()
            self.state.on_empty = None
        self._close_sessions("shutdown")
        await asyncio.sleep(0)  # let the close callbacks of aborted transports run
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        self._rules.clear()
        self._pipes.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(config: Config, *, strict: bool = False) -> None:
    """Run until SIGTERM/SIGINT. Raises RuntimeFailure when nothing could start."""

    async def main() -> None:
        runtime = Runtime(config, strict=strict)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, runtime.request_stop)
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: log.warning("SIGHUP: reloading arrives with `portfwd reload`; restart to apply changes"),
        )
        await runtime.start()
        try:
            await runtime.wait()
        finally:
            log.info("stopping")
            await runtime.stop()
            log.info("stopped")

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())


def describe(config: Config) -> list[tuple[str, str, str, str, str, str]]:
    """Rows for `portfwd check`: name, listen, connect, protocol, access, relay."""
    rows = []
    splice = splice_available()
    for rule in config.forward:
        access = []
        if rule.allow:
            access.append("allow " + ", ".join(map(str, rule.allow)))
        if rule.deny:
            access.append("deny " + ", ".join(map(str, rule.deny)))
        for route in rule.route:
            access.append(f"{', '.join(map(str, route.source))} -> {route.connect}")
        relay = (
            "udp"
            if not rule.protocol.has_tcp
            else ("splice" if splice and rule.relay != "protocol" else "protocol")
        )
        listen = str(rule.listen)
        if isinstance(rule.listen, HostPorts) and rule.listen.is_any:
            listen = f"{format_host('')}:{rule.listen.ports}"
        rows.append(
            (
                rule.label,
                listen,
                str(rule.connect),
                rule.protocol.value,
                "; ".join(access) or "everyone",
                relay,
            )
        )
    return rows
