"""Runs keepalived and conntrackd for `[gateway.ha]` as portfwd's own children, in the foreground.

They are the routers' own engines for VRRP and for NAT state sync; portfwd writes their
configuration (kernel/ha.py), starts them, tells keepalived to reload, reads the role the notify
script records, notices when one dies and stops them by PID. Everything they write lives in one
directory of ours, which must be private (0700, ours, not a symlink).

The children die with portfwd (PR_SET_PDEATHSIG). Should some outlive it anyway (an older
portfwd, a SIGKILL between fork and prctl), the next start finds them through the pid files
left in the directory, checks /proc/PID/cmdline is that engine with that config, stops them and
removes the virtual addresses they held, before it starts its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import itertools
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from portfwd.kernel import children, ha
from portfwd.kernel.nft import GatewayError
from portfwd.specs import GatewaySpec

log = logging.getLogger(__name__)

#: How long each engine gets to come up, and to go after SIGTERM (then after SIGKILL).
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
POLL = 0.05

Match = Callable[[list[str]], bool]


async def host_addresses(gateway: GatewaySpec) -> ha.HAHost:
    """This router's addresses on the sync, WAN and LAN links (not the virtual ones), from
    `ip -j -4 addr`. Raises GatewayError when ip fails or the sync link has none."""
    assert gateway.ha is not None
    code, out = await children.run_short("ip", "-j", "-4", "addr", "show")
    if code != 0:
        raise GatewayError(f"gateway.ha: ip addr failed: {children.one_line(out, 3) or f'exit code {code}'}")
    virtual = {vip.ip for vip in gateway.ha.virtual_addresses}
    found: dict[str, list[ipaddress.IPv4Interface]] = {}
    try:
        for link in json.loads(out or "[]"):
            for info in link.get("addr_info", []):
                addr = ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
                if addr.ip not in virtual:
                    found.setdefault(link["ifname"], []).append(addr)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GatewayError(f"gateway.ha: cannot read the output of ip -j addr: {exc}") from exc
    sync = found.get(gateway.ha.sync_interface, [])
    if not sync:
        raise GatewayError(
            f"gateway.ha.sync_interface: {gateway.ha.sync_interface} has no IPv4 address"
            " (or does not exist); VRRP and conntrackd speak from it"
        )
    return ha.HAHost(sync[0], tuple(found.get(gateway.wan, ())), tuple(found.get(gateway.lan, ())))


class HASupervisor:
    """keepalived and conntrackd for one gateway, with their files under `directory`.

    `start()` checks the directory, stops what a killed portfwd left there, writes the configs,
    has keepalived check its own, starts conntrackd, then keepalived, and returns when both are
    up. `alive()` says when one has died; `role()` is what the notify script last recorded
    ("fault" once an engine died). `stop()` ends both by PID and removes what they leave
    (virtual addresses, files); it never raises, and returns the problems it met.

    `die_with_parent=False` only serves tests that need engines outliving their portfwd.
    """

    def __init__(self, gateway: GatewaySpec, directory: str | Path, *, die_with_parent: bool = True) -> None:
        if gateway.ha is None:
            raise GatewayError("gateway.ha: not configured")
        self.gateway = gateway
        self.paths = ha.HAPaths.under(directory)
        self.keepalived_log = self.paths.directory / "keepalived.log"
        # conntrackd in the foreground also prints its log lines: keep them apart from LogFile
        self.conntrackd_console = self.paths.directory / "conntrackd.console"
        #: What stop() (and a take-over at start) could not do, one line each; also logged.
        self.problems: list[str] = []
        self._die_with_parent = die_with_parent
        self._keepalived: asyncio.subprocess.Process | None = None
        self._conntrackd: asyncio.subprocess.Process | None = None
        self._placed: tuple[tuple[ipaddress.IPv4Interface, str], ...] = ()
        self._conntrackd_text = ""
        self._lock: int | None = None

    @staticmethod
    def _binary(name: str) -> str:
        for path in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}"):
            if path and os.access(path, os.X_OK):
                return path
        raise GatewayError(f"gateway.ha: {name} is not installed (apt-get install {name})")

    def _problem(self, line: str) -> None:
        self.problems.append(line)
        log.warning("%s", line)

    # -- the directory and its files -------------------------------------------------------

    def _prepare_directory(self) -> None:
        """Create the directory 0700, or accept an existing one only if it is a directory (not a
        symlink) of this user's that nobody else can enter. Raises GatewayError."""
        directory = self.paths.directory
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            try:
                directory.mkdir(mode=0o700)
                created = True
            except FileExistsError:
                created = False
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and directory.parent.is_dir():
                what = "a symbolic link" if directory.is_symlink() else "not a directory"
                raise GatewayError(
                    f"gateway.ha: {directory} is {what}; remove it (portfwd creates the directory)"
                ) from exc
            raise GatewayError(
                f"gateway.ha: cannot create {exc.filename or directory}: {children.reason(exc)}"
            ) from exc
        try:
            if created:
                os.fchmod(fd, 0o700)  # mkdir's mode went through the umask
            info = os.fstat(fd)
        except OSError as exc:
            raise GatewayError(f"gateway.ha: cannot set up {directory}: {children.reason(exc)}") from exc
        finally:
            os.close(fd)
        if info.st_uid != os.geteuid():
            raise GatewayError(
                f"gateway.ha: {directory} belongs to uid {info.st_uid}, not to this portfwd"
                f" (uid {os.geteuid()}); remove it (portfwd creates the directory)"
            )
        if info.st_mode & 0o077:
            raise GatewayError(
                f"gateway.ha: {directory} is open to others (mode {stat.S_IMODE(info.st_mode):o});"
                f" chmod 700 {directory}"
            )

    def _take_lock(self) -> None:
        """Hold the directory's lock for as long as we use it. Raises GatewayError when another
        running supervisor holds it (its engines are not orphans: leave them be)."""
        path = self.paths.supervisor_lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise GatewayError(f"gateway.ha: cannot open {path}: {children.reason(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise GatewayError(
                    f"gateway.ha: {self.paths.directory} is in use by another running portfwd;"
                    " stop it first, or give this one its own runtime directory"
                ) from exc
            raise GatewayError(f"gateway.ha: cannot lock {path}: {children.reason(exc)}") from exc
        try:  # the file we locked may have been unlinked by a supervisor stopping meanwhile
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except OSError:
            same = False
        if not same:
            os.close(fd)
            raise GatewayError(
                f"gateway.ha: {self.paths.directory} changed hands while this portfwd started; start it again"
            )
        self._lock = fd

    @staticmethod
    def _stage(path: Path, text: str, mode: int) -> Path:
        """Write `path`.new afresh with `mode` (never through a symlink planted there)."""
        staged = path.with_name(path.name + ".new")
        try:
            staged.unlink(missing_ok=True)
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            with open(fd, "w", encoding="utf-8") as out:
                os.fchmod(fd, mode)  # the umask may have taken bits from `mode`
                out.write(text)
        except OSError as exc:
            raise GatewayError(f"gateway.ha: cannot write {staged}: {children.reason(exc)}") from exc
        return staged

    def _replace(self, path: Path, text: str, mode: int) -> None:
        staged = self._stage(path, text, mode)
        try:
            staged.replace(path)
        except OSError as exc:
            raise GatewayError(f"gateway.ha: cannot write {path}: {children.reason(exc)}") from exc

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise GatewayError(f"gateway.ha: cannot remove {path}: {children.reason(exc)}") from exc

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
        code, out = await children.run_short(
            self._binary("keepalived"), "--config-test", "-f", str(candidate)
        )
        if code != 0:
            with contextlib.suppress(OSError):
                candidate.unlink(missing_ok=True)
            raise GatewayError(f"gateway.ha: keepalived refused its config: {children.one_line(out)}")
        try:
            candidate.replace(paths.keepalived_conf)
        except OSError as exc:
            raise GatewayError(
                f"gateway.ha: cannot write {paths.keepalived_conf}: {children.reason(exc)}"
            ) from exc
        self._replace(paths.conntrackd_conf, conntrackd_text, 0o600)
        self._placed, self._conntrackd_text = placed, conntrackd_text

    # -- leftovers of a portfwd that did not stop ------------------------------------------

    def _is_keepalived(self, argv: list[str]) -> bool:
        conf = str(self.paths.keepalived_conf)
        return (
            bool(argv)
            and os.path.basename(argv[0]) == "keepalived"
            and any(
                flag in ("--use-file", "-f") and value == conf for flag, value in itertools.pairwise(argv)
            )
        )

    def _is_conntrackd(self, argv: list[str]) -> bool:
        # the daemon exactly as _start_conntrackd runs it, not a client command (-s, -c...)
        return (
            bool(argv)
            and os.path.basename(argv[0]) == "conntrackd"
            and argv[1:] == ["-C", str(self.paths.conntrackd_conf)]
        )

    async def _stop_leftover(self, pid: int, name: str, ours: Match) -> bool:
        """Stop `pid` if it still runs and its cmdline is our `name` (`ours`); True if it was.
        Anything else is left alone. Raises GatewayError when it cannot be stopped."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError as exc:
            raise GatewayError(
                f"gateway.ha: cannot look at pid {pid} ({name}) left in {self.paths.directory}:"
                f" {children.reason(exc)}; stop it yourself and remove its pid file"
            ) from exc
        try:
            # opened first: the pidfd names this process even if the pid is reused meanwhile
            argv = children.cmdline(pid)
            if children.exited(pidfd):
                return False
            if argv is None or not ours(argv):
                log.info("gateway.ha: pid %d (from a %s pid file) is not ours; left alone", pid, name)
                return False
            log.warning(
                "gateway.ha: %s (pid %d) was left running by a portfwd that did not stop; stopping it",
                name,
                pid,
            )
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    signal.pidfd_send_signal(pidfd, sig)
                except ProcessLookupError:
                    return True
                except OSError as exc:
                    raise GatewayError(
                        f"gateway.ha: cannot stop the {name} (pid {pid}) a previous portfwd left"
                        f" running: {children.reason(exc)}; stop it yourself"
                    ) from exc
                deadline = time.monotonic() + STOP_TIMEOUT
                while time.monotonic() < deadline:
                    if children.exited(pidfd):
                        return True
                    await asyncio.sleep(POLL)
            raise GatewayError(
                f"gateway.ha: the {name} (pid {pid}) a previous portfwd left running did not exit"
                " after SIGKILL"
            )
        finally:
            os.close(pidfd)

    async def _take_over(self) -> None:
        """Stop the engines a killed portfwd left running here, and the virtual addresses a
        killed keepalived left on the links. Raises GatewayError."""
        paths = self.paths
        leftovers = (
            (paths.keepalived_pid, "keepalived", self._is_keepalived),
            (paths.vrrp_pid, "keepalived", self._is_keepalived),  # its VRRP child holds the addresses
            (paths.checkers_pid, "keepalived", self._is_keepalived),
            (paths.conntrackd_pid, "conntrackd", self._is_conntrackd),
        )
        unclean = False
        for pid_file, name, ours in leftovers:
            pid = self._pid(pid_file)
            if pid is None:
                continue
            unclean |= name == "keepalived"
            await self._stop_leftover(pid, name, ours)
            self._unlink(pid_file)
        if unclean:
            ha_spec = self.gateway.ha
            assert ha_spec is not None
            links = (self.gateway.wan, self.gateway.lan)
            await self._remove_addresses((vip, dev) for vip in ha_spec.virtual_addresses for dev in links)
        for stale in (paths.state_file, paths.conntrackd_lock, paths.conntrackd_socket):
            self._unlink(stale)  # ours, from a run that did not stop cleanly

    async def _remove_addresses(self, placed: Iterable[tuple[ipaddress.IPv4Interface, str]]) -> None:
        """Delete the virtual addresses still on their links; failures become problems."""
        for vip, dev in placed:
            try:
                code, out = await children.run_short(
                    "ip", "-o", "-4", "addr", "show", "dev", dev, "to", f"{vip.ip}/32"
                )
                if code != 0 or not out.strip():
                    continue
                code, out = await children.run_short("ip", "addr", "del", str(vip), "dev", dev)
                if code != 0:
                    self._problem(f"gateway.ha: cannot remove {vip} from {dev}: {children.one_line(out)}")
                else:
                    log.info("gateway.ha: removed virtual address %s from %s", vip, dev)
            except GatewayError as exc:
                self._problem(exc.line())

    # -- running ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start conntrackd, then keepalived, and wait until both are up. Raises GatewayError."""
        self._prepare_directory()
        self._take_lock()
        try:
            await self._take_over()
            await self._write()
            await self._start_conntrackd()
            await self._start_keepalived()
        except BaseException:
            await self.stop()
            raise

    async def _spawn(self, argv: list[str], logfile: Path) -> asyncio.subprocess.Process:
        if shutil.which(argv[0]) is None:  # said here: behind setpriv it would be its exit code
            missing = errno.EACCES if os.access(argv[0], os.F_OK) else errno.ENOENT
            raise GatewayError(f"gateway.ha: cannot start {argv[0]}: {os.strerror(missing)}")
        try:
            out = os.open(
                logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise GatewayError(f"gateway.ha: cannot open {logfile}: {children.reason(exc)}") from exc
        try:
            return await asyncio.create_subprocess_exec(
                *(children.die_with_parent(argv) if self._die_with_parent else argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            reason = children.reason(exc) if isinstance(exc, OSError) else str(exc)
            raise GatewayError(f"gateway.ha: cannot start {argv[0]}: {reason}") from exc
        finally:
            os.close(out)

    async def _start_conntrackd(self) -> None:
        paths = self.paths
        conntrackd = self._binary("conntrackd")
        # no -d: it stays in the foreground, our child
        proc = await self._spawn([conntrackd, "-C", str(paths.conntrackd_conf)], self.conntrackd_console)
        self._conntrackd = proc
        self._replace(paths.conntrackd_pid, f"{proc.pid}\n", 0o600)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                said = children.tail(self.conntrackd_console) or children.tail(paths.conntrackd_log)
                raise GatewayError(
                    f"gateway.ha: conntrackd {children.exit_text(proc.returncode)}: {said or 'no message'}"
                )
            if paths.conntrackd_socket.exists():
                code, _ = await children.run_short(
                    conntrackd, "-C", str(paths.conntrackd_conf), "-s", "runtime"
                )
                if code == 0:
                    log.info("gateway.ha: conntrackd up (pid %d)", proc.pid)
                    return
            await asyncio.sleep(POLL)
        raise GatewayError(
            f"gateway.ha: conntrackd did not answer on {paths.conntrackd_socket} in {START_TIMEOUT:g}s"
        )

    def _keepalived_argv(self) -> list[str]:
        paths = self.paths
        return [
            self._binary("keepalived"), "--dont-fork", "--log-console", "--log-detail", "--no-syslog",
            "--vrrp", "--use-file", str(paths.keepalived_conf), "--pid", str(paths.keepalived_pid),
            "--vrrp_pid", str(paths.vrrp_pid), "--checkers_pid", str(paths.checkers_pid),
        ]  # fmt: skip

    async def _start_keepalived(self) -> None:
        paths = self.paths
        proc = await self._spawn(self._keepalived_argv(), self.keepalived_log)
        self._keepalived = proc
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise GatewayError(
                    f"gateway.ha: keepalived {children.exit_text(proc.returncode)}:"
                    f" {children.tail(self.keepalived_log) or 'no message'}"
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
        keepalived = self._keepalived
        if keepalived is not None and keepalived.returncode is None:
            try:
                keepalived.send_signal(signal.SIGHUP)
            except ProcessLookupError:
                pass  # it just died: alive() says so
            except OSError as exc:
                why = children.reason(exc)
                raise GatewayError(
                    f"gateway.ha: cannot tell keepalived (pid {keepalived.pid}) to reload: {why}"
                ) from exc
        if self._conntrackd_text != before:
            conntrackd, self._conntrackd = self._conntrackd, None  # a restart, not a death
            known = len(self.problems)
            await self._end(conntrackd, "conntrackd")
            if len(self.problems) > known:
                self._conntrackd = conntrackd
                raise GatewayError(self.problems[-1])
            self._unlink(self.paths.conntrackd_lock)
            await self._start_conntrackd()

    def alive(self) -> str | None:
        """None while keepalived and conntrackd both run (and before start or after stop);
        else one line naming the one that died, how, and its last log line."""
        for proc, name, logfile in (
            (self._keepalived, "keepalived", self.keepalived_log),
            (self._conntrackd, "conntrackd", self.conntrackd_console),
        ):
            if proc is not None and proc.returncode is not None:
                last = children.tail(logfile) or (
                    children.tail(self.paths.conntrackd_log) if name == "conntrackd" else ""
                )
                line = f"gateway.ha: {name} (pid {proc.pid}) {children.exit_text(proc.returncode)}"
                return f"{line}: {last}" if last else line
        return None

    def role(self) -> str:
        """ "master", "backup", "fault" (also once keepalived or conntrackd has died: see
        alive()) or "starting" (no state recorded yet)."""
        if self.alive() is not None:
            return "fault"
        try:
            return ha.parse_role(self.paths.state_file.read_text())
        except OSError:
            return "starting"

    async def _end(self, proc: asyncio.subprocess.Process | None, name: str) -> None:
        """SIGTERM our child by PID, wait up to STOP_TIMEOUT, then SIGKILL. Never raises: what
        it cannot do (a signal refused after a privilege drop) becomes a problem."""
        if proc is None or proc.returncode is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if sig == signal.SIGKILL:
                log.warning("gateway.ha: %s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass  # exiting already: wait for it below
            except OSError as exc:
                self._problem(f"gateway.ha: cannot stop {name} (pid {proc.pid}): {children.reason(exc)}")
                return
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
                return
            except TimeoutError:
                continue
        self._problem(f"gateway.ha: {name} (pid {proc.pid}) did not exit after SIGKILL")

    async def stop(self) -> list[str]:
        """Stop keepalived, then conntrackd; remove the virtual addresses and our files.

        Never raises: returns (and logs) what it could not do, one line each. Does nothing if
        start() did not get the directory (another portfwd's, or never started)."""
        self.problems = []
        if self._lock is None:
            return []
        vrrp_child = self._pid(self.paths.vrrp_pid)
        await self._end(self._keepalived, "keepalived")
        if vrrp_child is not None and (self._keepalived is None or self._keepalived.returncode is not None):
            # a killed keepalived leaves its VRRP child holding the addresses; it is ours too
            try:
                await self._stop_leftover(vrrp_child, "keepalived", self._is_keepalived)
            except GatewayError as exc:
                self._problem(exc.line())
        await self._end(self._conntrackd, "conntrackd")
        self._keepalived = self._conntrackd = None
        await self._remove_addresses(self._placed)
        self._placed = ()
        self._remove_files()
        os.close(self._lock)
        self._lock = None
        return list(self.problems)

    def _remove_files(self) -> None:
        """Our files only (never the whole directory: the caller named it), then the directory
        if that left it empty."""
        paths = [getattr(self.paths, name) for name in self.paths.__slots__ if name != "directory"]
        paths += [self.keepalived_log, self.conntrackd_console]
        for path in paths:
            for leftover in (path, path.with_name(path.name + ".new"), path.with_name(path.name + ".tmp")):
                try:
                    leftover.unlink(missing_ok=True)
                except OSError as exc:
                    self._problem(f"gateway.ha: cannot remove {leftover}: {children.reason(exc)}")
        with contextlib.suppress(OSError):
            self.paths.directory.rmdir()

    @staticmethod
    def _pid(path: Path) -> int | None:
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid > 0 else None
