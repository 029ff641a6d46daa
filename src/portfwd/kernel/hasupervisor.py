"""Runs keepalived and conntrackd for `[gateway.ha]` as portfwd's own children, in the foreground.

They are the routers' own engines for VRRP and for NAT state sync; portfwd writes their
configuration (kernel/ha.py), starts them, tells keepalived to reload, reads the role the notify
script records and stops them by PID. Everything they write lives in one directory of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from portfwd.kernel import ha
from portfwd.kernel.nft import GatewayError
from portfwd.specs import GatewaySpec

log = logging.getLogger(__name__)

#: How long each engine gets to come up, and to go after SIGTERM.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
POLL = 0.05
#: A short command (ip, conntrackd -s, keepalived --config-test).
COMMAND_TIMEOUT = 10.0


def _tail(path: Path, lines: int = 1) -> str:
    """The last non-empty lines of a log, for an error message."""
    with contextlib.suppress(OSError):
        text = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return " / ".join(text[-lines:])
    return ""


async def _run(*argv: str) -> tuple[int, str]:
    """Run a short command; (exit code, stdout+stderr). Raises GatewayError if it cannot run."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise GatewayError(f"gateway.ha: cannot run {argv[0]}: {exc.strerror}") from exc
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise GatewayError(
            f"gateway.ha: {' '.join(argv[:3])} did not finish in {COMMAND_TIMEOUT:g}s"
        ) from exc
    return int(proc.returncode or 0), out.decode(errors="replace")


async def host_addresses(gateway: GatewaySpec) -> ha.HAHost:
    """This router's addresses on the sync, WAN and LAN links (not the virtual ones), from
    `ip -j -4 addr`. Raises GatewayError when the sync link has none."""
    assert gateway.ha is not None
    code, out = await _run("ip", "-j", "-4", "addr", "show")
    if code != 0:
        raise GatewayError(f"gateway.ha: ip addr failed: {out.strip()}")
    virtual = {vip.ip for vip in gateway.ha.virtual_addresses}
    found: dict[str, list[ipaddress.IPv4Interface]] = {}
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            addr = ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
            if addr.ip not in virtual:
                found.setdefault(link["ifname"], []).append(addr)
    sync = found.get(gateway.ha.sync_interface, [])
    if not sync:
        raise GatewayError(
            f"gateway.ha.sync_interface: {gateway.ha.sync_interface} has no IPv4 address"
            " (or does not exist); VRRP and conntrackd speak from it"
        )
    return ha.HAHost(sync[0], tuple(found.get(gateway.wan, ())), tuple(found.get(gateway.lan, ())))


class HASupervisor:
    """keepalived and conntrackd for one gateway, with their files under `directory`.

    `start()` writes the configs, has keepalived check its own, starts conntrackd, then
    keepalived, and returns when both are up. `role()` is what the notify script last recorded.
    `stop()` ends both by PID and removes what they leave (virtual addresses, files).
    """

    def __init__(self, gateway: GatewaySpec, directory: str | Path) -> None:
        if gateway.ha is None:
            raise GatewayError("gateway.ha: not configured")
        self.gateway = gateway
        self.paths = ha.HAPaths.under(directory)
        self.keepalived_log = self.paths.directory / "keepalived.log"
        # conntrackd in the foreground also prints its log lines: keep them apart from LogFile
        self.conntrackd_console = self.paths.directory / "conntrackd.console"
        self._keepalived: asyncio.subprocess.Process | None = None
        self._conntrackd: asyncio.subprocess.Process | None = None
        self._placed: tuple[tuple[ipaddress.IPv4Interface, str], ...] = ()
        self._conntrackd_text = ""

    @staticmethod
    def _binary(name: str) -> str:
        for path in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}"):
            if path and os.access(path, os.X_OK):
                return path
        raise GatewayError(f"gateway.ha: {name} is not installed (apt-get install {name})")

    async def _write(self) -> None:
        """Write the three files. keepalived checks its new config before it replaces the old,
        so a refused reload leaves the running configs as they were. Raises GatewayError."""
        host = await host_addresses(self.gateway)
        paths = self.paths
        placed = ha.placement(self.gateway, host)
        keepalived_text = ha.keepalived_conf(self.gateway, paths, host)
        conntrackd_text = ha.conntrackd_conf(self.gateway, paths, host)
        # the script depends only on the paths: the same text the running keepalived calls
        self._replace(paths.notify_script, ha.notify_script(paths, self._binary("conntrackd")), 0o700)
        candidate = self._stage(paths.keepalived_conf, keepalived_text, 0o600)
        code, out = await _run(self._binary("keepalived"), "--config-test", "-f", str(candidate))
        if code != 0:
            candidate.unlink(missing_ok=True)
            lines = [line.strip() for line in out.splitlines() if line.strip()]
            raise GatewayError(f"gateway.ha: keepalived refused its config: {' / '.join(lines[-2:])}")
        candidate.replace(paths.keepalived_conf)
        self._replace(paths.conntrackd_conf, conntrackd_text, 0o600)
        self._placed, self._conntrackd_text = placed, conntrackd_text

    @staticmethod
    def _stage(path: Path, text: str, mode: int) -> Path:
        staged = path.with_name(path.name + ".new")
        staged.write_text(text)
        staged.chmod(mode)
        return staged

    def _replace(self, path: Path, text: str, mode: int) -> None:
        self._stage(path, text, mode).replace(path)

    async def start(self) -> None:
        """Start conntrackd, then keepalived, and wait until both are up. Raises GatewayError."""
        paths = self.paths
        paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in (paths.state_file, paths.conntrackd_lock, paths.conntrackd_socket):
            stale.unlink(missing_ok=True)  # ours, from a run that did not stop cleanly
        try:
            await self._write()
            await self._start_conntrackd()
            await self._start_keepalived()
        except BaseException:
            await self.stop()
            raise

    async def _spawn(self, argv: list[str], logfile: Path) -> asyncio.subprocess.Process:
        with logfile.open("ab") as out:
            try:
                return await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
                )
            except OSError as exc:
                raise GatewayError(f"gateway.ha: cannot start {argv[0]}: {exc.strerror}") from exc

    async def _start_conntrackd(self) -> None:
        paths = self.paths
        conntrackd = self._binary("conntrackd")
        # no -d: it stays in the foreground, our child
        proc = await self._spawn([conntrackd, "-C", str(paths.conntrackd_conf)], self.conntrackd_console)
        self._conntrackd = proc
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise GatewayError(
                    f"gateway.ha: conntrackd exited ({proc.returncode}):"
                    f" {_tail(self.conntrackd_console) or _tail(paths.conntrackd_log) or 'no message'}"
                )
            if paths.conntrackd_socket.exists():
                code, _ = await _run(conntrackd, "-C", str(paths.conntrackd_conf), "-s", "runtime")
                if code == 0:
                    log.info("gateway.ha: conntrackd up (pid %d)", proc.pid)
                    return
            await asyncio.sleep(POLL)
        raise GatewayError(
            f"gateway.ha: conntrackd did not answer on {paths.conntrackd_socket} in {START_TIMEOUT:g}s"
        )

    async def _start_keepalived(self) -> None:
        paths = self.paths
        argv = [
            self._binary("keepalived"),
            "--dont-fork",
            "--log-console",
            "--log-detail",
            "--no-syslog",
            "--vrrp",
            "--use-file",
            str(paths.keepalived_conf),
            "--pid",
            str(paths.keepalived_pid),
            "--vrrp_pid",
            str(paths.vrrp_pid),
            "--checkers_pid",
            str(paths.checkers_pid),
        ]
        proc = await self._spawn(argv, self.keepalived_log)
        self._keepalived = proc
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise GatewayError(
                    f"gateway.ha: keepalived exited ({proc.returncode}):"
                    f" {_tail(self.keepalived_log) or 'no message'}"
                )
            # the VRRP child writes its pid file once its instance runs; the first notify follows
            if paths.vrrp_pid.exists() and paths.state_file.exists():
                log.info("gateway.ha: keepalived up (pid %d), %s", proc.pid, self.role())
                return
            await asyncio.sleep(POLL)
        raise GatewayError(f"gateway.ha: keepalived started no VRRP instance in {START_TIMEOUT:g}s")

    async def reload(self) -> None:
        """Rewrite the configs and have keepalived reread its own (SIGHUP); conntrackd has no
        reload, so it is restarted when its config changed. Raises GatewayError."""
        before = self._conntrackd_text
        await self._write()
        if self._keepalived is not None and self._keepalived.returncode is None:
            self._keepalived.send_signal(signal.SIGHUP)
        if self._conntrackd_text != before:
            await self._end(self._conntrackd, "conntrackd")
            self.paths.conntrackd_lock.unlink(missing_ok=True)
            await self._start_conntrackd()

    def role(self) -> str:
        """ "master", "backup", "fault" or "starting" (no state recorded yet)."""
        try:
            return ha.parse_role(self.paths.state_file.read_text())
        except OSError:
            return "starting"

    @staticmethod
    async def _end(proc: asyncio.subprocess.Process | None, name: str) -> None:
        """SIGTERM our child by PID, wait up to STOP_TIMEOUT, then SIGKILL."""
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("gateway.ha: %s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        """Stop keepalived, then conntrackd; remove the virtual addresses and our files."""
        vrrp_child = self._pid(self.paths.vrrp_pid)
        await self._end(self._keepalived, "keepalived")
        if (
            vrrp_child is not None
            and self._keepalived is not None
            and self._keepalived.returncode == -signal.SIGKILL
        ):
            # killed parents leave their VRRP child holding the addresses; it is ours too
            with contextlib.suppress(ProcessLookupError):
                os.kill(vrrp_child, signal.SIGKILL)
        await self._end(self._conntrackd, "conntrackd")
        self._keepalived = self._conntrackd = None
        for vip, dev in self._placed:
            code, out = await _run("ip", "-o", "-4", "addr", "show", "dev", dev, "to", f"{vip.ip}/32")
            if code == 0 and out.strip():
                await _run("ip", "addr", "del", str(vip), "dev", dev)
        self._remove_files()

    def _remove_files(self) -> None:
        """Our files only (never the whole directory: the caller named it), then the directory
        if that left it empty."""
        paths = [getattr(self.paths, name) for name in self.paths.__slots__ if name != "directory"]
        paths += [self.keepalived_log, self.conntrackd_console]
        for path in paths:
            for leftover in (path, path.with_name(path.name + ".new"), path.with_name(path.name + ".tmp")):
                leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.paths.directory.rmdir()

    @staticmethod
    def _pid(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None
