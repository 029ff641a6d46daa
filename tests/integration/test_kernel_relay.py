"""The kernel relay (`relay = "kernel"`) with real packets: client -- host -- server namespaces.

client 10.50.0.2 (+ .3) -- 10.50.0.1 [host, ip_forward=1, the table] 10.60.0.1 -- server 10.60.0.2

The server has no route back to the client's network: only masquerade lets it answer. Peers
are socat processes stopped by PID; the table is loaded into the host namespace only, through
`ip netns exec`, and the namespaces are deleted in `finally`.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from portfwd.addr import HostPorts, PortRange, Transport
from portfwd.kernel import relay, relaytable
from portfwd.specs import RouteSpec, RuleSpec
from tests.conftest import need_binary, need_root
from tests.integration.netns import wait_listening_in
from tests.integration.processes import Proc

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.netns]

CLIENT, CLIENT_OTHER, HOST_C, HOST_S, SERVER = "10.50.0.2", "10.50.0.3", "10.50.0.1", "10.60.0.1", "10.60.0.2"
TABLE = "pft_kernel_relay"
MIB = 1 << 20
ECHO = "echo peer=$SOCAT_PEERADDR. >&2; cat"

#: A UDP client that checks every datagram comes back before sending the next (no loss to
#: blame on a full buffer), bounded by a per-datagram timeout; prints the sha256 of what came back.
UDP_CLIENT = textwrap.dedent(
    """
    import hashlib, socket, sys
    host, port, bind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    data = sys.stdin.buffer.read()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((bind, 0))
    client.settimeout(2)
    client.connect((host, port))
    back = hashlib.sha256()
    for start in range(0, len(data), 1400):
        chunk = data[start:start + 1400]
        client.send(chunk)
        got = b""
        while len(got) < len(chunk):
            got += client.recv(65536)
        back.update(got)
    print(back.hexdigest())
    """
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Net:
    client: str
    host: str
    server: str
    procs: list[Proc] = field(default_factory=list)

    def run(
        self, ns: str, *argv: str, data: bytes = b"", timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], input=data, capture_output=True, timeout=timeout
        )

    def serve(self, ns: str, port: int, command: str = ECHO, udp: bool = False) -> Proc:
        """A socat peer on `port` in `ns` running `command` per client (SOCAT_PEERADDR set)."""
        listen = f"UDP4-RECVFROM:{port},fork" if udp else f"TCP4-LISTEN:{port},fork,reuseaddr"
        # UDP: one child per datagram (RECVFROM), ending 2 s after its last packet, so no child
        # outlives the test (UDP4-LISTEN's forked listener did).
        timeout = ["-T", "2"] if udp else []
        proc = Proc(["ip", "netns", "exec", ns, "socat", *timeout, listen, f"SYSTEM:{command}"])
        self.procs.append(proc)
        if udp:
            deadline = time.monotonic() + 10
            while not self.run(ns, "ss", "-Hlun", f"sport = :{port}").stdout.strip():
                assert time.monotonic() < deadline, f"no UDP listener on {port} in {ns}"
                time.sleep(0.05)
        else:
            wait_listening_in(ns, port)
        return proc

    def tcp(self, ns: str, host: str, port: int, data: bytes, bind: str | None = None) -> bytes:
        """What came back over TCP (b"" when nothing answered within the connect timeout)."""
        target = f"TCP4:{host}:{port},connect-timeout=2" + (f",bind={bind}" if bind else "")
        return self.run(ns, "socat", "-t", "5", "-T", "10", "-", target, data=data).stdout

    def udp(self, ns: str, host: str, port: int, data: bytes, bind: str = "0.0.0.0") -> str:
        """sha256 of what came back over UDP, or the client's error."""
        result = self.run(ns, sys.executable, "-c", UDP_CLIENT, host, str(port), bind, data=data)
        return result.stdout.decode().strip() or result.stderr.decode().strip().splitlines()[-1]

    def load(self, rules: list[RuleSpec]) -> None:
        """Apply the plan with relaytable.apply() run inside the host namespace (never here)."""
        script = f"import sys; from portfwd.kernel import relaytable; relaytable.apply(sys.stdin.read(), {TABLE!r})"
        result = self.run(self.host, sys.executable, "-c", script, data=relay.plan(rules, TABLE).encode())
        assert result.returncode == 0, result.stderr.decode()

    def listing(self) -> dict[str, object]:
        """What relaytable.listing() reads: the table's counters."""
        result = self.run(self.host, "nft", "-j", "list", "counters", "table", "inet", TABLE)
        assert result.returncode == 0, result.stderr.decode()
        data: dict[str, object] = json.loads(result.stdout)
        return data


@contextlib.contextmanager
def topology() -> Iterator[Net]:
    need_root()
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("socat", "socat"), ("ss", "iproute2")):
        need_binary(tool, package)
    prefix = f"pft-kr-{uuid.uuid4().hex[:6]}"
    net = Net(f"{prefix}-c", f"{prefix}-h", f"{prefix}-s")
    created: list[str] = []
    try:
        for ns in (net.client, net.host, net.server):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            net.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        _ip(
            "link", "add", "c0", "netns", net.client, "type", "veth", "peer", "name", "hc0", "netns", net.host
        )
        _ip(
            "link", "add", "s0", "netns", net.server, "type", "veth", "peer", "name", "hs0", "netns", net.host
        )
        for ns, dev, address in (
            (net.client, "c0", f"{CLIENT}/24"),
            (net.client, "c0", f"{CLIENT_OTHER}/24"),
            (net.host, "hc0", f"{HOST_C}/24"),
            (net.host, "hs0", f"{HOST_S}/24"),
            (net.server, "s0", f"{SERVER}/24"),
        ):
            _ip("-n", ns, "addr", "add", address, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        # No route from the server to 10.50.0.0/24, on purpose: replies need the masquerade.
        assert net.run(net.host, "sysctl", "-qw", "net.ipv4.ip_forward=1").returncode == 0
        yield net
    finally:
        for proc in net.procs:
            proc.stop()
            proc.close()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def rule(label: str, listen: str, first: int, connect: str, target: int, **extra: object) -> RuleSpec:
    last = extra.pop("last", first)
    target_last = extra.pop("target_last", target)
    return RuleSpec(
        label=label,
        name=label,
        listen=HostPorts(listen, PortRange(first, int(str(last)))),
        connect=HostPorts(connect, PortRange(target, int(str(target_last)))),
        **extra,  # type: ignore[arg-type]
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def net() -> Iterator[Net]:
    with topology() as built:
        yield built


def test_redirect_to_a_local_port(net: Net) -> None:
    server = net.serve(net.host, 8080)
    net.serve(net.host, 8080, udp=True)
    net.load([rule("web", "", 80, "127.0.0.1", 8080, protocol=Transport.TCP_UDP)])
    data = os.urandom(256 * 1024)

    assert sha(net.tcp(net.client, HOST_C, 80, data)) == sha(data)
    server.wait_for(f"peer={CLIENT}.")
    assert net.udp(net.client, HOST_C, 80, data[: 64 * 1024]) == sha(data[: 64 * 1024])
    # A client on the host itself goes through the nat output chain.
    mark = server.mark()
    assert sha(net.tcp(net.host, "127.0.0.1", 80, data)) == sha(data)
    server.wait_for("peer=127.0.0.1.", start=mark)
    assert sha(net.tcp(net.host, HOST_C, 80, data)) == sha(data)
    web = relaytable.counts(net.listing())["web"]
    assert web.connections >= 4
    assert web.bytes_up > 3 * len(data)
    assert web.bytes_down > 3 * len(data)


def test_dnat_and_masquerade_to_another_host(net: Net) -> None:
    tcp_server = net.serve(net.server, 9000)
    udp_server = net.serve(net.server, 9000, udp=True)
    net.load([rule("db", "", 5000, SERVER, 9000, protocol=Transport.TCP_UDP)])
    data = os.urandom(MIB)

    assert sha(net.tcp(net.client, HOST_C, 5000, data)) == sha(data)
    tcp_server.wait_for(f"peer={HOST_S}.")  # masqueraded: the server has no route to the client
    assert net.udp(net.client, HOST_C, 5000, data) == sha(data)
    udp_server.wait_for(f"peer={HOST_S}.")
    # From the host itself, to one of its own (non-loopback) addresses: the output chain.
    assert sha(net.tcp(net.host, HOST_C, 5000, data[:4096])) == sha(data[:4096])

    listing = net.listing()
    db = relaytable.counts(listing)["db"]
    assert db.bytes_up > 2 * MIB
    assert db.bytes_down > 2 * MIB
    assert db.connections >= 3


def test_0_0_0_0_forwards_from_every_ipv4_address(net: Net) -> None:
    """`listen = "0.0.0.0:P"` is every IPv4 address of the host, as in userspace (it once became
    `ip daddr 0.0.0.0`, which no packet has): the client's side, the server's side, the host itself."""
    server = net.serve(net.server, 9000)
    net.serve(net.host, 8080, command="echo local; cat")
    net.load(
        [
            rule("any4", "0.0.0.0", 5000, SERVER, 9000, protocol=Transport.TCP_UDP),
            rule("here", "0.0.0.0", 5001, "127.0.0.1", 8080),
        ]
    )
    net.serve(net.server, 9000, udp=True)
    _ip("-n", net.client, "route", "add", f"{HOST_S}/32", "via", HOST_C)  # the host's other address
    data = os.urandom(MIB)

    for address in (HOST_C, HOST_S):
        assert sha(net.tcp(net.client, address, 5000, data)) == sha(data), address
    server.wait_for(f"peer={HOST_S}.")  # masqueraded
    assert net.udp(net.client, HOST_S, 5000, data[:65536]) == sha(data[:65536])
    assert sha(net.tcp(net.host, HOST_C, 5000, data[:4096])) == sha(data[:4096])  # the output chain
    assert net.tcp(net.client, HOST_S, 5001, b"x\n") == b"local\nx\n"
    assert net.tcp(net.host, "127.0.0.1", 5001, b"y\n") == b"local\ny\n"

    counted = relaytable.counts(net.listing())
    assert counted["any4"].connections >= 4
    assert counted["any4"].bytes_up > 2 * MIB
    assert counted["any4"].bytes_down > 2 * MIB
    assert counted["here"].connections == 2
    assert counted["here"].bytes_down > 0


def test_rules_sharing_a_port_each_take_their_own_address(net: Net) -> None:
    """Two listen addresses on one port (the dispatch map jumps to both rules in order), and a
    third rule on every address for the rest; each one's counters see only its own flows."""
    for port, word in ((9000, "a"), (9001, "b"), (9002, "any")):
        net.serve(net.server, port, command=f"echo {word}; cat")
    _ip("-n", net.client, "route", "add", f"{HOST_S}/32", "via", HOST_C)
    net.load(
        [
            rule("a", HOST_C, 5000, SERVER, 9000),
            rule("b", HOST_S, 5000, SERVER, 9001),
            rule("any", "", 4999, SERVER, 9002, last=5001),
        ]
    )
    assert net.tcp(net.client, HOST_C, 5000, b"x\n") == b"a\nx\n"
    assert net.tcp(net.client, HOST_S, 5000, b"x\n") == b"b\nx\n"
    assert net.tcp(net.client, HOST_C, 5001, b"x\n") == b"any\nx\n"
    counted = relaytable.counts(net.listing())
    assert [counted[name].connections for name in ("a", "b", "any")] == [1, 1, 1]
    assert all(counted[name].bytes_down > 0 for name in ("a", "b", "any"))


def test_a_port_range_keeps_its_offset(net: Net) -> None:
    for port in (9000, 9001, 9002):
        net.serve(net.server, port, command=f"echo port={port}; cat")
    net.load([rule("range", HOST_C, 7000, SERVER, 9000, last=7002, target_last=9002)])
    for offset in range(3):
        assert net.tcp(net.client, HOST_C, 7000 + offset, b"hi\n") == f"port={9000 + offset}\nhi\n".encode()


def test_allow_deny_and_routes(net: Net) -> None:
    net.serve(net.server, 9000, command="echo default; cat")
    net.serve(net.server, 9100, command="echo routed; cat")
    only_client = (ipaddress.ip_network(f"{CLIENT}/32"),)
    other = (ipaddress.ip_network(f"{CLIENT_OTHER}/32"),)

    net.load([rule("acl", "", 5000, SERVER, 9000, allow=only_client)])
    assert net.tcp(net.client, HOST_C, 5000, b"x\n", bind=CLIENT) == b"default\nx\n"
    assert net.tcp(net.client, HOST_C, 5000, b"x\n", bind=CLIENT_OTHER) == b""

    net.load([rule("acl", "", 5000, SERVER, 9000, deny=other)])
    assert net.tcp(net.client, HOST_C, 5000, b"x\n", bind=CLIENT) == b"default\nx\n"
    assert net.tcp(net.client, HOST_C, 5000, b"x\n", bind=CLIENT_OTHER) == b""

    route = RouteSpec(other, HostPorts(SERVER, PortRange(9100, 9100)))
    net.load([rule("acl", "", 5000, SERVER, 9000, route=(route,))])
    assert net.tcp(net.client, HOST_C, 5000, b"x\n", bind=CLIENT) == b"default\nx\n"
    assert net.tcp(net.client, HOST_C, 5000, b"x\n", bind=CLIENT_OTHER) == b"routed\nx\n"


def test_remove_leaves_no_table(net: Net) -> None:
    net.load([rule("db", "", 5000, SERVER, 9000)])
    script = f"from portfwd.kernel import relaytable; print(relaytable.remove({TABLE!r}), relaytable.remove({TABLE!r}))"
    result = net.run(net.host, sys.executable, "-c", script)
    assert result.stdout.decode().split() == ["True", "False"], result.stderr.decode()
    assert net.run(net.host, "nft", "list", "tables").stdout.strip() == b""


def test_a_refused_plan_names_the_rule_and_changes_nothing(net: Net) -> None:
    net.load([rule("db", "", 5000, SERVER, 9000)])
    broken = relay.plan([rule("db", "", 5000, SERVER, 9000)], TABLE).replace(
        "counter masquerade", "counter bogus"
    )
    script = (
        "import sys; from portfwd.kernel import relaytable\n"
        f"try:\n relaytable.apply(sys.stdin.read(), {TABLE!r})\nexcept relaytable.KernelRelayError as err:\n print(err)"
    )
    result = net.run(net.host, sys.executable, "-c", script, data=broken.encode())
    assert result.stdout.decode().startswith("db: nft refused it: "), result
    assert "masquerade" in net.run(net.host, "nft", "list", "table", "inet", TABLE).stdout.decode()
