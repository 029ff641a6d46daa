"""`proxy_protocol = "v1" | "v2"`: the backend learns the real client, read by the real readers.

haproxy (`accept-proxy`, its `%ci:%cp` in the log) and nginx (`listen ... proxy_protocol`,
`$proxy_protocol_addr` in its access log) from Debian's packages, started here on 127.0.0.1.
The client connects from 127.0.0.2, so the address the peer logs is the client's, not
portfwd's (which connects from 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.integration.peers import free_port
from tests.integration.processes import READY, Proc, portfwd_argv, run_portfwd, started
from tests.integration.test_status import Sink

pytestmark = pytest.mark.integration


def _listening(port: int, peer: Proc) -> None:
    """Wait (bounded) until the peer listens on `port`, seen by `ss -l`: a probe connection
    without a header would be a client the peer logs or refuses."""
    ss = need_binary("ss", "iproute2")
    deadline = time.monotonic() + 15
    while not subprocess.run(
        [ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip():
        assert peer.popen.poll() is None, peer.output()
        assert time.monotonic() < deadline, peer.output()
        time.sleep(0.02)  # polling the kernel's table, bounded by the deadline


def _closed_on(sock: socket.socket) -> bool:
    """The peer closed the connection: an end of stream, or a reset (it closed with our bytes
    unread, which is how a refusal before reading looks)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _forward(tmp_path: Path, version: str, backend: int, relay: str = "auto") -> tuple[Path, int]:
    port = free_port()
    config = tmp_path / f"portfwd-{version}.toml"
    config.write_text(
        f'[control]\nsocket = "{tmp_path / f"ctl-{version}.sock"}"\n'
        f'[[forward]]\nname = "pp"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:{backend}"\n'
        f'proxy_protocol = "{version}"\nrelay = "{relay}"\n'
    )
    return config, port


def _from_client_address(port: int, payload: bytes) -> tuple[int, bytes]:
    """Connect from 127.0.0.2, send `payload`, half-close, read the answer: (client port, answer)."""
    with socket.socket() as client:
        client.bind(("127.0.0.2", 0))
        client.settimeout(10)
        client.connect(("127.0.0.1", port))
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        return client.getsockname()[1], answer


@pytest.mark.parametrize(
    ("version", "relay"), [("v1", "splice"), ("v2", "splice"), ("v1", "protocol"), ("v2", "protocol")]
)
def test_haproxy_accept_proxy_logs_the_real_client(tmp_path: Path, version: str, relay: str) -> None:
    haproxy = need_binary("haproxy", "haproxy")
    sink = Sink().start()
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "global\n  log stdout format raw local0 info\n"
        "defaults\n  mode tcp\n  log global\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
        f"frontend front\n  bind 127.0.0.1:{front} accept-proxy\n"
        '  log-format "client=%ci:%cp bytes=%U"\n  default_backend sink\n'
        f"backend sink\n  server sink 127.0.0.1:{sink.port}\n"
    )
    peer = Proc([haproxy, "-db", "-f", str(cfg)])
    try:
        _listening(front, peer)
        config, port = _forward(tmp_path, version, front, relay)
        payload = os.urandom(256 * 1024)
        with started(portfwd_argv("run", "-c", str(config)), ready=READY):
            client_port, answer = _from_client_address(port, payload)
            line = peer.wait_for("client=")
            checked = run_portfwd("check", "-c", str(config)).stdout
    finally:
        peer.stop()
        peer.close()
        sink.close()
    assert answer == hashlib.sha256(payload).hexdigest().encode(), "the bytes crossed whole"
    assert line.strip() == f"client=127.0.0.2:{client_port} bytes={len(payload)}", line
    assert f"PROXY {version} header" in checked


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_proxy_protocol_listener_logs_the_real_client(tmp_path: Path, version: str) -> None:
    nginx = need_binary("nginx", "nginx")
    front = free_port()
    log = tmp_path / "access.log"
    cfg = tmp_path / "nginx.conf"
    temps = "".join(
        f"  {name}_temp_path {tmp_path / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    cfg.write_text(
        f"daemon off;\nworker_processes 1;\npid {tmp_path / 'nginx.pid'};\nerror_log stderr;\n"
        "events {}\n"
        "http {\n"
        f"{temps}"
        "  log_format pp '$proxy_protocol_addr:$proxy_protocol_port $remote_addr \"$request\" $status';\n"
        f"  access_log {log} pp;\n"
        f"  server {{\n    listen 127.0.0.1:{front} proxy_protocol;\n"
        '    location / { return 200 "hello\\n"; }\n  }\n'
        "}\n"
    )
    peer = Proc([nginx, "-c", str(cfg), "-p", str(tmp_path), "-e", "stderr"])
    try:
        _listening(front, peer)
        config, port = _forward(tmp_path, version, front)
        with started(portfwd_argv("run", "-c", str(config)), ready=READY):
            client_port, answer = _from_client_address(port, b"GET /seen HTTP/1.0\r\nHost: x\r\n\r\n")
            deadline = time.monotonic() + 10
            while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
                time.sleep(0.05)  # nginx writes the line after the answer; bounded by the deadline
            logged = log.read_text().splitlines()
    finally:
        peer.stop()
        peer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.endswith(b"hello\n"), answer
    # $remote_addr is who connected to nginx (portfwd); the PROXY header names the client
    assert logged == [f'127.0.0.2:{client_port} 127.0.0.1 "GET /seen HTTP/1.0" 200'], logged


def test_proxy_protocol_v1_on_a_udp_rule_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "udp.toml"
    config.write_text(
        '[[forward]]\nlisten = "127.0.0.1:5353"\nconnect = "127.0.0.1:53"\nprotocol = "udp"\nproxy_protocol = "v1"\n'
    )
    result = run_portfwd("check", "-c", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        'portfwd: forward[0].proxy_protocol: "v1" names TCP connections only; use "v2" (each UDP '
        "datagram then begins with the header, as go-mmproxy reads it)"
    ]


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_behind_haproxy_the_real_client_is_the_client(tmp_path: Path, send: str) -> None:
    """accept_proxy_protocol: haproxy in front says who the client is; allow/deny and the logs
    go by that address; a sender outside trusted_proxies, or a bad header, is refused."""
    haproxy = need_binary("haproxy", "haproxy")
    sink = Sink().start()
    front, port = free_port(), free_port()
    control = tmp_path / "ctl.sock"
    config = tmp_path / "behind.toml"
    config.write_text(
        f'[control]\nsocket = "{control}"\n'
        f'[[forward]]\nname = "behind"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:{sink.port}"\n'
        'accept_proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\nallow = ["127.0.0.2/32"]\n'
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
        f"frontend front\n  bind 127.0.0.1:{front}\n  default_backend portfwd\n"
        f"backend portfwd\n  server portfwd 127.0.0.1:{port} {send}\n"
    )
    payload = os.urandom(128 * 1024)
    with started(portfwd_argv("run", "-c", str(config)), ready=READY) as proc:
        peer = Proc([haproxy, "-db", "-f", str(cfg)])
        try:
            _listening(front, peer)
            client_port, answer = _from_client_address(front, payload)  # from 127.0.0.2: allowed
            opened = proc.wait_for(" open (")
            with socket.socket() as other:  # from 127.0.0.3: the header says so, allow says no
                other.bind(("127.0.0.3", 0))
                other.settimeout(10)
                other.connect(("127.0.0.1", front))
                other.sendall(b"x")
                assert _closed_on(other), "closed without reaching the target"
            denied = proc.wait_for("denied by allow/deny")
            # a direct sender not in trusted_proxies, even with a good header
            with socket.socket() as direct:
                direct.bind(("127.0.0.2", 0))
                direct.settimeout(10)
                direct.connect(("127.0.0.1", port))
                direct.sendall(b"PROXY TCP4 127.0.0.2 127.0.0.1 1 2\r\nx")
                assert _closed_on(direct)
            untrusted = proc.wait_for("denied by trusted_proxies")
            # a trusted sender with no header
            with socket.create_connection(("127.0.0.1", port), timeout=10) as bad:
                bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert _closed_on(bad)
            garbled = proc.wait_for("bad PROXY header")
            snapshot = json.loads(run_portfwd("status", "--json", "--control", str(control)).stdout)
        finally:
            peer.stop()
            peer.close()
            sink.close()
    assert answer == hashlib.sha256(payload).hexdigest().encode(), "the client's bytes crossed whole"
    assert f"behind: 127.0.0.2:{client_port} -> 127.0.0.1:{sink.port} open (" in opened
    assert "behind: 127.0.0.3:" in denied
    assert "behind: 127.0.0.2:" in untrusted
    assert "no PROXY header (the sender must speak the PROXY protocol, v1 or v2)" in garbled
    [closed] = [row for row in snapshot["closed"] if row["bytes_up"]]
    assert closed["client"] == f"127.0.0.2:{client_port}"
    [rule] = snapshot["rules"]
    assert rule["errors"] == {"proxy_untrusted": 1, "proxy_header": 1}
    assert rule["denied_total"] == 1
