"""kernel/ha.py: keepalived's and conntrackd's configs and the notify script, as text; and the
parts of kernel/hasupervisor.py that need no namespace (files, leftovers, dead children)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from portfwd.kernel import children, ha, hasupervisor
from portfwd.kernel.hasupervisor import HASupervisor
from portfwd.kernel.nft import GatewayError
from portfwd.specs import GatewayHASpec, GatewaySpec

Iface = ipaddress.IPv4Interface
HA = GatewayHASpec("10.77.0.2", (Iface("203.0.113.1/24"), Iface("192.168.77.1/24")), "sync0")
GATEWAY = GatewaySpec(wan="wan0", lan="lan0", ha=HA)
HOST = ha.HAHost(Iface("10.77.0.1/30"), (Iface("203.0.113.2/24"),), (Iface("192.168.77.2/24"),))
PATHS = ha.HAPaths.under("/tmp/portfwd-ha-test")


def with_ha(**changes: object) -> GatewaySpec:
    return dataclasses.replace(GATEWAY, ha=dataclasses.replace(HA, **changes))  # type: ignore[arg-type]


def test_paths_all_under_one_directory() -> None:
    for name in PATHS.__slots__:
        assert str(getattr(PATHS, name)).startswith("/tmp/portfwd-ha-test")
    with pytest.raises(GatewayError, match="cannot quote"):
        ha.HAPaths.under("/tmp/with space")


def test_keepalived_conf() -> None:
    text = ha.keepalived_conf(GATEWAY, PATHS, HOST)
    for fragment in (
        "vrrp_version 3",
        "state BACKUP\n    nopreempt",
        "interface sync0\n    dont_track_primary",
        "virtual_router_id 51",
        "priority 100",
        "advert_int 1\n",
        "unicast_src_ip 10.77.0.1",
        "unicast_peer {\n        10.77.0.2\n    }",
        "track_interface {\n        wan0\n        lan0\n    }",
        "203.0.113.1/24 dev wan0",
        "192.168.77.1/24 dev lan0",
        'notify "/tmp/portfwd-ha-test/notify.sh"',
        "script_user root",
    ):
        assert fragment in text, fragment


def test_fractional_advert_interval() -> None:
    assert "advert_int 0.25\n" in ha.keepalived_conf(with_ha(advert_interval=0.25), PATHS, HOST)


def test_conntrackd_conf() -> None:
    text = ha.conntrackd_conf(GATEWAY, PATHS, HOST)
    for fragment in (
        "Mode FTFW {",
        "IPv4_address 10.77.0.1\n        IPv4_Destination_Address 10.77.0.2",
        "Port 3780",
        "Interface sync0",
        "Syslog off",
        "LogFile /tmp/portfwd-ha-test/conntrackd.log",
        "LockFile /tmp/portfwd-ha-test/conntrackd.lock",
        "Path /tmp/portfwd-ha-test/conntrackd.ctl",
        "Filter From Userspace",
        "ESTABLISHED CLOSED TIME_WAIT CLOSE_WAIT for TCP",
    ):
        assert fragment in text, fragment
    ignored = [line.split()[1] for line in text.splitlines() if line.strip().startswith("IPv4_address")][1:]
    # the router's own addresses, the virtual ones and loopback: never a forwarded flow
    assert set(ignored) == {
        "127.0.0.1",
        "10.77.0.1",
        "203.0.113.2",
        "192.168.77.2",
        "203.0.113.1",
        "192.168.77.1",
    }
    assert "Multicast" not in text


def test_notify_script_follows_primary_backup() -> None:
    text = ha.notify_script(PATHS, "/usr/sbin/conntrackd")
    master = text.split("MASTER)")[1].split(";;")[0]
    assert [line.split()[1] for line in master.strip().splitlines()] == ["-c", "-f", "-R", "-B"]
    backup = text.split("BACKUP)")[1].split(";;")[0]
    assert [line.split()[1] for line in backup.strip().splitlines()] == ["-t", "-n"]
    assert "-C /tmp/portfwd-ha-test/conntrackd.conf" in text
    assert "flock 9" in text
    assert "mv -f /tmp/portfwd-ha-test/state.tmp /tmp/portfwd-ha-test/state" in text


def test_notify_script_records_the_role(tmp_path: Path) -> None:
    """Run the script itself with a stand-in conntrackd: the state file gets the role."""
    paths = ha.HAPaths.under(tmp_path)
    calls = tmp_path / "calls"
    fake = tmp_path / "fake-conntrackd"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    paths.notify_script.write_text(ha.notify_script(paths, str(fake)))
    paths.notify_script.chmod(0o700)
    for state, role in (("MASTER", "master"), ("FAULT", "fault"), ("BACKUP", "backup")):
        subprocess.run(
            [str(paths.notify_script), "INSTANCE", "portfwd", state, "100"], check=True, timeout=10
        )
        assert ha.parse_role(paths.state_file.read_text()) == role
    commands = [line.split()[-1] for line in calls.read_text().splitlines()]
    assert commands == ["-c", "-f", "-R", "-B", "-t", "-t", "-n"]
    assert ha.parse_role("") == "starting"
    assert ha.parse_role("STOP\n") == "starting"


@pytest.mark.parametrize(
    ("gateway", "host", "message"),
    [
        (with_ha(sync_interface="wan0"), HOST, "sync_interface: wan0 is the WAN"),
        (with_ha(peer="10.77.0.1"), HOST, "peer: 10.77.0.1 is this router's own"),
        (with_ha(peer="10.99.0.2"), HOST, "peer: 10.99.0.2 is not on sync0"),
        (with_ha(advert_interval=0.005), HOST, "out of VRRPv3's range"),
        (with_ha(advert_interval=41.0), HOST, "out of VRRPv3's range"),
        (with_ha(advert_interval=0.125), HOST, "finer than VRRPv3's centiseconds"),
        (
            with_ha(virtual_addresses=(Iface("198.51.100.1/24"),)),
            HOST,
            r"virtual_addresses\[0\]: 198.51.100.1/24 is in neither",
        ),
        (
            with_ha(virtual_addresses=(Iface("203.0.113.2/24"),)),
            HOST,
            "203.0.113.2 is this router's own address",
        ),
        (
            GATEWAY,
            dataclasses.replace(HOST, lan=(Iface("203.0.113.9/24"),)),
            r"virtual_addresses\[0\]: 203.0.113.1/24 is in both",
        ),
    ],
)
def test_bad_combinations(gateway: GatewaySpec, host: ha.HAHost, message: str) -> None:
    with pytest.raises(GatewayError, match=message):
        ha.keepalived_conf(gateway, PATHS, host)
    with pytest.raises(GatewayError, match=message):
        ha.conntrackd_conf(gateway, PATHS, host)


def test_no_ha_section() -> None:
    with pytest.raises(GatewayError, match="not configured"):
        ha.keepalived_conf(dataclasses.replace(GATEWAY, ha=None), PATHS, HOST)


def test_keepalived_accepts_its_config(tmp_path: Path) -> None:
    """keepalived's own --config-test, in a private network namespace that has the links."""
    keepalived, unshare = shutil.which("keepalived"), shutil.which("unshare")
    if keepalived is None or unshare is None:
        pytest.skip("needs keepalived (apt-get install keepalived) and unshare (util-linux)")
    paths = ha.HAPaths.under(tmp_path)
    paths.keepalived_conf.write_text(ha.keepalived_conf(with_ha(advert_interval=0.3), paths, HOST))
    paths.notify_script.write_text(ha.notify_script(paths))
    paths.notify_script.chmod(0o700)
    links = "; ".join(f"ip link add {dev} type veth peer name {dev}p" for dev in ("sync0", "wan0", "lan0"))
    script = f"{links} && {keepalived} --config-test -f {paths.keepalived_conf}"
    # -r: a user namespace too, so this needs no root where unprivileged namespaces are allowed
    done = subprocess.run(
        [unshare, "-rn", "sh", "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0 and "unshare:" in done.stderr:
        pytest.skip(f"cannot create a network namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    # and a broken one is refused, so the check is not a no-op
    paths.keepalived_conf.write_text(
        ha.keepalived_conf(GATEWAY, paths, HOST).replace("nopreempt", "nopreempt_x")
    )
    done = subprocess.run(
        [unshare, "-rn", "sh", "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode != 0, "keepalived --config-test accepted an unknown keyword"


# -- kernel/hasupervisor.py: the parts that need no namespace ----------------------------------


def supervisor(tmp_path: Path, name: str = "ha") -> HASupervisor:
    return HASupervisor(GATEWAY, tmp_path / name)


class RefusingProcess:
    """A child we may no longer signal (portfwd dropped its privileges after starting it)."""

    pid, returncode = 4242, None

    def send_signal(self, sig: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")


async def test_alive_names_the_engine_that_died_and_role_turns_fault(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    sup._prepare_directory()
    sup.paths.state_file.write_text("master\n")
    keepalived = await asyncio.create_subprocess_exec("sleep", "30")
    conntrackd = await asyncio.create_subprocess_exec("sh", "-c", "exit 3")
    sup._keepalived, sup._conntrackd = keepalived, conntrackd
    try:
        await conntrackd.wait()
        assert sup.alive() == f"gateway.ha: conntrackd (pid {conntrackd.pid}) exited with code 3"
        assert sup.role() == "fault"
        keepalived.kill()
        await keepalived.wait()
        assert sup.alive() == f"gateway.ha: keepalived (pid {keepalived.pid}) was killed by SIGKILL"
        sup.conntrackd_console.write_text("starting\nERROR: no sync link\n")
        sup._keepalived = None
        assert sup.alive() == (
            f"gateway.ha: conntrackd (pid {conntrackd.pid}) exited with code 3: ERROR: no sync link"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            keepalived.kill()
        await keepalived.wait()
    sup._keepalived = sup._conntrackd = None
    assert sup.alive() is None
    assert sup.role() == "master"


async def test_alive_while_both_run(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    procs = [await asyncio.create_subprocess_exec("sleep", "30") for _ in range(2)]
    sup._keepalived, sup._conntrackd = procs
    try:
        assert sup.alive() is None
        assert sup.role() == "starting"
    finally:
        for proc in procs:
            proc.kill()
            await proc.wait()


def test_children_die_with_portfwd(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG through setpriv (`_spawn`): SIGKILL the Python process that started a
    child; the child gets SIGTERM."""
    script = f"""
import time, uvloop
from portfwd.kernel.hasupervisor import HASupervisor
from tests.unit.test_ha import GATEWAY
async def main():
    sup = HASupervisor(GATEWAY, {str(tmp_path / "ha")!r})
    sup._prepare_directory()
    proc = await sup._spawn(["sleep", "60"], sup.keepalived_log)
    print(proc.pid, flush=True)
    time.sleep(60)
uvloop.run(main())  # portfwd's loop
"""
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        pidfd = os.pidfd_open(child)
    finally:
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()
    try:
        # a pidfd turns readable when its process ends
        assert select.select([pidfd], [], [], 10)[0], "the child outlived the process that started it"
    finally:
        os.close(pidfd)


def fake_conntrackd(tmp_path: Path, conf: Path) -> list[str]:
    """argv for a process whose cmdline is `.../conntrackd -C conf`: sh (-C is its noclobber
    option) runs `conf` as a script that says it runs, then waits on a pipe nobody writes."""
    conf.parent.mkdir(mode=0o700, exist_ok=True)
    conf.write_text("echo ready\nread line\n")
    argv0 = str(tmp_path / "bin" / "conntrackd")
    # execv sets argv[0] as given (asyncio on uvloop does not honour executable=)
    return [sys.executable, "-c", "import os, sys; os.execv('/bin/sh', sys.argv[1:])", argv0, "-C", str(conf)]


async def test_start_stops_only_its_own_leftovers(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    sup._prepare_directory()
    stranger = await asyncio.create_subprocess_exec("sleep", "30")
    pipe = asyncio.subprocess.PIPE
    argv = fake_conntrackd(tmp_path, tmp_path / "other" / "conntrackd.conf")
    elsewhere = await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe)
    argv = fake_conntrackd(tmp_path, sup.paths.conntrackd_conf)
    leftover = await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe)
    for proc in (elsewhere, leftover):  # exec'd: the cmdline is the fake conntrackd's
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"ready\n"
    try:
        for pid in (stranger.pid, elsewhere.pid, 999_999_999, leftover.pid):
            sup.paths.conntrackd_pid.write_text(f"{pid}\n")
            await sup._take_over()
            assert not sup.paths.conntrackd_pid.exists()
        assert await asyncio.wait_for(leftover.wait(), 5) == -signal.SIGTERM
        assert stranger.returncode is None, "signalled a process that is not conntrackd"
        assert elsewhere.returncode is None, "signalled the conntrackd of another directory"
    finally:
        for proc in (stranger, elsewhere, leftover):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_a_second_supervisor_leaves_a_running_one_alone(tmp_path: Path) -> None:
    first, second = supervisor(tmp_path), supervisor(tmp_path)
    first._prepare_directory()
    first._take_lock()
    first.paths.conntrackd_pid.write_text("1\n")
    with pytest.raises(GatewayError, match=r"ha is in use by another running portfwd; stop it first"):
        await second.start()
    assert await second.stop() == []
    assert first.paths.conntrackd_pid.exists(), "the failed start removed the running one's files"
    assert await first.stop() == []
    assert not first.paths.directory.exists()


def test_directory_is_created_private(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "run/gateway-ha")
    old = os.umask(0o377)
    try:
        sup._prepare_directory()
    finally:
        os.umask(old)
    info = os.lstat(sup.paths.directory)
    assert stat.S_ISDIR(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o700


def test_unsafe_directories_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(GatewayError, match=r"link is a symbolic link; remove it"):
        supervisor(tmp_path, "link")._prepare_directory()
    (tmp_path / "file").write_text("")
    with pytest.raises(GatewayError, match=r"file is not a directory; remove it"):
        supervisor(tmp_path, "file")._prepare_directory()
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o755)
    with pytest.raises(GatewayError, match=r"open is open to others \(mode 755\); chmod 700 .*open$"):
        supervisor(tmp_path, "open")._prepare_directory()
    with pytest.raises(GatewayError, match=r"gateway.ha: cannot create .*/file: File exists$"):
        supervisor(tmp_path, "file/ha")._prepare_directory()
    if os.geteuid() == 0:
        (tmp_path / "theirs").mkdir(mode=0o700)
        os.chown(tmp_path / "theirs", 65534, 65534)
        with pytest.raises(GatewayError, match=r"theirs belongs to uid 65534, not to this portfwd"):
            supervisor(tmp_path, "theirs")._prepare_directory()


def test_staged_files_do_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    sup._prepare_directory()
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (sup.paths.directory / "keepalived.conf.new").symlink_to(victim)
    old = os.umask(0o777)
    try:
        sup._replace(sup.paths.keepalived_conf, "global_defs {}\n", 0o600)
    finally:
        os.umask(old)
    assert victim.read_text() == "untouched\n"
    info = os.lstat(sup.paths.keepalived_conf)
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert sup.paths.keepalived_conf.read_text() == "global_defs {}\n"


async def test_os_errors_become_one_line_gateway_errors(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    sup._prepare_directory()
    (sup.paths.directory / "keepalived.log").symlink_to(tmp_path / "victim")
    with pytest.raises(GatewayError, match=r"^gateway.ha: cannot open .*/keepalived.log: .*symbolic links"):
        await sup._spawn(["sleep", "1"], sup.keepalived_log)
    with pytest.raises(
        GatewayError, match=r"^gateway.ha: cannot start /nonexistent/keepalived: No such file"
    ):
        await sup._spawn(["/nonexistent/keepalived"], sup.conntrackd_console)
    sup.paths.directory.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes anyway
            with pytest.raises(GatewayError, match=r"^gateway.ha: cannot write .*: Permission denied$"):
                sup._replace(sup.paths.conntrackd_conf, "x", 0o600)
    finally:
        sup.paths.directory.chmod(0o700)


async def test_stop_never_raises_and_says_what_it_could_not_do(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    sup._prepare_directory()
    sup._take_lock()
    sup._keepalived = RefusingProcess()  # type: ignore[assignment]
    problems = await sup.stop()
    assert problems == ["gateway.ha: cannot stop keepalived (pid 4242): Operation not permitted"]
    assert not sup.paths.directory.exists()
    assert await sup.stop() == []


async def test_ip_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing_ip(*argv: str) -> tuple[int, str]:
        return 1, "Error: first problem.\nError: second problem.\n"

    monkeypatch.setattr(children, "run_short", failing_ip)
    with pytest.raises(GatewayError) as caught:
        await hasupervisor.host_addresses(GATEWAY)
    assert str(caught.value) == "gateway.ha: ip addr failed: Error: first problem. / Error: second problem."
