"""`[gateway]` while portfwd runs: apply the nftables plan, keep it loaded, show it, remove it.

The pieces are gwplan.py (the plan), nft.py (apply, read, remove), conntrack.py (NAT sessions,
timestamps, clearing flows) and triggers.py ("last trigger wins"); this is the one object that
runs them for the runtime, with the small lifecycle every running part has: `start()` (raises
GatewayError), `stop()`.

It follows the box as it changes: `ip monitor address` wakes it when an address comes or goes
(and it looks every GATEWAY_CHECK seconds anyway), and it then refreshes the one thing in the
table that holds addresses (the router's own access set) and says what moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable

from portfwd.instances import runtime_dir
from portfwd.kernel import conntrack, gwfirewall, gwplan, nft
from portfwd.kernel.hasupervisor import HASupervisor
from portfwd.kernel.triggers import LastWins
from portfwd.logevents import event
from portfwd.specs import GatewaySpec
from portfwd.state import State
from portfwd.statedir import state_dir
from portfwd.status import GatewayRuleRow, TriggerRow

log = logging.getLogger(__name__)

#: How often `portfwd run` checks that its nftables table is still loaded (seconds).
GATEWAY_CHECK = float(os.environ.get("PORTFWD_GATEWAY_CHECK", "10"))
#: How long after the kernel reports an address change the interfaces are read (seconds).
SETTLE = 0.2


def _saved_forwarding() -> str:
    return os.path.join(state_dir(), nft.SAVED_FORWARDING)


class GatewayService:
    """Applies `config` at start, re-applies it if changed or deleted behind our back, removes it at stop."""

    def __init__(self, config: GatewaySpec, state: State) -> None:
        self.config = config
        self.state = state
        self.ruleset: str | None = None  # the ruleset applied, while portfwd's table is ours
        self._found: gwplan.Interfaces | None = None
        self._fingerprint: str | None = None
        self._check: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_wins: LastWins | None = None
        self._restore_timestamps = False
        self._reported: list[str] = []  # what other tables drop, as last logged
        self._ha: HASupervisor | None = None  # keepalived + conntrackd, with [gateway.ha]
        self._ha_problem: str | None = None  # the last death of one of them, as logged

    async def start(self) -> None:
        """Plan and apply the ruleset, then watch that it stays loaded. Raises nft.GatewayError."""
        gateway = self.config
        for problem in nft.forwarding_problems(gateway.enable_forwarding, saved=_saved_forwarding()):
            log.warning("gateway: %s", problem, extra=event("gateway.problem", reason=problem))
        found = await asyncio.to_thread(nft.interfaces, gateway)
        problems = gwplan.check(gateway, found)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise nft.GatewayError(problems[0] + more)
        for note in gwplan.notes(gateway, found):
            log.warning("gateway: %s", note, extra=event("gateway.problem", reason=note))
        ruleset = gwplan.plan(gateway, found)
        await asyncio.to_thread(nft.apply, ruleset)
        self.ruleset, self._found = ruleset, found
        self._fingerprint = await asyncio.to_thread(nft.fingerprint)
        if conntrack.stamp(state_dir()):
            self._restore_timestamps = True
            log.info("gateway: turned on net.netfilter.nf_conntrack_timestamp (NAT session ages in status)")
        log.info(
            "gateway: table inet portfwd applied: %d forward rule(s), %d trigger(s)",
            len(gateway.forward),
            len(gateway.trigger),
            extra=event("gateway.applied", forwards=len(gateway.forward), triggers=len(gateway.trigger)),
        )
        await self._read()
        await self._other_tables()
        if gateway.ha is not None:
            self._ha = HASupervisor(gateway, runtime_dir() / "gateway-ha")
            await self._ha.start()
            log.info(
                "gateway: high availability with %s over %s (keepalived, conntrackd)",
                gateway.ha.peer,
                gateway.ha.sync_interface,
                extra=event("gateway.role", host=gateway.ha.peer, reason="starting"),
            )
        loop = asyncio.get_running_loop()
        self._monitor = loop.create_task(self._listen())
        self._check = loop.create_task(self._watch())
        self._last_wins = LastWins(gateway, found.lan_networks)
        await self._last_wins.start()

    async def _listen(self) -> None:
        """Wake the watch loop whenever the kernel reports an address added or removed."""
        try:
            proc = await asyncio.create_subprocess_exec(
                "ip", "-o", "monitor", "address",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        except OSError:
            return  # no ip: the periodic check still follows the addresses
        try:
            assert proc.stdout is not None
            while await proc.stdout.readline():
                self._wake.set()
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    async def _watch(self) -> None:
        """Follow address changes; every GATEWAY_CHECK seconds, load portfwd's table again if
        someone deleted or changed it."""
        while self.ruleset is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), GATEWAY_CHECK)
                await asyncio.sleep(SETTLE)  # a renumbering is a delete and an add: see both at once
            self._wake.clear()
            try:
                self._role()
                await self._follow()
                await self._other_tables()
                present = await self._read()
                if self.ruleset is None:
                    return
                if not present:
                    log.warning(
                        "gateway: table inet portfwd was removed behind our back; applying it again",
                        extra=event("gateway.drift", reason="removed"),
                    )
                elif await asyncio.to_thread(nft.fingerprint) != self._fingerprint:
                    log.warning(
                        "gateway: table inet portfwd was changed behind our back; applying it again",
                        extra=event("gateway.drift", reason="changed"),
                    )
                else:
                    continue
                assert self._found is not None
                self.ruleset = gwplan.plan(self.config, self._found)
                await asyncio.to_thread(nft.apply, self.ruleset)
                self._fingerprint = await asyncio.to_thread(nft.fingerprint)
                log.info("gateway: table inet portfwd applied again", extra=event("gateway.reapplied"))
            except nft.GatewayError as exc:
                log.error("gateway: %s", exc.line(), extra=event("gateway.failed", reason=exc.message))
            except Exception as exc:  # noqa: BLE001 - the watch goes on: drift, addresses, HA role
                reason = f"the gateway's watch failed once: {exc}"
                log.error("gateway: %s", reason, extra=event("gateway.failed", reason=reason))

    def _role(self) -> None:
        """Say when keepalived made this router master, backup or faulty."""
        if self._ha is None:
            return
        problem = self._ha.alive()
        if problem is not None and problem != self._ha_problem:  # once per death
            log.error("gateway: %s", problem, extra=event("gateway.failed", reason=problem))
        self._ha_problem = problem
        role, before = self._ha.role(), self.state.gateway_role
        if role != before:
            self.state.gateway_role = role
            log.info(
                "gateway: this router is now %s (was %s)",
                role,
                before or "starting",
                extra=event("gateway.role", host=role, previous=before or "starting"),
            )

    async def _follow(self) -> None:
        """Read the interfaces again; keep the WAN address set current and say what moved."""
        before = self._found
        found = await asyncio.to_thread(nft.interfaces, self.config)
        if before is None or found == before:
            return
        self._found = found
        if found.wan_addresses != before.wan_addresses:
            now, was = ", ".join(found.wan_addresses) or "none", ", ".join(before.wan_addresses) or "none"
            log.info(
                "gateway: %s addresses now %s (were %s)",
                self.config.wan,
                now,
                was,
                extra=event("gateway.addresses", host=now, previous=was),
            )
            if await asyncio.to_thread(nft.live) is not None:
                await asyncio.to_thread(nft.set_wan_addresses, found.wan_addresses)
                self._fingerprint = await asyncio.to_thread(nft.fingerprint)
        if (found.lan_networks, found.lan_networks6) != (before.lan_networks, before.lan_networks6):
            now = ", ".join(map(str, (*found.lan_networks, *found.lan_networks6))) or "none"
            was = ", ".join(map(str, (*before.lan_networks, *before.lan_networks6))) or "none"
            log.info(
                "gateway: %s networks now %s (were %s)",
                self.config.lan,
                now,
                was,
                extra=event("gateway.addresses", host=now, previous=was),
            )
            for problem in gwplan.check(self.config, found):
                log.warning("gateway: %s", problem, extra=event("gateway.problem", reason=problem))

    async def _other_tables(self) -> None:
        """Say (once per change) what other tables' forward chains drop; with the opt-in, open them."""
        listing = await asyncio.to_thread(nft.ruleset)
        found = gwfirewall.findings(self.config, listing)
        if found and self.config.open_other_tables:
            try:
                for opened in await asyncio.to_thread(gwfirewall.open_, found):
                    log.info("gateway: opened %s", opened, extra=event("gateway.opened", rule=opened))
            except nft.GatewayError as exc:
                log.error("gateway: %s", exc.line(), extra=event("gateway.failed", reason=exc.message))
            found = gwfirewall.findings(self.config, await asyncio.to_thread(nft.ruleset))
        lines = [gwfirewall.line(item, self.config.open_other_tables) for item in found]
        if lines == self._reported:
            return
        for item, text in zip(found, lines, strict=True):
            level = logging.ERROR if item.certain else logging.WARNING
            log.log(
                level, "gateway: %s", text, extra=event("gateway.blocked", rule=item.probe.what, reason=text)
            )
        if not lines:
            log.info(
                "gateway: the other tables' forward chains let the forwards through now",
                extra=event("gateway.unblocked"),
            )
        self._reported = lines

    async def _read(self) -> bool:
        """Refresh the gateway counters and trigger holders in the state; False if the table is gone."""
        listing = await asyncio.to_thread(nft.live)
        if listing is None:
            return False
        self.state.gateway_rules = [
            GatewayRuleRow(row["chain"], row["rule"], row["packets"], row["bytes"])
            for row in nft.counters(listing)
        ]
        gateway = self.config
        holders = nft.trigger_holders(listing)
        self.state.triggers = [
            TriggerRow(
                trigger=trigger.name or f"gateway.trigger[{index}]",
                open=", ".join(f"{proto}/{ports}" for proto, ports in trigger.open),
                host=holders.get(index, ("", 0))[0],
                expires=holders.get(index, ("", 0))[1],
            )
            for index, trigger in enumerate(gateway.trigger)
        ]
        flows = await asyncio.to_thread(conntrack.sessions, conntrack.claims(gateway))
        self.state.gateway_sessions = conntrack.session_rows(flows)
        return True

    async def stop(self) -> None:
        """Stop watching, stop the HA engines and the trigger daemon, delete the table and the
        flows it translated. Each step is tried on its own: a failing one is logged and the
        rest still happen (the table above all)."""
        tasks = [task for task in (self._check, self._monitor) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # a crashed watcher must not stop this
        self._check = self._monitor = None
        if self._ha is not None:  # first: the addresses move to the other router, the state stays
            await self._step("stop keepalived and conntrackd", self._ha.stop())
            self._ha = None
        if self._last_wins is not None:
            await self._step("stop the trigger watcher", self._last_wins.stop())
            self._last_wins = None
        if self.ruleset is not None:
            self.ruleset = None
            if self.config.open_other_tables:
                await self._step("remove the accepts it added to other tables", self._close_openings())
            await self._step("remove table inet portfwd", self._remove())
        if self._restore_timestamps:
            conntrack.unstamp(state_dir())
            self._restore_timestamps = False
        for path in nft.restore_forwarding(_saved_forwarding()):
            log.info("gateway: turned off %s again (portfwd had turned it on)", path)

    @staticmethod
    async def _step(doing: str, step: Awaitable[object]) -> None:
        try:
            await step
        except Exception as exc:  # noqa: BLE001 - every step of a stop is tried
            reason = exc.line() if isinstance(exc, nft.GatewayError) else f"cannot {doing}: {exc}"
            log.error("gateway: %s", reason, extra=event("gateway.failed", reason=reason))

    async def _close_openings(self) -> None:
        closed = await asyncio.to_thread(gwfirewall.close)
        if closed:
            log.info(
                "gateway: removed the %d accept(s) it added to other tables",
                closed,
                extra=event("gateway.closed", flows=closed),
            )

    async def _remove(self) -> None:
        await asyncio.to_thread(nft.remove)
        found = self._found
        networks = found.lan_networks if found is not None and self.config.masquerade else ()
        via = (*(found.wan_addresses if found is not None else ()), *gwplan.virtual_wan(self.config, found))
        cleared = await asyncio.to_thread(conntrack.forget, conntrack.claims(self.config), networks, via)
        log.info(
            "gateway: table inet portfwd removed, %d translated flow(s) cleared",
            cleared,
            extra=event("gateway.removed", flows=cleared),
        )
