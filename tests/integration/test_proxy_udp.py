"""PROXY v2 over UDP into go-mmproxy: the UDP server behind it sees the real client's address.

go-mmproxy (Debian's package) reads a PROXY v2 header at the start of every datagram and sends
the rest to its target from the client's own address (IP_TRANSPARENT). The topology: a client
namespace and a proxy namespace joined by a veth pair; portfwd, go-mmproxy and a UDP server
that answers with the address it saw all run in the proxy namespace, with the local routing
go-mmproxy's README gives for a loopback target.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.integration.netns import in_ns, namespace
from tests.integration.processes import READY, portfwd_argv, started

pytestmark = [pytest.mark.integration, pytest.mark.netns]

SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 9000))
print("serving", flush=True)
for _ in range(100):
    data, peer = s.recvfrom(65535)
    s.sendto(f"{peer[0]}:{peer[1]} ".encode() + data, peer)
"""

CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.bind(("10.9.0.2", int(sys.argv[1])))
for word in sys.argv[2:]:
    s.sendto(word.encode(), ("10.9.0.1", 7000))
    print(s.recv(200).decode(), flush=True)
"""


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@contextlib.contextmanager
def _topology() -> Iterator[tuple[str, str]]:
    with namespace("mmc") as client, namespace("mmp") as proxy:
        veth = f"v{uuid.uuid4().hex[:8]}"
        _ip(
            "link",
            "add",
            f"{veth}c",
            "netns",
            client,
            "type",
            "veth",
            "peer",
            "name",
            f"{veth}p",
            "netns",
            proxy,
        )
        _ip("-n", client, "addr", "add", "10.9.0.2/24", "dev", f"{veth}c")
        _ip("-n", proxy, "addr", "add", "10.9.0.1/24", "dev", f"{veth}p")
        _ip("-n", client, "link", "set", f"{veth}c", "up")
        _ip("-n", proxy, "link", "set", f"{veth}p", "up")
        # go-mmproxy's README: answers to the spoofed client addresses go back to its sockets
        _ip("-n", proxy, "rule", "add", "from", "127.0.0.1/8", "iif", "lo", "table", "123")
        _ip("-n", proxy, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "123")
        yield client, proxy


def test_udp_datagrams_carry_a_proxy_v2_header_go_mmproxy_reads(tmp_path: Path) -> None:
    mmproxy = need_binary("go-mmproxy", "go-mmproxy")
    with _topology() as (client, proxy):
        config = tmp_path / "udp.toml"
        config.write_text(
            "[control]\nenabled = false\n[[forward]]\n"
            'listen = "10.9.0.1:7000"\nconnect = "127.0.0.1:8000"\nprotocol = "udp"\nproxy_protocol = "v2"\n'
        )
        with (
            started(in_ns(proxy, sys.executable, "-c", SERVER), ready="serving"),
            started(
                in_ns(proxy, mmproxy, "-p", "udp", "-l", "127.0.0.1:8000", "-4", "127.0.0.1:9000"),
                ready="listening",
            ),
            started(in_ns(proxy, *portfwd_argv("run", "-c", str(config))), ready=READY) as portfwd,
        ):
            answers = subprocess.run(
                in_ns(client, sys.executable, "-c", CLIENT, "40001", "one", "two"),
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.splitlines()
            # The server saw the client's own address and port, and only the client's bytes.
            assert answers == ["10.9.0.2:40001 one", "10.9.0.2:40001 two"]
            second = subprocess.run(
                in_ns(client, sys.executable, "-c", CLIENT, "40002", "three"),
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.splitlines()
            assert second == ["10.9.0.2:40002 three"]
            portfwd.wait_for("10.9.0.2:40002 -> 127.0.0.1:8000 open (udp)")
