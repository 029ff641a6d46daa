"""The `[[forward]]` rules with `relay = "kernel"`, as a service: one nftables table per instance.

kernel/relay.py compiles the rules and kernel/relaytable.py loads them; this applies the table
at start, re-plans it on reload (one transaction: the kept rules' flows never notice), keeps
the rules' counters and live flows in the state every REFRESH seconds (status and /metrics
read them as any rule's), and at stop deletes the table and the flows it translated.

Each rule's listen ports are held by a bound socket that never listens (as kube-proxy holds its
node ports): a port another program uses is refused at start with the userspace rule's words,
and no program can take the port later and be silently shadowed by the NAT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import socket

from portfwd.addr import HostPorts
from portfwd.errors import ActionError, PortfwdError, RuntimeFailure
from portfwd.kernel import conntrack, nft, relaytable
from portfwd.kernel import relay as kernel
from portfwd.logevents import event
from portfwd.relay.listener import bind_error
from portfwd.services.base import Change, Reloadable
from portfwd.specs import RuleSpec
from portfwd.state import State
from portfwd.status import Listener

log = logging.getLogger(__name__)

#: Seconds between reads of the kernel's counters and flows.
REFRESH = float(os.environ.get("PORTFWD_KERNEL_REFRESH", "2"))
#: conntrack states of a TCP flow that has ended (listed until its timer runs out; not active).
ENDED = ("TIME_WAIT", "CLOSE")
#: Ports held per rule at most (a range longer than this is held by its first ports only).
MAX_HELD = 1024


def table_name(instance: str) -> str:
    """The instance's own nft table: `portfwd_` and 10 hex digits of its name."""
    return "portfwd_" + hashlib.blake2s(instance.encode(), digest_size=5).hexdigest()


def _hold(rule: RuleSpec, dual: bool = True) -> list[socket.socket]:
    """Bind (never listen on) the rule's ports. Raises RuntimeFailure naming a port in use, in
    the words a userspace rule would use.

    As the userspace relay binds: `*` is one dual-stack socket (IPv4 alone where the machine
    has no IPv6), `::` IPv6 only, `0.0.0.0` IPv4 only.
    """
    listen = rule.listen
    assert isinstance(listen, HostPorts)
    wildcard = listen.host == ""
    family = socket.AF_INET6 if ":" in listen.host or (wildcard and dual) else socket.AF_INET
    host = listen.host or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    kinds = [
        kind
        for kind, on in (
            (socket.SOCK_STREAM, rule.protocol.has_tcp),
            (socket.SOCK_DGRAM, rule.protocol.has_udp),
        )
        if on
    ]
    held: list[socket.socket] = []
    try:
        for port in list(listen.ports.ports())[:MAX_HELD]:
            for kind in kinds:
                sock = socket.socket(family, kind)
                held.append(sock)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if wildcard else 1)
                sock.bind((host, port))
    except OSError as exc:
        for sock in held:
            sock.close()
        if wildcard and dual and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            return _hold(rule, dual=False)  # no IPv6 here: the IPv4 wildcard
        proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
        error = bind_error(f"{rule.where}.listen", f"{listen.host or '*'}:{port}/{proto}", exc, port)
        raise RuntimeFailure(
            f"{rule.label}: {error.message} (held for the kernel relay)", hint=error.hint
        ) from None
    return held


def _holding(rule: RuleSpec) -> tuple[str, str]:
    """What a rule's held sockets stand for: a changed rule with the same listen side keeps them."""
    return str(rule.listen), rule.protocol.value


class KernelRules(Reloadable[tuple[RuleSpec, ...]]):
    """The kernel relays of one instance: its table, the ports it holds, the counters it reads."""

    name = "kernel relays"

    def __init__(
        self, rules: tuple[RuleSpec, ...], state: State, table: str, modes: dict[str, str] | None = None
    ) -> None:
        self.wanted = rules
        self.state = state
        self.table = table
        self.rules: dict[RuleSpec, list[socket.socket]] = {}  # the running rules and their held ports
        self._loaded = False  # the table is ours and in the kernel
        self._refresh: asyncio.Task[None] | None = None
        #: What the tables replaced by reloads counted, per label: added to the live counters.
        self._base: dict[str, relaytable.Counts] = {}
        self._counting = asyncio.Lock()  # a table replaced and its counters carried over, or read
        self._gone: list[str] = []  # labels `retire` took out already (apply reports them)
        #: The operator's mode of a rule, by name (the RuleSet's own dict: a rule keeps its mode
        #: through a reload, whichever side relays it then).
        self.modes: dict[str, str] = modes if modes is not None else {}
        self._exiting = False  # shutdown began: every rule drains (`stop_accepting`)

    def knows(self, name: str) -> bool:
        """Whether a kernel relay of that name runs."""
        return any(rule.label == name for rule in self.rules)

    async def set_mode(self, name: str, mode: str) -> None:
        """Pause (`paused`), drain (`draining`) or resume (`""`) kernel relay `name`: the table
        is planned again with the mode in the rule's NAT chains (relay.py), in one transaction;
        live flows are not touched. Raises ActionError when no such rule runs, shutdown began,
        or nft refuses (then the mode is as it was). A request that goes away meanwhile does
        not cut the change short (the table, the counters carried over and the mode agree)."""
        if not self.knows(name):
            raise ActionError(f"no running rule named {name!r}", kind="missing")
        if self._exiting:
            raise ActionError("shutting down: every kernel relay drains", kind="conflict")
        await asyncio.shield(self._set_mode(name, mode))

    async def _set_mode(self, name: str, mode: str) -> None:
        before = self.modes.get(name, "")
        if mode:
            self.modes[name] = mode
        else:
            self.modes.pop(name, None)
        problems = await self._load()
        if problems:
            if before:
                self.modes[name] = before
            else:
                self.modes.pop(name, None)
            raise ActionError(problems[0].message, kind="conflict", hint=problems[0].hint)
        self.state.rule(name).mode = mode

    async def stop_accepting(self) -> None:
        """Shutdown begins: every rule drains, as the web API's drain does (new flows refused,
        live ones go on) until `stop` removes the table and the flows left."""
        if not self.rules or not self._loaded:
            return
        self._exiting = True
        await self._load()  # a refusal is logged; the table in force stays until stop

    async def live(self) -> int:
        """The kernel relays' TCP flows conntrack still has open (TIME_WAIT and CLOSE are over),
        what a shutdown drains. UDP flows are not waited for: they end with the table, as a
        userspace rule's end with its socket."""
        if not self.rules:
            return 0
        flows = await asyncio.to_thread(conntrack.sessions, conntrack.rule_claims(list(self.rules)))
        return sum(1 for flow in flows if flow["proto"] == "tcp" and flow["state"] not in ENDED)

    @property
    def active(self) -> bool:
        return bool(self.rules)

    @property
    def running(self) -> int:
        return len(self.rules)

    async def start(self) -> list[PortfwdError]:
        if self.wanted:  # a table of the same instance left by a crash would shadow the rules
            with contextlib.suppress(kernel.KernelRelayError, OSError):
                await asyncio.to_thread(relaytable.remove, self.table)
        return list((await self.apply(self.wanted)).failures)

    async def retire(self, part: tuple[RuleSpec, ...]) -> Change:
        """Note what goes; `apply` replaces the table in one transaction, so a rule a reload
        changes is never unforwarded, nor its ports unheld, in between. A rule whose listen
        side no new kernel rule takes (it moves to userspace, or goes) is let go now: its NAT
        and its held ports would stand in the way of a userspace listener binding them."""
        going = [rule for rule in self.rules if rule not in part]
        keeps = {_holding(rule) for rule in part}
        now = [rule for rule in going if _holding(rule) not in keeps]
        if now:
            before = dict(self.rules)
            self.rules = {rule: held for rule, held in self.rules.items() if rule not in now}
            if await self._load():  # refused (logged): the old table stays, and so do they
                self.rules = before
            else:
                await self._let_go(now, before)
                self._gone += [rule.label for rule in now]
        return Change(removed=tuple(rule.label for rule in going))

    async def apply(self, part: tuple[RuleSpec, ...]) -> Change:
        going = [rule for rule in self.rules if rule not in part]
        gone, self._gone = self._gone, []
        before = dict(self.rules)
        kept = len(self.rules) - len(going)
        added = [rule for rule in dict.fromkeys(part) if rule not in self.rules]
        failures: list[PortfwdError] = []
        spare = {_holding(rule): self.rules[rule] for rule in going}  # a changed rule keeps its ports
        wanted = {rule: held for rule, held in self.rules.items() if rule not in going}
        for rule in added:
            try:
                why = kernel.unsuitable(rule)
                if why is not None:
                    raise RuntimeFailure(f'{why}; it cannot have relay = "kernel"')
                wanted[rule] = spare.pop(_holding(rule), []) or _hold(rule)
            except RuntimeFailure as exc:
                log.error("%s", exc.line(), extra=event("rule.failed", rule=rule.label, reason=exc.message))
                failures.append(exc)
        self.rules = wanted
        problems = await self._load() if going or len(wanted) > kept or not self._loaded else []
        if problems:  # the old table stays in force, with its rules and their ports
            reused = {id(sock) for held in before.values() for sock in held}
            for rule, held in wanted.items():
                if rule not in before:
                    for sock in held:
                        if id(sock) not in reused:
                            sock.close()
            self.rules = before
            new = [rule for rule in added if rule in wanted]
            failures.extend([problems[0]] * max(1, len(new)))  # one per rule that did not start
            return Change(kept=len(before), removed=tuple(gone), tried=len(added), failures=tuple(failures))
        await self._let_go(going, before)
        started = [rule for rule in added if rule in wanted]
        for rule in started:
            self._register(rule)
        if started and kernel.needs_forwarding(started):
            for problem in nft.forwarding_problems(enable=False, remedy=""):
                log.warning("kernel relay: %s", problem, extra=event("rule.problem", reason=problem))
        self.state.order_rules(rule.label for rule in part)
        if self.rules and self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(self._keep_reading())
        if self.rules and self._read_flows not in self.state.readers:
            self.state.readers.append(self._read_flows)
        return Change(
            kept=kept,
            removed=(*gone, *(rule.label for rule in going)),
            added=tuple(rule.label for rule in started),
            tried=len(added),
            failures=tuple(failures),
        )

    async def _let_go(self, going: list[RuleSpec], before: dict[RuleSpec, list[socket.socket]]) -> None:
        """Rules the table no longer has: close their held ports (unless a running rule took
        them over), take them out of the state, and forget their flows."""
        if not going:
            return
        in_use = {id(sock) for held in self.rules.values() for sock in held}
        for rule in going:
            for sock in before[rule]:
                if id(sock) not in in_use:
                    sock.close()
            if rule.label not in {kept_rule.label for kept_rule in self.rules}:
                self.state.rule(rule.label).running = False
                self.state.listeners = [item for item in self.state.listeners if item.rule != rule.label]
            log.info(
                "%s: removed by reload; the kernel no longer forwards it",
                rule.label,
                extra=event("rule.removed", rule=rule.label),
            )
        await asyncio.to_thread(conntrack.forget, conntrack.rule_claims(going))

    async def _load(self) -> list[PortfwdError]:
        """Make the kernel's table hold exactly the running rules (one transaction). The
        counters of the table it replaces are carried over (the new one counts from 0); the
        2 s reader waits meanwhile, so a total never goes back."""
        async with self._counting:
            try:
                before = await asyncio.to_thread(relaytable.listing, self.table) if self._loaded else None
                if not self.rules:
                    if self._loaded:
                        await asyncio.to_thread(relaytable.remove, self.table)
                        self._loaded = False
                else:
                    modes = {rule.label: "draining" for rule in self.rules} if self._exiting else self.modes
                    text = kernel.plan(list(self.rules), self.table, modes)
                    await asyncio.to_thread(relaytable.apply, text, self.table)
                    self._loaded = True
            except kernel.KernelRelayError as exc:
                error: PortfwdError = exc
                if "Operation not permitted" in exc.message:
                    error = RuntimeFailure(
                        f"the kernel relay cannot load its nftables table: {exc.message}",
                        hint='it needs root or CAP_NET_ADMIN; use relay = "splice" otherwise',
                    )
                log.error(
                    "%s", error.line(), extra=event("rule.failed", rule=self.table, reason=error.message)
                )
                return [error]
            for label, counted in relaytable.counts(before or {}).items():
                base = self._base.get(label, relaytable.Counts())
                self._base[label] = relaytable.Counts(
                    base.connections + counted.connections,
                    base.denied + counted.denied,
                    base.bytes_up + counted.bytes_up,
                    base.bytes_down + counted.bytes_down,
                    base.draining + counted.draining,
                )
            return []

    def _register(self, rule: RuleSpec) -> None:
        listen, target = str(rule.listen), str(rule.connect)
        protocol = rule.protocol.value
        stats = self.state.rule(rule.label)
        stats.listen, stats.connect, stats.protocol, stats.relay = listen, target, protocol, "kernel"
        stats.running = True
        stats.mode = self.modes.get(rule.label, "")
        self.state.listeners.append(Listener(rule.label, listen, protocol, "kernel"))
        log.info(
            "%s: forwarding %s/%s -> %s in the kernel (nftables table inet %s)",
            rule.label,
            listen,
            protocol,
            target,
            self.table,
            extra=event(
                "rule.listening",
                rule=rule.label,
                listen=listen,
                protocol=protocol,
                target=target,
                path="kernel",
            ),
        )

    async def _keep_reading(self) -> None:
        """Every REFRESH seconds: the rules' counters (cheap: nft lists its named counters), so
        rates are sampled. The live flows are read only when status or /metrics asks
        (`State.readers`): a conntrack dump of a busy box is not free (D23)."""
        while self.rules:
            try:
                await self._read_counters()
            except Exception as exc:  # noqa: BLE001 - the counters must keep being read
                log.warning("kernel relays: cannot read the counters: %s", exc)
            await asyncio.sleep(REFRESH)
        self.state.kernel_sessions = []
        self._refresh = None

    async def _read_counters(self) -> None:
        async with self._counting:
            listing = await asyncio.to_thread(relaytable.listing, self.table) if self._loaded else None
        counted = relaytable.counts(listing or {})
        for rule in self.rules:
            label = kernel.comment(rule)
            found, base = counted.get(label, relaytable.Counts()), self._base.get(label, relaytable.Counts())
            stats = self.state.rule(rule.label)
            stats.connections_total = base.connections + found.connections
            stats.denied_total = base.denied + found.denied
            stats.bytes_up = base.bytes_up + found.bytes_up
            stats.bytes_down = base.bytes_down + found.bytes_down
            if base.draining or found.draining:
                stats.errors["draining"] = base.draining + found.draining

    async def _read_flows(self) -> None:
        """The live flows and counters, now: what status and /metrics show."""
        if not self.rules:
            return
        with contextlib.suppress(kernel.KernelRelayError, OSError):
            await self._read_counters()
        rules = list(self.rules)
        flows = await asyncio.to_thread(conntrack.sessions, conntrack.rule_claims(rules))
        live: dict[str, int] = {}
        for flow in flows:
            if flow["state"] not in ENDED:
                live[flow["rule"]] = live.get(flow["rule"], 0) + 1
        for rule in rules:
            self.state.rule(rule.label).connections_active = live.get(rule.label, 0)
        self.state.kernel_sessions = conntrack.session_rows(flows)

    async def stop(self) -> None:
        if self._read_flows in self.state.readers:
            self.state.readers.remove(self._read_flows)
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
            self._refresh = None
        self._exiting = True  # no mode change loads a table after this
        async with self._counting:  # one under way has loaded its table by then
            rules = list(self.rules)
            for held in self.rules.values():
                for sock in held:
                    sock.close()
            self.rules.clear()
            loaded, self._loaded = self._loaded, False
        if not loaded:
            return
        try:
            await asyncio.to_thread(relaytable.remove, self.table)
        except (kernel.KernelRelayError, OSError) as exc:
            reason = exc.line() if isinstance(exc, kernel.KernelRelayError) else str(exc)
            log.error("kernel relays: %s", reason, extra=event("rule.failed", rule=self.table, reason=reason))
            return
        cleared = await asyncio.to_thread(conntrack.forget, conntrack.rule_claims(rules))
        log.info(
            "kernel relays: table inet %s removed, %d flow(s) cleared",
            self.table,
            cleared,
            extra=event("rule.removed", rule=self.table, reason=f"{cleared} flow(s) cleared"),
        )
