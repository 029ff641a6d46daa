"""The lan / gw / wan lab of TESTBED §1, built per test in throwaway namespaces and always deleted.

lan 192.168.77.10/24 (lan0) -- gwlan0 192.168.77.1/24 [gw, ip_forward=1] gwwan0 203.0.113.1/24 -- wan0 203.0.113.20/24 wan

wan has no route back to the LAN, as with a real ISP: wan reaches lan only through DNAT, lan
reaches wan only through masquerade. With `lab(ipv6=True)` every link also has IPv6 (LAN
2001:db8:77::/64, WAN 2001:db8:113::/64) and, as with a real IPv6 ISP, the WAN host does have a
route to the LAN prefix: only the gateway's firewall stands between them. Peers are socat processes started in a namespace and
stopped by PID.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.conftest import need, need_root
from tests.integration.netns import wait_listening_in
from tests.integration.processes import Proc

LAN_HOST, GW_LAN, GW_WAN, WAN_HOST = "192.168.77.10", "192.168.77.1", "203.0.113.1", "203.0.113.20"
LAN_HOST6, GW_LAN6, GW_WAN6, WAN_HOST6 = (
    "2001:db8:77::10",
    "2001:db8:77::1",
    "2001:db8:113::1",
    "2001:db8:113::20",
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Lab:
    lan: str
    gw: str
    wan: str
    procs: list[Proc] = field(default_factory=list)

    def run(
        self, ns: str, *argv: str, data: bytes = b"", timeout: float = 20
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], input=data, capture_output=True, timeout=timeout
        )

    def serve(self, ns: str, port: int, command: str, udp: bool = False) -> None:
        """A socat peer in `ns` on `port`; for each client it runs `command` (SOCAT_PEERADDR is set)."""
        listen = f"UDP4-RECVFROM:{port},fork" if udp else f"TCP4-LISTEN:{port},fork,reuseaddr"
        proc = Proc(["ip", "netns", "exec", ns, "socat", listen, f"SYSTEM:{command}"])
        self.procs.append(proc)
        if not udp:
            wait_listening_in(ns, port)
        else:
            import time

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                out = self.run(ns, "ss", "-Hlun", f"sport = :{port}").stdout
                if out.strip():
                    return
                time.sleep(0.05)
            raise AssertionError(f"no UDP listener on {port} in {ns}")


@contextlib.contextmanager
def lab(ipv6: bool = False) -> Iterator[Lab]:
    need_root()
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("socat", "socat")):
        need(shutil.which(tool) is not None, f"needs {tool} (apt-get install {package})")
    prefix = f"pft-{uuid.uuid4().hex[:8]}"
    names = Lab(f"{prefix}-lan", f"{prefix}-gw", f"{prefix}-wan")
    created: list[str] = []
    try:
        for ns in (names.lan, names.gw, names.wan):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    f"net.ipv6.conf.all.disable_ipv6={int(not ipv6)}",
                ],
                capture_output=True,
                timeout=10,
            )
        _ip(
            "link",
            "add",
            "lan0",
            "netns",
            names.lan,
            "type",
            "veth",
            "peer",
            "name",
            "gwlan0",
            "netns",
            names.gw,
        )
        _ip(
            "link",
            "add",
            "wan0",
            "netns",
            names.wan,
            "type",
            "veth",
            "peer",
            "name",
            "gwwan0",
            "netns",
            names.gw,
        )
        for ns, dev, address in (
            (names.lan, "lan0", f"{LAN_HOST}/24"),
            (names.gw, "gwlan0", f"{GW_LAN}/24"),
            (names.gw, "gwwan0", f"{GW_WAN}/24"),
            (names.wan, "wan0", f"{WAN_HOST}/24"),
        ):
            _ip("-n", ns, "addr", "add", address, "dev", dev)
            if ipv6:  # no duplicate address detection: link-local addresses usable at once
                subprocess.run(
                    ["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0"],
                    check=True,
                    timeout=10,
                )
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", names.lan, "route", "add", "default", "via", GW_LAN)
        if ipv6:
            for ns, dev, address in (
                (names.lan, "lan0", f"{LAN_HOST6}/64"),
                (names.gw, "gwlan0", f"{GW_LAN6}/64"),
                (names.gw, "gwwan0", f"{GW_WAN6}/64"),
                (names.wan, "wan0", f"{WAN_HOST6}/64"),
            ):
                _ip("-n", ns, "-6", "addr", "add", address, "dev", dev, "nodad")
            _ip("-n", names.lan, "-6", "route", "add", "default", "via", GW_LAN6)
            _ip("-n", names.wan, "-6", "route", "add", "2001:db8:77::/64", "via", GW_WAN6)
        subprocess.run(
            ["ip", "netns", "exec", names.gw, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            check=True,
            timeout=10,
        )
        yield names
    finally:
        for proc in names.procs:
            proc.stop()
            proc.close()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
