"""`transparent = true` in a client / router / backend lab: the backend sees the client's address.

client 198.51.100.2/24 2001:db8:1::2/64 (c0) -- rc0 .1 [router: portfwd] rb0 .1 -- (b0) 192.0.2.2/24 2001:db8:2::2/64 backend

The client and the backend route everything via the router, which does not forward (ip_forward
is off): a backend's answer to the client's address reaches portfwd only through the README's
routing (an nft mark on packets of transparent sockets, an ip rule, a local table). Namespaces
are unique per test and always deleted; peers are stopped by PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from portfwd.relay import transparent
from tests.conftest import need, need_binary, need_root
from tests.integration.netns import wait_listening_in
from tests.integration.processes import READY, REPO, Proc, portfwd_argv

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.netns]

CLIENT4, ROUTER_C4, ROUTER_B4, BACKEND4 = "198.51.100.2", "198.51.100.1", "192.0.2.1", "192.0.2.2"
CLIENT6, ROUTER_C6, ROUTER_B6, BACKEND6 = "2001:db8:1::2", "2001:db8:1::1", "2001:db8:2::1", "2001:db8:2::2"

#: The routing commands of the README's "Transparent mode" section, verbatim.
README_ROUTING = """\
nft 'add table inet portfwd_transparent; add chain inet portfwd_transparent prerouting { type filter hook prerouting priority mangle; policy accept; }; add rule inet portfwd_transparent prerouting meta l4proto tcp socket transparent 1 meta mark set 0x1'
ip rule add fwmark 0x1 lookup 100
ip route add local 0.0.0.0/0 dev lo table 100
ip -6 rule add fwmark 0x1 lookup 100
ip -6 route add local ::/0 dev lo table 100
"""

CONFIG = f"""\
[control]
enabled = false
[[forward]]
name = "web"
listen = "{ROUTER_C4}:8080"
connect = "{BACKEND4}:80"
connect_timeout = "2s"
transparent = true
[[forward]]
name = "web6"
listen = "[{ROUTER_C6}]:8080"
connect = "[{BACKEND6}]:80"
transparent = true
[[forward]]
name = "dual"
listen = "[::]:8081"
dual_stack = true
connect = "{BACKEND4}:80"
transparent = true
"""

#: What the backend answers each client: the address it saw, then the sha256 of what it got.
REPLY = "echo peer=$SOCAT_PEERADDR; sha256sum"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Lab:
    client: str
    router: str
    backend: str
    procs: list[Proc] = field(default_factory=list)

    def run(
        self, ns: str, *argv: str, data: bytes = b"", timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], input=data, capture_output=True, timeout=timeout, cwd=REPO
        )

    def start(self, ns: str, *argv: str) -> Proc:
        proc = Proc(["ip", "netns", "exec", ns, *argv], cwd=REPO)
        self.procs.append(proc)
        return proc

    def route_as_readme_says(self) -> None:
        done = self.run(self.router, "sh", "-e", "-c", README_ROUTING)
        assert done.returncode == 0, done.stderr.decode()


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    """Three namespaces joined by two veth pairs; deleted afterwards, also when the test fails."""
    need_root()
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("socat", "socat")):
        need(shutil.which(tool) is not None, f"needs {tool} (apt-get install {package})")
    prefix = f"pft-{uuid.uuid4().hex[:8]}"
    net = Lab(f"{prefix}-cli", f"{prefix}-rtr", f"{prefix}-be")
    created: list[str] = []
    try:
        for ns in (net.client, net.router, net.backend):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip(
            "link",
            "add",
            "c0",
            "netns",
            net.client,
            "type",
            "veth",
            "peer",
            "name",
            "rc0",
            "netns",
            net.router,
        )
        _ip(
            "link",
            "add",
            "b0",
            "netns",
            net.backend,
            "type",
            "veth",
            "peer",
            "name",
            "rb0",
            "netns",
            net.router,
        )
        for ns, dev, addresses in (
            (net.client, "c0", (f"{CLIENT4}/24", f"{CLIENT6}/64")),
            (net.router, "rc0", (f"{ROUTER_C4}/24", f"{ROUTER_C6}/64")),
            (net.router, "rb0", (f"{ROUTER_B4}/24", f"{ROUTER_B6}/64")),
            (net.backend, "b0", (f"{BACKEND4}/24", f"{BACKEND6}/64")),
        ):
            for address in addresses:
                _ip("-n", ns, "addr", "add", address, "dev", dev, *(["nodad"] if ":" in address else []))
            _ip("-n", ns, "link", "set", dev, "up")
        for ns, via4, via6 in ((net.client, ROUTER_C4, ROUTER_C6), (net.backend, ROUTER_B4, ROUTER_B6)):
            _ip("-n", ns, "route", "add", "default", "via", via4)
            _ip("-n", ns, "-6", "route", "add", "default", "via", via6)
        yield net
    finally:
        for proc in net.procs:
            proc.stop()
            proc.close()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def through(net: Lab, target: str, data: bytes) -> list[str]:
    """Send `data` from the client to `target` (a socat address); the lines that came back."""
    result = net.run(
        net.client, "socat", "-t", "5", "-T", "10", "-", f"{target},connect-timeout=3", data=data
    )
    return result.stdout.decode(errors="replace").splitlines()


def seen(line: str) -> str:
    """The address in the backend's `peer=` line, normalised (socat writes IPv6 in full, in brackets)."""
    assert line.startswith("peer="), line
    host = line.removeprefix("peer=").strip("[]")
    return str(ipaddress.ip_address(host))


def test_readme_routing_is_what_problems_suggests() -> None:
    assert README_ROUTING.splitlines()[0] == transparent.nft_command(transparent.MARK)


def test_check_names_what_is_missing_until_the_readme_routing_is_there(tmp_path: Path) -> None:
    config = tmp_path / "transparent.toml"
    config.write_text(CONFIG)
    with lab() as net:
        bare = net.run(net.router, *portfwd_argv("check", "-c", str(config)))
        assert bare.returncode == 0, bare.stderr.decode()
        assert b"config OK" in bare.stdout
        warnings = bare.stderr.decode().splitlines()
        assert warnings == [
            "portfwd: warning: transparent rules web, web6, dual: no nftables rule marks IPv4 and IPv6 "
            "packets of transparent sockets (`socket transparent 1 meta mark set`), so the backends' "
            f"answers would not reach portfwd; run: {transparent.nft_command(1)}",
            "portfwd: warning: transparent rules web, dual: the backends' IPv4 answers to client addresses "
            "would not reach portfwd: no ip rule sends marked packets to a table with a local default "
            "route; run: ip rule add fwmark 0x1 lookup 100 && ip route add local 0.0.0.0/0 dev lo table 100",
            "portfwd: warning: transparent rule web6: the backends' IPv6 answers to client addresses "
            "would not reach portfwd: no ip rule sends marked packets to a table with a local default "
            "route; run: ip -6 rule add fwmark 0x1 lookup 100 && ip -6 route add local ::/0 dev lo table 100",
        ]
        half = "\n".join(README_ROUTING.splitlines()[:2])  # the mark and the rule, not the table
        assert net.run(net.router, "sh", "-e", "-c", half).returncode == 0
        partly = net.run(net.router, *portfwd_argv("check", "-c", str(config))).stderr.decode()
        assert "but table 100 has no local default route" in partly
        assert "run: ip route add local 0.0.0.0/0 dev lo table 100" in partly
        assert "no nftables rule" not in partly
        rest = "\n".join(README_ROUTING.splitlines()[2:])
        assert net.run(net.router, "sh", "-e", "-c", rest).returncode == 0
        routed = net.run(net.router, *portfwd_argv("check", "-c", str(config)))
        assert (routed.returncode, routed.stderr) == (0, b"")


def test_the_backend_sees_the_client_address(tmp_path: Path) -> None:
    config = tmp_path / "transparent.toml"
    config.write_text(CONFIG)
    data = os.urandom(1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    with lab() as net:
        net.start(net.backend, "socat", "TCP4-LISTEN:80,fork,reuseaddr", f"SYSTEM:{REPLY}")
        net.start(net.backend, "socat", "TCP6-LISTEN:80,fork,reuseaddr,ipv6only=1", f"SYSTEM:{REPLY}")
        wait_listening_in(net.backend, 80)
        portfwd = net.start(net.router, *portfwd_argv("run", "-c", str(config)))
        portfwd.wait_for(READY)
        mark = portfwd.mark()
        assert through(net, f"TCP4:{ROUTER_C4}:8080", data) == [], "without the routing, no answer comes back"
        failed = portfwd.wait_for(f"web: {CLIENT4}:", start=mark, timeout=10)
        assert failed.endswith(f"-> {BACKEND4}:80 failed: no answer within 2s; client closed"), failed

        net.route_as_readme_says()
        for rule, target, client in (
            ("web", f"TCP4:{ROUTER_C4}:8080", CLIENT4),
            ("web6", f"TCP6:[{ROUTER_C6}]:8080", CLIENT6),
            ("dual (an IPv4 client of [::] leaves as IPv4)", f"TCP4:{ROUTER_C4}:8081", CLIENT4),
        ):
            reply = through(net, target, data)
            assert len(reply) == 2, f"{rule}: {reply}\n{portfwd.output()}"
            assert seen(reply[0]) == client, f"{rule}: the backend saw {reply[0]}, not the client"
            assert reply[1] == f"{digest}  -", f"{rule}: the bytes did not cross intact"
        assert portfwd.stop() == 0, portfwd.output()


# -- Connect with a source, on loopback (root for IP_TRANSPARENT; no namespace) ---------------------

PROBE = textwrap.dedent(
    """
    import asyncio, socket, sys
    from portfwd.relay.upstream import Connect

    async def main():
        listener = socket.create_server(("127.0.0.1", 0))
        found = []
        Connect([(socket.AF_INET, listener.getsockname())], 5, lambda s, e: found.append((s, e)),
                source=sys.argv[1])
        upstream, error = found[0]
        print(error.reason if error else "connected", error.message if error else upstream.getsockname()[0])

    asyncio.run(main())
    """
)


def probe(*prefix: str, source: str) -> str:
    result = subprocess.run(
        [*prefix, sys.executable, "-c", PROBE, source], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("source", ["127.0.0.1", "::ffff:127.0.0.1"])
def test_connect_leaves_from_the_source_and_a_mapped_one_as_ipv4(source: str) -> None:
    need_root()
    assert probe(source=source) == "connected 127.0.0.1"


def test_connect_without_the_capability_says_what_it_needs() -> None:
    need_root()
    setpriv = need_binary("setpriv", "util-linux")
    answer = probe(setpriv, "--bounding-set=-all", "--inh-caps=-all", source="127.0.0.1")
    assert answer == (
        "transparent transparent: leaving from the client's address needs root or CAP_NET_ADMIN "
        "(IP_TRANSPARENT: operation not permitted)"
    )
