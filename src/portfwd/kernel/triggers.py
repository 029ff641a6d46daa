"""Port triggering, "last trigger wins" mode: conntrack events in, nft map updates out.

The kernel-only mode keeps the first host that triggers (nft's `update` cannot replace a map
value). Here a `conntrack -E` process per trigger reports each new outbound connection to the
trigger port; the newest LAN host that opens one takes the ports at once, and each change is
logged. Expiry after idle_timeout is still the kernel's (the map's element timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import shutil

from portfwd.kernel import nft
from portfwd.logevents import event
from portfwd.specs import GatewaySpec, GatewayTriggerSpec

log = logging.getLogger(__name__)


def parse_event(line: str) -> tuple[str, str, int] | None:
    """`[NEW] tcp 6 120 SYN_SENT src=A dst=B sport=1 dport=6667 ...` -> ("tcp", "A", 6667)."""
    fields = line.split()
    if len(fields) < 3 or fields[0] != "[NEW]":
        return None
    values: dict[str, str] = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if sep and key not in values:  # the first src/dport are the original direction
            values[key] = value
    try:
        return fields[1], values["src"], int(values["dport"])
    except (KeyError, ValueError):
        return None


class LastWins:
    """Watches the triggers whose mode is "last-wins" and hands their ports to the newest host."""

    def __init__(self, config: GatewaySpec, lan: tuple[ipaddress.IPv4Network, ...]) -> None:
        self.config = config
        self.lan = lan
        self.holders: dict[int, str] = {}
        self._procs: list[asyncio.subprocess.Process] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start one `conntrack -E` per last-wins trigger. Raises nft.GatewayError without conntrack."""
        watched = [(i, t) for i, t in enumerate(self.config.trigger) if t.mode == "last-wins"]
        if not watched:
            return
        if shutil.which("conntrack") is None:
            raise nft.GatewayError('mode = "last-wins" needs conntrack', hint="apt-get install conntrack")
        for index, trigger in watched:
            proto, ports = trigger.trigger
            argv = ["conntrack", "-E", "-e", "NEW", "-p", proto]
            if len(ports) == 1:
                argv += ["--orig-port-dst", str(ports.first)]
            if shutil.which("stdbuf"):  # conntrack buffers its output when it is a pipe
                argv = ["stdbuf", "-oL", *argv]
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
            self._procs.append(proc)
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch(index, trigger, proc)))

    async def _watch(self, index: int, trigger: GatewayTriggerSpec, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        proto, ports = trigger.trigger
        name = trigger.name or f"gateway.trigger[{index}]"
        while line := await proc.stdout.readline():
            seen = parse_event(line.decode(errors="replace"))
            if seen is None or seen[0] != proto or seen[2] not in ports.ports():
                continue
            host = seen[1]
            try:
                if not any(ipaddress.IPv4Address(host) in net for net in self.lan):
                    continue
            except ValueError:
                continue
            previous = self.holders.get(index)
            try:
                await asyncio.to_thread(nft.hand_over, index, host)
            except nft.GatewayError as exc:
                log.error(
                    "%s: %s", name, exc.line(), extra=event("trigger.failed", rule=name, reason=exc.message)
                )
                continue
            self.holders[index] = host
            if previous != host:
                log.info(
                    "%s: %s takes the ports%s",
                    name,
                    host,
                    f" from {previous}" if previous else "",
                    extra=event("trigger.handover", rule=name, host=host, previous=previous),
                )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await proc.wait()
        self._procs.clear()
        self._tasks.clear()
