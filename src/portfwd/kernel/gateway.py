"""`[gateway]` while portfwd runs: apply the nftables plan, keep it loaded, show it, remove it.

The pieces are nft.py (plan, apply, read, remove), conntrack.py (NAT sessions, timestamps) and
triggers.py ("last trigger wins"); this is the one object that runs them for the runtime, with
the small lifecycle every running part has: `start()` (raises GatewayError), `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from portfwd.kernel import conntrack, nft
from portfwd.kernel.triggers import LastWins
from portfwd.logevents import event
from portfwd.specs import GatewaySpec
from portfwd.state import State
from portfwd.status import GatewayRuleRow, GatewaySessionRow, TriggerRow

log = logging.getLogger(__name__)

#: How often `portfwd run` checks that its nftables table is still loaded (seconds).
GATEWAY_CHECK = float(os.environ.get("PORTFWD_GATEWAY_CHECK", "10"))


class GatewayService:
    """Applies `config` at start, re-applies it if changed or deleted behind our back, removes it at stop."""

    def __init__(self, config: GatewaySpec, state: State) -> None:
        self.config = config
        self.state = state
        self.ruleset: str | None = None  # the ruleset applied, while portfwd's table is ours
        self._fingerprint: str | None = None
        self._check: asyncio.Task[None] | None = None
        self._last_wins: LastWins | None = None
        self._restore_timestamps = False

    async def start(self) -> None:
        """Plan and apply the ruleset, then watch that it stays loaded. Raises nft.GatewayError."""
        gateway = self.config
        for problem in nft.forwarding_problems(gateway.enable_forwarding):
            log.warning("gateway: %s", problem, extra=event("gateway.problem", reason=problem))
        found = await asyncio.to_thread(nft.interfaces, gateway)
        problems = nft.check(gateway, found)
        if problems:
            raise nft.GatewayError(problems[0])
        ruleset = nft.plan(gateway, found)
        await asyncio.to_thread(nft.apply, ruleset)
        self.ruleset = ruleset
        self._fingerprint = await asyncio.to_thread(nft.fingerprint)
        if conntrack.timestamps(on=True) is False:
            self._restore_timestamps = True
            log.info("gateway: turned on net.netfilter.nf_conntrack_timestamp (NAT session ages in status)")
        log.info(
            "gateway: table inet portfwd applied: %d forward rule(s), %d trigger(s)",
            len(gateway.forward),
            len(gateway.trigger),
            extra=event("gateway.applied", forwards=len(gateway.forward), triggers=len(gateway.trigger)),
        )
        await self._read()
        self._check = asyncio.get_running_loop().create_task(self._watch())
        self._last_wins = LastWins(gateway, found.lan_networks)
        await self._last_wins.start()

    async def _watch(self) -> None:
        """Every GATEWAY_CHECK seconds: if someone deleted or changed portfwd's table, load it again."""
        while self.ruleset is not None:
            await asyncio.sleep(GATEWAY_CHECK)
            try:
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
                await asyncio.to_thread(nft.apply, self.ruleset)
                self._fingerprint = await asyncio.to_thread(nft.fingerprint)
                log.info("gateway: table inet portfwd applied again", extra=event("gateway.reapplied"))
            except nft.GatewayError as exc:
                log.error("gateway: %s", exc.line(), extra=event("gateway.failed", reason=exc.message))

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
        self.state.gateway_sessions = [
            GatewaySessionRow(
                row["rule"],
                row["proto"],
                row["client"],
                row["public_port"],
                row["target"],
                row["state"],
                row["age"],
            )
            for row in flows
        ]
        return True

    async def stop(self) -> None:
        """Stop watching, stop the trigger daemon, delete the table (errors logged, not raised)."""
        if self._check is not None:
            self._check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._check
            self._check = None
        if self._last_wins is not None:
            await self._last_wins.stop()
            self._last_wins = None
        if self.ruleset is None:
            return
        self.ruleset = None
        try:
            await asyncio.to_thread(nft.remove)
            log.info("gateway: table inet portfwd removed", extra=event("gateway.removed"))
            if self._restore_timestamps:
                conntrack.timestamps(on=False)
                self._restore_timestamps = False
        except nft.GatewayError as exc:
            log.error("gateway: %s", exc.line(), extra=event("gateway.failed", reason=exc.message))
