"""The composition root: turns a Plan into running services, then drains and cleans up.

The only module that knows every part. It builds one service per running part (services/),
starts them in order under one task group (a rule or tunnel that fails is reported and
skipped unless `strict`), drops root privileges once everything is bound, and serves. SIGHUP
(or `portfwd reload`) hands each service its part of an edited config; SIGTERM/SIGINT stops
accepting, lets sessions drain for `drain_timeout`, closes the rest, and removes what it
created (Unix socket files, the control socket, the metrics listener). Under systemd
(Type=notify) each of these steps is told to the manager: READY=1 once everything is bound,
RELOADING=1 then READY=1 around a reload, STOPPING=1 (notify.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from portfwd import __version__
from portfwd.errors import ConfigError, PortfwdError, RuntimeFailure
from portfwd.instances import Identity
from portfwd.kernel import auto
from portfwd.logevents import event
from portfwd.notify import Notifier
from portfwd.privileges import Janitor, drop_privileges
from portfwd.relay.udp import UdpForwarder
from portfwd.services.base import Change, Reloadable, Service
from portfwd.services.control import Control
from portfwd.services.descriptors import raise_fd_limit
from portfwd.services.gateway import Gateway
from portfwd.services.kernelrules import KernelRules, table_name
from portfwd.services.maps import Maps
from portfwd.services.metrics import Metrics
from portfwd.services.operator import Operator
from portfwd.services.rules import Forwarder, RuleSet
from portfwd.services.sampler import Sampler
from portfwd.services.server import Server
from portfwd.services.tunnels import Tunnels, log_fast_path
from portfwd.services.web import Web
from portfwd.services.workers import Workers
from portfwd.specs import Plan, RuleSpec
from portfwd.ssh.client import Tunnel
from portfwd.state import State

log = logging.getLogger(__name__)

#: Seconds between conntrack reads while the kernel relays' flows drain at shutdown.
KERNEL_DRAIN_POLL = 0.5

#: Plan parts a reload does not apply (attribute: the config section it names in the warning).
_RESTART_ONLY = {
    "user": "user",
    "group": "group",
    "control": "control",
    "server": "server",
    "gateway": "gateway",
    "maps": "map",
    "ssh_fast_path": "ssh_fast_path",
    "workers": "workers",
}


class Runtime:
    """Runs a Plan: start() binds, wait() serves until told to stop, stop() drains and cleans.

    Every background task (the sampler, a SIGHUP reload) is a task of one TaskGroup, entered
    by start() and left by stop() once each task has been cancelled and has ended.
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
        self._tasks = asyncio.TaskGroup()
        self._entered = False  # start() has entered the task group and stop() has not left it
        self._background: set[asyncio.Task[None]] = set()  # SIGHUP reloads
        state = self.state
        self._control: Control | None = None
        if plan.control.enabled and identity is not None:
            reloader = self.reload if loader is not None else None
            self._control = Control(plan.control, identity.socket, state, reloader)
        self._decided: dict[RuleSpec, bool] = {}  # each rule's side: the kernel's, or portfwd's
        kernel, userspace = _split(plan, self._decided)
        self._rules = RuleSet(userspace, state, user=plan.user, workers=plan.workers)
        self._kernel = KernelRules(
            kernel,
            state,
            table_name(identity.name if identity is not None else str(os.getpid())),
            self._rules.modes,
        )
        self._workers = Workers(self._rules, state, plan.workers, plan.drain_timeout)
        self._tunnels = Tunnels(
            plan.tunnels, state, self._fatal, exit_on_auth=exit_on_auth, fast_path=self.fast_path
        )
        self._gateway = Gateway(plan.gateway, state) if plan.gateway is not None else None
        self._maps = Maps(plan.maps, state) if plan.maps else None
        self._server = (
            Server(plan.server, state, fast_path=self.fast_path) if plan.server is not None else None
        )
        self._metrics = Metrics(plan.metrics, state)
        operator = Operator(
            state, self._rules, self._workers, self._kernel, self.reload if loader is not None else None
        )
        self._web = Web(plan.web, state, operator)
        self._sampler = Sampler(state, self._tasks)
        self._janitor: Janitor | None = None  # removes root-made files after a privilege drop
        self._stop: asyncio.Event | None = None
        self._stopping = False  # skip the drain (a second signal, a fatal error)
        self._closed = False
        self._drained: asyncio.Event | None = None
        self._reloading = asyncio.Lock()
        self._notify = Notifier()  # sd_notify: READY/RELOADING/STOPPING when $NOTIFY_SOCKET is set

    # ------------------------------------------------------------------ composition
    def _services(self) -> list[Service]:
        """The services in start order: the control socket first, the sampler last."""
        ordered = [
            self._control,
            self._rules,
            self._kernel,
            self._workers,
            self._tunnels,
            self._gateway,
            self._maps,
            self._server,
            self._metrics,
            self._web,
            self._sampler,
        ]
        return [service for service in ordered if service is not None]

    def _stop_order(self) -> list[Service]:
        """Links and kernel state before the rules' sessions close; status answers until the end."""
        ordered = [
            self._tunnels,
            self._server,
            self._gateway,
            self._maps,
            self._workers,
            self._rules,
            self._kernel,
            self._metrics,
            self._web,
            self._control,
        ]
        return [service for service in ordered if service is not None]

    def _reloadable(self, plan: Plan) -> list[tuple[Reloadable[Any], Any]]:
        """The services a reload changes, each with its part of `plan`."""
        kernel, userspace = _split(plan, self._decided)
        return [
            (self._rules, userspace),
            (self._kernel, kernel),
            (self._workers, userspace),
            (self._tunnels, plan.tunnels),
            (self._metrics, plan.metrics),
            (self._web, plan.web),
        ]

    @property
    def tunnels(self) -> list[Tunnel]:
        """The running tunnels, in start order."""
        return self._tunnels.running()

    @property
    def tcp_forwarders(self) -> list[Forwarder]:
        """The running rules' TCP forwarders (Python's or the C engine's)."""
        return self._rules.tcp_forwarders()

    @property
    def udp_forwarders(self) -> list[UdpForwarder]:
        """The running rules' UDP forwarders."""
        return self._rules.udp_forwarders()

    def _fatal(self, error: PortfwdError) -> None:
        """A part that cannot go on without lying to its user: stop the process, exit 1."""
        if self.fatal_error is None:
            self.fatal_error = error
            self._stopping = True  # no drain: the process is failing
            self.request_stop()

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        """Start every service in order, then drop privileges.

        Raises RuntimeFailure when `strict` and anything failed, when nothing could start, or
        when the control socket cannot be claimed (everything started is stopped first).
        """
        self._stop = asyncio.Event()
        raise_fd_limit()
        await self._tasks.__aenter__()
        self._entered = True
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        for service in self._services():  # the control socket raises: a second instance stops there
            if service is self._tunnels and (self.plan.tunnels or self.plan.server is not None):
                log_fast_path(self.fast_path)
            self.failures.extend(await service.start())
        if self.failures and self.strict:
            raise RuntimeFailure(f"{self.failures[0].line()} (--strict)")
        if self.fatal_error is not None:
            raise RuntimeFailure(self.fatal_error.line())
        if not any(service.active for service in self._services()):
            if self.failures:
                raise RuntimeFailure(f"nothing could start: {self.failures[0].line()}")
            raise RuntimeFailure(
                "nothing to run: the config has no [[forward]] or [[tunnel]]",
                hint="add one; see portfwd check",
            )
        if self.plan.user is not None:
            owned = [
                service.owned()
                for service in (self._rules, self._tunnels, self._control)
                if service is not None
            ]
            files = [path for part in owned for path in part.files]
            dirs = [path for part in owned for path in part.dirs]
            self._janitor = drop_privileges(self.plan.user, self.plan.group, files, dirs)
        await self._workers.launch()  # after the drop: workers run as the user this became
        # Everything allocated so far (imports, config, listeners) lives as long as the process:
        # keep it out of the cyclic GC's full scans, which per-connection garbage triggers
        # (bench/RESULTS.md, design measurement D8).
        gc.collect()
        gc.freeze()
        log.info(
            "portfwd %s ready: %d rule(s), %d listening socket(s), %d tunnel(s)%s%s",
            __version__,
            self._rules.running + self._kernel.running,
            self._rules.sockets,
            len(self._tunnels.running()),
            "" if self._rules.splice else ", splice unavailable (protocol relay everywhere)",
            f", {len(self.failures)} failed" if self.failures else "",
            extra=event(
                "ready",
                version=__version__,
                rules=self._rules.running + self._kernel.running,
                sockets=self._rules.sockets,
                tunnels=len(self._tunnels.running()),
                failed=len(self.failures),
                splice=self._rules.splice,
            ),
        )
        self._notify.ready(self._ready_status())

    def _ready_status(self) -> str:
        """The STATUS= line sent with READY=1: what is running now."""
        return (
            f"{self._rules.running + self._kernel.running} rule(s), "
            f"{self._rules.sockets} listening socket(s), "
            f"{len(self._tunnels.running())} tunnel(s)"
        )

    # ------------------------------------------------------------------ reload
    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and hand each service its part; a bad config changes nothing.

        Every service retires what the new plan dropped before any starts what it added, so a
        port one part gives up is free for another. Returns the control-socket answer: ok, and
        the rules kept, stopped and started, and what was refused.
        """
        async with self._reloading:
            assert self.loader is not None
            if self._closed:
                return {"ok": False, "errors": ["portfwd is stopping; nothing reloaded"]}
            self._notify.reloading()  # systemd shows "reloading" until READY=1, refused or not
            try:
                return await self._reload()
            finally:
                self._notify.reloaded(self._ready_status())

    async def _reload(self) -> dict[str, Any]:
        """reload() under its lock, the instance serving: load, retire, apply, answer."""
        assert self.loader is not None
        try:
            new = self.loader()
        except ConfigError as exc:
            for line in exc.problems:
                log.error(
                    "reload refused, old config keeps running: %s",
                    line,
                    extra=event("reload.refused", reason=line),
                )
            return {"ok": False, "errors": exc.problems}
        parts = self._reloadable(new)
        retired = [await service.retire(part) for service, part in parts]
        old, self.plan = self.plan, new
        applied = [await service.apply(part) for service, part in parts]
        user, kernel = applied[0], applied[1]  # the rules portfwd relays, and the kernel's
        rules = Change(
            kept=user.kept + kernel.kept,
            added=user.added + kernel.added,
            tried=user.tried + kernel.tried,
        )
        removed = retired[0].removed + kernel.removed  # the kernel's: what its one transaction took out
        failures = [failure for change in applied for failure in change.failures]
        for key, section in _RESTART_ONLY.items():
            if getattr(new, key) != getattr(old, key):
                log.warning("reload: %s changes take effect at the next start", section)
        added = rules.tried - len(failures)  # as ever: new rules less every failure, tunnels' too
        log.info(
            "reloaded %s: %d kept, %d removed, %d added, %d failed",
            self.config_path,
            rules.kept,
            len(removed),
            added,
            len(failures),
            extra=event(
                "reload",
                config=str(self.config_path or ""),
                kept=rules.kept,
                removed=len(removed),
                added=added,
                failed=len(failures),
            ),
        )
        return _answer(rules, removed, failures)

    def request_reload(self) -> None:
        """SIGHUP: reload in a task of the group (the signal handler must not block).

        With no config file to reload (`portfwd ssh`, `portfwd forward`) it stops as SIGTERM
        does: the Unix default, and what ends `ssh` when the terminal it ran in closes.
        """
        if self.loader is None:
            log.warning(
                "SIGHUP: no config file to reload; stopping", extra=event("stopping", reason="SIGHUP")
            )
            self.request_stop()
            return
        if not self._entered or self._closed:
            log.warning("SIGHUP: not serving (starting or stopping); nothing to reload")
            return
        task = self._tasks.create_task(self._reload_in_background(), name="portfwd reload")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_in_background(self) -> None:
        try:
            await self.reload()
        except Exception:  # a request's boundary, as on the control socket: log it, keep serving
            log.exception("reload failed; the instance keeps running")

    # ------------------------------------------------------------------ stop
    def request_stop(self) -> None:
        """Ask wait() to return (signal handlers call this); a second call closes at once."""
        if self._stop is None:
            return
        if self._stop.is_set():
            self._stopping = True  # second signal: skip the drain
            log.warning("second signal: closing all sessions now", extra=event("drain.skipped"))
            self._workers.abort()
            if self._drained is not None:
                self._drained.set()
        self._stop.set()

    async def wait(self) -> None:
        """Serve until request_stop()."""
        assert self._stop is not None
        await self._stop.wait()

    async def _drain(self) -> None:
        """Wait for live sessions to end, up to drain_timeout (a second signal ends the wait).
        The workers drain theirs meanwhile (the line counts them too); stop waits for them. The
        kernel relays' flows are asked of conntrack every KERNEL_DRAIN_POLL seconds."""
        if self._stopping:
            return
        kernel = await self._kernel.live() if self._kernel.active else 0
        total = len(self.state.sessions) + kernel
        total += await self._workers.sessions() if self._workers.running else 0
        if not total:
            return
        log.info(
            "draining %d session(s) for up to %gs",
            total,
            self.plan.drain_timeout,
            extra=event("drain", sessions=total, timeout_s=self.plan.drain_timeout),
        )
        if not self.state.sessions and not kernel:
            return
        drained = asyncio.Event()
        self._drained = drained
        self.state.on_empty = drained.set
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.plan.drain_timeout):
                if self.state.sessions:
                    await drained.wait()
                while kernel and not self._stopping:
                    await asyncio.sleep(KERNEL_DRAIN_POLL)  # conntrack has no event for this
                    kernel = await self._kernel.live()
        self.state.on_empty = None

    async def stop(self) -> None:
        """Stop accepting, drain live sessions for drain_timeout, close the rest, release all.

        A reload under way finishes first and none starts after; the janitor finishes last.
        """
        if self._closed:
            return
        self._closed = True
        self._notify.stopping()
        # A reload under way finishes first (it may be half-way through stopping a tunnel, which
        # a cancel would leave half-stopped); none starts after this.
        async with self._reloading:
            pass
        if self._background:
            await asyncio.wait(self._background)
        await self._sampler.stop()
        for service in self._services():
            await service.stop_accepting()
        await self._drain()
        for service in self._stop_order():
            try:
                await service.stop()
            except Exception:  # one part's failure must not leave the others running
                log.exception("stopping %s failed; stopping the rest", service.name)
        if self._janitor is not None:  # last: everything that made a file has let go of it
            self._janitor.finish()
            self._janitor = None
        if self._entered:
            self._entered = False
            await self._tasks.__aexit__(None, None, None)


def _split(plan: Plan, decided: dict[RuleSpec, bool]) -> tuple[tuple[RuleSpec, ...], tuple[RuleSpec, ...]]:
    """The rules the kernel relays (`relay = "kernel"`, and `auto` where it can), and the rest.

    `decided` remembers each rule's side: a rule a reload keeps stays where it runs, whatever
    changed on the machine meanwhile (moving it would cut its flows).
    """
    new = tuple(rule for rule in plan.rules if rule not in decided)
    chosen = set(auto.kernel_rules(new, plan.user)) if new else set()
    for rule in new:
        decided[rule] = rule in chosen
    kernel = tuple(rule for rule in plan.rules if decided[rule])
    return kernel, tuple(rule for rule in plan.rules if not decided[rule])


def _answer(rules: Change, removed: tuple[str, ...], failures: list[PortfwdError]) -> dict[str, Any]:
    """The reload answer on the control socket: the rules' changes and every failure."""
    return {
        "ok": not failures,
        "kept": rules.kept,
        "removed": list(removed),
        "added": list(rules.added),
        "errors": [failure.line() for failure in failures],
    }


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop where it is installed: portfwd is measured and tested on it."""
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
            log.info("stopping", extra=event("stopping"))
            await runtime.stop()
            log.info("stopped", extra=event("stopped"))
        if runtime.fatal_error is not None:
            raise RuntimeFailure(runtime.fatal_error.line())

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
