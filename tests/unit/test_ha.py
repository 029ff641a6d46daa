"""kernel/ha.py: keepalived's and conntrackd's configs and the notify script, as text."""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

from portfwd.kernel import ha
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
