"""miniupnpd on the lab's gw, as TESTBED §3 proved it: UPnP IGD, NAT-PMP and PCP, nftables build.

The fixture creates miniupnpd's own nft table (Debian's helper scripts are broken), runs a STUN
responder on wan so miniupnpd accepts the reserved test WAN address, starts the daemon with a
temp config and lease file, waits for its ports, and at the end stops it by PID and deletes
its table (miniupnpd leaves its rules behind on purpose).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import need_binary
from tests.integration.processes import Proc
from tests.integration.topology import GW_LAN, GW_WAN, WAN_HOST, Lab

WAN_ALT = "203.0.113.21"
TABLE = "portfwd_upnp"
URL = f"http://{GW_LAN}:5000/rootDesc.xml"

BASE_TABLE = f"""
table inet {TABLE} {{
    chain miniupnpd {{ }}
    chain prerouting_miniupnpd {{ }}
    chain postrouting_miniupnpd {{ }}
    chain forward {{ type filter hook forward priority 0; policy accept; jump miniupnpd; }}
    chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }}
    chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; }}
}}
"""


@dataclass
class Router:
    lab: Lab
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    conf: Path | None = None
    logfile: Path | None = None

    def start(self, *, natpmp: bool = True, upnp: bool = True, extra: str = "") -> None:
        """(Re)start miniupnpd with a fresh lease file, like a router that rebooted."""
        self.stop()
        leases = self.workdir / "upnp.leases"
        leases.unlink(missing_ok=True)
        self.lab.run(self.lab.gw, "nft", "delete", "table", "inet", TABLE)
        result = self.lab.run(self.lab.gw, "nft", "-f", "-", data=BASE_TABLE.encode())
        assert result.returncode == 0, result.stderr.decode()
        self.conf = self.workdir / "miniupnpd.conf"
        self.conf.write_text(
            "\n".join(
                [
                    "ext_ifname=gwwan0",
                    "listening_ip=gwlan0",
                    "http_port=5000",
                    f"enable_natpmp={'yes' if natpmp else 'no'}",
                    f"enable_upnp={'yes' if upnp else 'no'}",
                    "ipv6_disable=yes",
                    "secure_mode=yes",
                    "system_uptime=no",
                    f"upnp_table_name={TABLE}",
                    f"upnp_nat_table_name={TABLE}",
                    f"lease_file={leases}",
                    f"uuid={uuid.uuid4()}",
                    "ext_perform_stun=yes",
                    f"ext_stun_host={WAN_HOST}",
                    "ext_stun_port=3478",
                    "min_lifetime=2",
                    extra,
                    "allow 1024-65535 192.168.77.0/24 1024-65535",
                    "deny 0-65535 0.0.0.0/0 0-65535",
                    "",
                ]
            )
        )
        # Its log goes to a file, not a pipe: miniupnpd logs one line per port it tries for a
        # denied NAT-PMP request (65,535 of them), and a pipe nobody drains would block it.
        self.logfile = self.workdir / f"miniupnpd-{uuid.uuid4().hex[:6]}.log"
        with self.logfile.open("wb") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.gw, "/usr/sbin/miniupnpd", "-d", "-f", str(self.conf),
                 "-P", str(self.workdir / "miniupnpd.pid")],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.wait_log("Port forwarding is now enabled", timeout=20)
        if upnp:
            from tests.integration.netns import wait_listening_in

            wait_listening_in(self.lab.gw, 5000)

    def wait_log(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            assert self.proc is not None
            assert self.proc.poll() is None, f"miniupnpd exited: {self.log()[-2000:]}"
            assert time.monotonic() < deadline, f"miniupnpd never logged {needle!r}: {self.log()[-2000:]}"
            time.sleep(0.05)

    def stop(self) -> None:
        """TERM by PID, KILL after 5 s, reap."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.proc = None

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile else ""

    def ruleset(self) -> str:
        return self.lab.run(self.lab.gw, "nft", "list", "table", "inet", TABLE).stdout.decode()


@contextlib.contextmanager
def router(lab: Lab, workdir: Path, **options: bool) -> Iterator[Router]:
    need_binary("miniupnpd", "miniupnpd miniupnpd-nftables")
    lab.run(lab.wan, "ip", "addr", "add", f"{WAN_ALT}/24", "dev", "wan0")
    stun = Proc(
        ["ip", "netns", "exec", lab.wan, sys.executable, str(Path(__file__).with_name("stun.py")),
         WAN_HOST, WAN_ALT, "3478", "3479"]
    )  # fmt: skip
    lab.procs.append(stun)
    stun.wait_for("stun ready", timeout=10)
    box = Router(lab, workdir)
    try:
        box.start(**options)
        yield box
    finally:
        box.stop()
        lab.run(lab.gw, "nft", "delete", "table", "inet", TABLE)


__all__ = ["GW_LAN", "GW_WAN", "URL", "Router", "router"]
