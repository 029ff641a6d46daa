"""The composition root: turns a Config into running listeners, then drains and cleans up.

The only module that knows every part. It binds every rule (a rule that fails is reported and
skipped unless `strict`), starts the metrics endpoint and the control socket, drops root
privileges once everything is bound, and serves. SIGHUP (or `portfwd reload`) applies an edited
config; SIGTERM/SIGINT stops accepting, lets sessions drain for `drain_timeout`, closes the rest,
and removes what it created (Unix socket files, the control socket, the metrics listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from portfwd import __version__
from portfwd.addr import UnixPath
from portfwd.control import ControlServer
from portfwd.errors import BindError, ConfigError, PortfwdError, RuntimeFailure
from portfwd.instances import Identity
from portfwd.kernel import nft
from portfwd.kernel.gateway import GatewayService
from portfwd.metrics import MetricsServer
from portfwd.privileges import Janitor, drop_privileges
from portfwd.relay.describe import relay_path
from portfwd.relay.forwarder import RelayPath, TcpForwarder
from portfwd.relay.listener import DescriptorListener, bind_ip, bind_unix
from portfwd.relay.mmsg import Batch
from portfwd.relay.poller import Poller
from portfwd.relay.splice import PipePool, splice_available
from portfwd.relay.udp import UdpForwarder
from portfwd.router.keeper import Keeper
from portfwd.specs import Plan, RuleSpec, TunnelSpec
from portfwd.ssh.client import Tunnel
from portfwd.ssh.lean import fast_path
from portfwd.ssh.server import TunnelServer
from portfwd.state import Listener, State

log = logging.getLogger(__name__)

#: Plan parts a reload does not apply (attribute: the config section it names in the warning).
_RESTART_ONLY = {
    "user": "user",
    "group": "group",
    "control": "control",
    "server": "server",
    "gateway": "gateway",
    "maps": "map",
    "ssh_fast_path": "ssh_fast_path",
}


@dataclass(slots=True)
class _RuleRun:
    """What one rule has running: its TCP listeners with forwarders, and UDP forwarders."""

    tcp: list[tuple[DescriptorListener, TcpForwarder]]
    udp: list[UdpForwarder]


#: Every this many seconds the runtime counts its open files: near the limit, accept(2) fails
#: with EMFILE, and the event loop's acceptors (asyncssh's among them) drop such clients
#: without a word. One warning says so instead.
DESCRIPTOR_CHECK = 5
DESCRIPTOR_WARN = 0.9


def descriptors_warning() -> None:
    """Warn when open files are above DESCRIPTOR_WARN of the soft limit (Linux: /proc/self/fd)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return
        used = soft  # not even one more to look with: the limit is reached
    if used >= soft * DESCRIPTOR_WARN:
        log.warning(
            "open files: %d of the limit of %d in use; new connections fail (EMFILE) when it is reached; "
            "raise the limit (LimitNOFILE=, ulimit -n)",
            used,
            soft,
        )


def raise_fd_limit() -> None:
    """Raise the soft open-files limit to the hard one: each relayed TCP client needs 2 fds (+4 mid-burst)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _accepting(listener: socket.socket, forwarder: TcpForwarder) -> DescriptorListener:
    """Wire a listening socket to its forwarder, both ways (serve clients; pause on exhaustion)."""
    accepting = DescriptorListener(listener, forwarder.serve, forwarder.label)
    forwarder.exhausted = accepting.pause
    return accepting


class Runtime:
    """Runs a Plan: start() binds, wait() serves until told to stop, stop() drains and cleans.

    Rules are keyed by their (frozen) config, so a reload can tell which rules are unchanged
    (kept with their listeners and live sessions), removed (stop listening; their sessions
    drain) or new (started).
    """

    def __init__(
        self,
        plan: Plan,
        *,
        strict: bool = False,
        identity: Identity | None = None,
        exit_on_auth: bool = False,
        loader: Callable[[], Plan] | None = None,
    ) -> None:
        self.plan = plan
        self.loader = loader  # re-reads the config file (reload); None: nothing to reload
        self.exit_on_auth = exit_on_auth
        #: Set when a part must end the process (host key refused, ExitOnForwardFailure).
        self.fatal_error: PortfwdError | None = None
        self._tunnels: dict[TunnelSpec, Tunnel] = {}
        self._server: TunnelServer | None = None
        self._gateway: GatewayService | None = None
        self._keeper: Keeper | None = None
        self.identity = identity
        #: Decided at start (config or --no-ssh-fast-path) and kept across reloads, which say so.
        self.fast_path = plan.ssh_fast_path
        self.strict = strict
        self.config_path = identity.config if identity is not None else None
        self.state = State()
        self.state.config_path = str(self.config_path) if self.config_path else None
        if identity is not None:
            self.state.instance = identity.name
            self.state.kind = identity.kind
        self.failures: list[PortfwdError] = []
        self._runs: dict[RuleSpec, _RuleRun] = {}
        self._retired: list[_RuleRun] = []
        self._metrics: MetricsServer | None = None
        self._control: ControlServer | None = None
        self._janitor: Janitor | None = None  # removes root-made files after a privilege drop
        self._samples = 0
        self._sampler: asyncio.TimerHandle | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._splice = False
        self._pipes = PipePool()
        self._poller = Poller()  # the splice relays' sockets
        self._batch: Batch | None = None  # the UDP forwarders' recvmmsg/sendmmsg slots
        self._batch_tried = False
        self._drained: asyncio.Event | None = None
        self._reloading = asyncio.Lock()
        self._retired_tasks: set[asyncio.Task[dict[str, Any]]] = set()

    def _path_for(self, rule: RuleSpec) -> RelayPath:
        if rule.relay == "splice" and not self._splice:
            log.warning('%s: relay = "splice" is not possible here; using the protocol path', rule.label)
        return relay_path(rule, self._splice)

    def _udp_batch(self) -> Batch | None:
        """The process's batched-UDP slots, made at the first UDP rule; None where impossible."""
        if not self._batch_tried:
            self._batch_tried = True
            self._batch = Batch.create()
        return self._batch

    def _start_rule(self, index: int, rule: RuleSpec) -> _RuleRun:
        what = rule.where
        run = _RuleRun([], [])
        path = self._path_for(rule)
        try:
            listen = rule.listen
            if isinstance(listen, UnixPath):
                listener = bind_unix(what, listen.path, backlog=rule.backlog)
                forwarder = TcpForwarder(rule, None, self.state, path, self._pipes, self._poller)
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
                        forwarder = TcpForwarder(rule, port, self.state, path, self._pipes, self._poller)
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
                        batch = self._udp_batch() if rule.relay != "protocol" else None
                        run.udp.append(UdpForwarder(rule, port, udp_socket, self.state, batch))
        except BindError:
            self._close_listeners(run)
            raise
        for listener_, _ in run.tcp:
            listener_.start()
        for udp in run.udp:
            udp.start()
        self._announce(rule, path)
        return run

    def _announce(self, rule: RuleSpec, path: str) -> None:
        relay = path if rule.protocol.has_tcp else "udp"
        listen = str(rule.listen)
        protocol = "tcp" if isinstance(rule.listen, UnixPath) else rule.protocol.value
        stats = self.state.rule(rule.label)
        stats.listen, stats.connect, stats.protocol, stats.relay = listen, str(rule.connect), protocol, relay
        stats.running = True
        stats.idle_timeout = rule.idle_timeout or 0.0
        self.state.listeners.append(Listener(rule.label, listen, protocol, relay))
        log.info("%s: listening on %s/%s -> %s (%s)", rule.label, listen, protocol, rule.connect, relay)

    @staticmethod
    def _close_listeners(run: _RuleRun) -> None:
        for listener, _ in run.tcp:
            listener.close()
        for udp in run.udp:
            udp.close("rule removed")

    def _start_rules(self, rules: list[tuple[int, RuleSpec]]) -> list[PortfwdError]:
        failures: list[PortfwdError] = []
        for index, rule in rules:
            try:
                self._runs[rule] = self._start_rule(index, rule)
            except BindError as exc:
                failures.append(exc)
                log.error("%s", exc.line())
        return failures

    def _start_tunnels(self, tunnels: list[TunnelSpec]) -> list[PortfwdError]:
        failures: list[PortfwdError] = []
        for tunnel_config in tunnels:
            tunnel = Tunnel(
                tunnel_config,
                self.state,
                self._fatal,
                exit_on_auth=self.exit_on_auth,
                fast_path=self.fast_path,
            )
            failures.extend(tunnel.start())
            self._tunnels[tunnel_config] = tunnel
        return failures

    def _fatal(self, error: PortfwdError) -> None:
        """A part that cannot go on without lying to its user: stop the process, exit 1."""
        if self.fatal_error is None:
            self.fatal_error = error
            self._stopping = True  # no drain: the process is failing
            self.request_stop()

    async def _start_metrics(self) -> BindError | None:
        listen = self.plan.metrics
        if listen is None:
            return None
        metrics = MetricsServer(self.state, listen.host or "0.0.0.0", listen.port)
        try:
            await metrics.start()
        except BindError as exc:
            log.error("%s", exc.line())
            return exc
        self._metrics = metrics
        log.info("metrics: serving %s", metrics.url)
        return None

    async def _start_control(self) -> None:
        """Claim this instance's control socket. Raises RuntimeFailure when it cannot: an
        instance that `status` and `reload` cannot reach, or that another one answers for,
        must not run (see instances.py)."""
        control = self.plan.control
        if not control.enabled or self.identity is None:
            return
        path = self.identity.socket
        server = ControlServer(
            self.state, path, self.reload if self.loader is not None else None, control.group
        )
        try:
            await server.start()
        except BindError as exc:
            if exc.field == "control.group":  # a config error (exit 2), not a runtime one
                raise ConfigError(exc.line()) from exc
            raise RuntimeFailure(exc.line()) from exc
        self._control = server
        self.state.control = str(path)
        log.info("control: %s (portfwd status reads it)", path)

    def _sample(self) -> None:
        self.state.sample()
        self._samples += 1
        if self._samples % DESCRIPTOR_CHECK == 0:
            descriptors_warning()
        self._sampler = asyncio.get_running_loop().call_later(1.0, self._sample)

    async def start(self) -> None:
        """Bind every rule, the metrics endpoint and the control socket, then drop privileges.

        Raises RuntimeFailure when `strict` and anything failed, or when nothing could start.
        """
        self._stop = asyncio.Event()
        raise_fd_limit()
        await self._start_control()  # first: a second instance of the same identity stops here
        self._splice = splice_available()
        self.failures.extend(self._start_rules(list(enumerate(self.plan.rules))))
        if self.plan.tunnels or self.plan.server is not None:
            decided = fast_path(self.fast_path)
            if decided.on or not self.fast_path:
                log.debug("%s", decided.reason)
            else:
                log.warning("%s", decided.reason)
        self.failures.extend(self._start_tunnels(list(self.plan.tunnels)))
        if self.plan.gateway is not None:
            gateway = GatewayService(self.plan.gateway, self.state)
            try:
                await gateway.start()
                self._gateway = gateway
            except nft.GatewayError as exc:
                await gateway.stop()
                self.failures.append(exc)
                log.error("gateway: %s", exc.line())
        if self.plan.maps:
            self._keeper = Keeper(self.plan.maps, self.state.mappings)
            await self._keeper.start()
        if self.plan.server is not None:
            server = TunnelServer(self.plan.server, self.state, fast_path=self.fast_path)
            try:
                await server.start()
                self._server = server
            except RuntimeFailure as exc:
                self.failures.append(exc)
                log.error("%s", exc.line())
        if (metrics_failure := await self._start_metrics()) is not None:
            self.failures.append(metrics_failure)
        self._sample()
        if self.failures and self.strict:
            await self.stop()
            raise RuntimeFailure(f"{self.failures[0].line()} (--strict)")
        if self.fatal_error is not None:
            await self.stop()
            raise RuntimeFailure(self.fatal_error.line())
        if (
            not self._runs
            and not self._tunnels
            and self._server is None
            and self._gateway is None
            and self._keeper is None
            and self._metrics is None
        ):
            await self.stop()
            if self.failures:
                raise RuntimeFailure(f"nothing could start: {self.failures[0].line()}")
            raise RuntimeFailure(
                "nothing to run: the config has no [[forward]] or [[tunnel]]",
                hint="add one; see portfwd check",
            )
        if self.plan.user is not None:
            try:
                owned = [rule.listen.path for rule in self._runs if isinstance(rule.listen, UnixPath)]
                owned += [path for tunnel in self._tunnels.values() for path in tunnel.socket_paths()]
                made = []
                if self._control is not None:
                    owned.append(str(self._control.path))
                    if self._control.made_dir is not None:
                        made.append(str(self._control.made_dir))
                self._janitor = drop_privileges(self.plan.user, self.plan.group, owned, made)
            except BaseException:
                await self.stop()
                raise
        # Everything allocated so far (imports, config, listeners) lives as long as the process:
        # keep it out of the cyclic GC's full scans, which per-connection garbage triggers
        # (measured: under 1 % per connection here, but free).
        gc.collect()
        gc.freeze()
        listeners = sum(len(run.tcp) + len(run.udp) for run in self._runs.values())
        log.info(
            "portfwd %s ready: %d rule(s), %d listening socket(s), %d tunnel(s)%s%s",
            __version__,
            len(self._runs),
            listeners,
            len(self._tunnels),
            "" if self._splice else ", splice unavailable (protocol relay everywhere)",
            f", {len(self.failures)} failed" if self.failures else "",
        )

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply the difference; a bad config changes nothing.

        Returns the control-socket answer: ok, and what was kept, stopped, started or refused.
        """
        async with self._reloading:
            assert self.loader is not None
            try:
                new = self.loader()
            except ConfigError as exc:
                for line in exc.problems:
                    log.error("reload refused, old config keeps running: %s", line)
                return {"ok": False, "errors": exc.problems}
            old_rules = set(self._runs)
            new_rules = {rule: index for index, rule in enumerate(new.rules)}
            removed = [rule for rule in self._runs if rule not in new_rules]
            added = [(index, rule) for rule, index in new_rules.items() if rule not in old_rules]
            for rule in removed:
                run = self._runs.pop(rule)
                self._close_listeners(run)
                self._retired.append(run)
                self.state.listeners = [item for item in self.state.listeners if item.rule != rule.label]
                self.state.rule(rule.label).running = False
                log.info("%s: removed by reload; stopped listening, live sessions drain", rule.label)
            old_tunnels = set(self._tunnels)
            gone = [item for item in old_tunnels if item not in new.tunnels]
            for tunnel_config in gone:
                tunnel = self._tunnels.pop(tunnel_config)
                await tunnel.stop()
                self.state.tunnels.remove(tunnel.stats)
                log.info("%s: tunnel removed by reload", tunnel.label)
            old, self.plan = self.plan, new
            failures = self._start_rules(added)
            failures.extend(self._start_tunnels([item for item in new.tunnels if item not in old_tunnels]))
            if new.metrics != old.metrics and self._metrics is not None:
                self._metrics.stop()
                self._metrics = None
            if self._metrics is None and (metrics_failure := await self._start_metrics()) is not None:
                failures.append(metrics_failure)
            for key, section in _RESTART_ONLY.items():
                if getattr(new, key) != getattr(old, key):
                    log.warning("reload: %s changes take effect at the next start", section)
            kept = len(old_rules) - len(removed)
            log.info(
                "reloaded %s: %d kept, %d removed, %d added, %d failed",
                self.config_path,
                kept,
                len(removed),
                len(added) - len(failures),
                len(failures),
            )
            return {
                "ok": not failures,
                "kept": kept,
                "removed": [rule.label for rule in removed],
                "added": [rule.label for _, rule in added if rule in self._runs],
                "errors": [failure.line() for failure in failures],
            }

    def request_reload(self) -> None:
        """SIGHUP: reload in the background (the signal handler must not block)."""
        if self.loader is None:
            log.warning("SIGHUP: this instance was started without a config file; nothing to reload")
            return
        task = asyncio.get_running_loop().create_task(self.reload())
        self._retired_tasks.add(task)
        task.add_done_callback(self._retired_tasks.discard)

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

    def _all_runs(self) -> list[_RuleRun]:
        return [*self._runs.values(), *self._retired]

    def _close_sessions(self, reason: str) -> None:
        for run in self._all_runs():
            for _, forwarder in run.tcp:
                forwarder.close_pending()
        self.state.close_all(reason)

    async def stop(self) -> None:
        """Stop accepting, drain live sessions for drain_timeout, close the rest, release all."""
        if self._sampler is not None:
            self._sampler.cancel()
        for run in self._runs.values():
            self._close_listeners(run)
        for tunnel in self._tunnels.values():
            tunnel.stop_accepting()
        if self._server is not None:
            await self._server.stop_accepting()
        if self.state.sessions and not self._stopping:
            log.info(
                "draining %d session(s) for up to %gs", len(self.state.sessions), self.plan.drain_timeout
            )
            drained = asyncio.Event()
            self._drained = drained
            self.state.on_empty = drained.set
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.plan.drain_timeout):
                    await drained.wait()
            self.state.on_empty = None
        for tunnel in self._tunnels.values():
            await tunnel.stop()
        self._tunnels.clear()
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._gateway is not None:
            await self._gateway.stop()
            self._gateway = None
        if self._keeper is not None:
            await self._keeper.stop()
            self._keeper = None
        self._close_sessions("shutdown")
        await asyncio.sleep(0)  # let the close callbacks of aborted transports run
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        if self._control is not None:
            await self._control.stop()
            self._control = None
        self._runs.clear()
        self._retired.clear()
        self._pipes.close()
        self._poller.close()
        if self._batch is not None:
            self._batch.close()
            self._batch = None
        if self._janitor is not None:  # last: everything that made a file has let go of it
            self._janitor.finish()
            self._janitor = None


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(
    plan: Plan,
    *,
    strict: bool = False,
    identity: Identity | None = None,
    exit_on_auth: bool = False,
    loader: Callable[[], Plan] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the identity's config. Raises RuntimeFailure."""

    async def main() -> None:
        runtime = Runtime(plan, strict=strict, identity=identity, exit_on_auth=exit_on_auth, loader=loader)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, runtime.request_stop)
        loop.add_signal_handler(signal.SIGHUP, runtime.request_reload)
        await runtime.start()
        try:
            await runtime.wait()
        finally:
            log.info("stopping")
            await runtime.stop()
            log.info("stopped")
        if runtime.fatal_error is not None:
            raise RuntimeFailure(runtime.fatal_error.line())

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
