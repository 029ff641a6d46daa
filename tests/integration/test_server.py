"""`portfwd server` with the stock OpenSSH client: -L, -R, -R 0, -D, policy, takeover, refusals.

portfwd server runs as a subprocess, as users run it; ssh clients are processes we start and
stop by PID; peers are threads (Sink: answers the sha256 of what it got).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.integration.peers import free_port
from tests.integration.processes import READY, Proc, portfwd_argv, run_portfwd, started, wait_listening
from tests.integration.sshd import keygen
from tests.integration.test_status import Sink, send_all

pytestmark = [pytest.mark.integration]
MiB = 1024 * 1024


class Server:
    """A `portfwd server` on 127.0.0.1 with users alice (and bob), and what a stock client needs."""

    def __init__(
        self,
        root: Path,
        *,
        gateway_ports: bool = False,
        extra_user: str = "",
        permit_listen: str = '["127.0.0.1:*", "0.0.0.0:*"]',
        permit_open: str = '["127.0.0.1:*", "localhost:*"]',
        log_format: str = "text",
        settings: str = "",
    ) -> None:
        need_binary("ssh", "openssh-client")
        self.root = root
        self.port = free_port()
        self.control = root / "ctl.sock"
        self.key = root / "alice_key"
        self.public = keygen(self.key)
        (root / "alice.keys").write_text(f"{self.public}\n")
        self.host_key = root / "host_ed25519"
        self.config = root / "server.toml"
        self.config.write_text(
            f'[control]\nsocket = "{self.control}"\n'
            f'[server]\nlisten = "127.0.0.1:{self.port}"\nhost_key = "{self.host_key}"\n'
            f'gateway_ports = {"true" if gateway_ports else "false"}\nclient_alive_interval = "1s"\n{settings}'
            f'[[server.user]]\nname = "alice"\nauthorized_keys = "{root / "alice.keys"}"\n'
            f"permit_open = {permit_open}\n"
            f"permit_listen = {permit_listen}\n" + extra_user
        )
        self.known_hosts = root / "known_hosts"
        self.log_format = log_format
        self.proc: Proc | None = None

    def start(self) -> Server:
        self.proc = Proc(portfwd_argv("server", "-c", str(self.config), "--log-format", self.log_format))
        self.proc.wait_for("ready" if self.log_format == "json" else READY)
        public = subprocess.run(
            ["ssh-keygen", "-y", "-f", str(self.host_key)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {public}\n")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc.close()

    def ssh(self, *args: str, user: str = "alice", key: Path | None = None) -> list[str]:
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(key or self.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "ConnectTimeout=5",
            "-N",
            "-p",
            str(self.port),
            *args,
            f"{user}@127.0.0.1",
        ]

    def log(self) -> str:
        assert self.proc is not None
        return self.proc.output()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path).start()
    yield running
    running.stop()


@pytest.fixture
def sink() -> Iterator[Sink]:
    peer = Sink().start()
    yield peer
    peer.close()


def through(port: int, size: int = 8 * MiB) -> bool:
    data = os.urandom(size)
    answer: list[bytes] = []
    send_all(port, data, answer)
    return answer == [hashlib.sha256(data).hexdigest().encode()]


def socks_through(port: int, target: int, size: int = 8 * MiB) -> bool:
    data = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(b"\x05\x01\x00")
        assert client.recv(2) == b"\x05\x00"
        name = b"localhost"
        client.sendall(b"\x05\x01\x00\x03" + bytes((len(name),)) + name + struct.pack("!H", target))
        reply = b""
        while len(reply) < 10:
            reply += client.recv(10 - len(reply))
        assert reply[1] == 0, reply
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(4096):
            answer += chunk
    return answer == hashlib.sha256(data).hexdigest().encode()


def wait_port(port: int, timeout: float = 15.0) -> None:
    wait_listening(port, timeout=timeout)


def test_stock_ssh_local_remote_and_dynamic(server: Server, sink: Sink) -> None:
    local, remote, socks = free_port(), free_port(), free_port()
    argv = server.ssh(
        "-L",
        f"127.0.0.1:{local}:127.0.0.1:{sink.port}",
        "-R",
        f"127.0.0.1:{remote}:127.0.0.1:{sink.port}",
        "-D",
        f"127.0.0.1:{socks}",
    )
    with started(argv):
        for port in (local, socks):
            wait_port(port)
        server.proc.wait_for(f"listening on 127.0.0.1:{remote} for the client")  # type: ignore[union-attr]
        assert through(local)
        assert through(remote)
        assert socks_through(socks, sink.port)
        snapshot = json.loads(run_portfwd("status", "--json", "-c", str(server.config)).stdout)
        table = run_portfwd("status", "-c", str(server.config))
    assert table.returncode == 0, table.stderr
    assert "server sessions" in table.stdout
    assert f"-R 127.0.0.1:{remote}" in table.stdout
    [session] = snapshot["server_sessions"]
    assert session["user"] == "alice"
    assert session["fingerprint"].startswith("SHA256:")
    assert session["forwards"] == [f"-R 127.0.0.1:{remote}"]
    assert session["connections_total"] == 4  # three transfers and the readiness probe of -L
    assert session["bytes_up"] >= 24 * MiB


def test_no_ignore_packets_reach_the_stock_client(server: Server, sink: Sink) -> None:
    """ssh -vvv logs each SSH_MSG_IGNORE it receives; asyncssh would send one before every packet."""
    local = free_port()
    argv = server.ssh(
        "-vvv", "-o", "Ciphers=aes128-gcm@openssh.com", "-L", f"127.0.0.1:{local}:127.0.0.1:{sink.port}"
    )
    with started(argv) as client:
        wait_port(local)
        assert through(local, MiB)
        log = client.output()
    assert "cipher: aes128-gcm@openssh.com" in log
    assert "Received SSH2_MSG_IGNORE" not in log


@pytest.mark.parametrize("cipher", ["aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
def test_stock_client_rekeys_under_the_stateful_ciphers(server: Server, sink: Sink, cipher: str) -> None:
    """ssh re-keys every 256 KiB; the server swaps in its stateful cipher for each new key."""
    local = free_port()
    log = server.root / "ssh.log"  # -E: a log this long would fill the pipe and stall ssh
    argv = server.ssh(
        "-v", "-E", str(log), "-o", f"Ciphers={cipher}", "-o", "RekeyLimit=256K",
        "-L", f"127.0.0.1:{local}:127.0.0.1:{sink.port}",
    )  # fmt: skip
    with started(argv):
        wait_port(local)
        assert through(local, 4 * MiB)
    text = log.read_text()
    assert f"cipher: {cipher}" in text
    assert text.count("SSH2_MSG_NEWKEYS received") >= 8, "many key exchanges, none refused"


def test_remote_port_zero_and_gateway_ports(tmp_path: Path, sink: Sink) -> None:
    for gateway_ports, expected in ((False, "127.0.0.1"), (True, "0.0.0.0")):
        root = tmp_path / str(gateway_ports)
        root.mkdir()
        server = Server(root, gateway_ports=gateway_ports).start()
        try:
            public = free_port()
            argv = server.ssh(
                "-R", f"0:127.0.0.1:{sink.port}", "-R", f"0.0.0.0:{public}:127.0.0.1:{sink.port}"
            )
            with started(argv) as client:
                line = client.wait_for("Allocated port")
                allocated = int(
                    re.findall(r"Allocated port (\d+) for remote forward to 127\.0\.0\.1:\d+", line)[0]
                )
                server.proc.wait_for(f"listening on {expected}:{public} for the client")  # type: ignore[union-attr]
                bound = subprocess.run(
                    ["ss", "-Htln", f"sport = :{public}"], capture_output=True, text=True, timeout=10
                ).stdout
                assert f"{expected}:{public}" in bound
                assert through(allocated, MiB)
                assert through(public, MiB)
        finally:
            server.stop()


def test_policy_refusals_reach_the_stock_client(tmp_path: Path, sink: Sink) -> None:
    bob_key = tmp_path / "bob_key"
    bob_public = keygen(bob_key)
    (tmp_path / "bob.keys").write_text(f"restrict {bob_public}\n")
    carol_key = tmp_path / "carol_key"
    (tmp_path / "carol.keys").write_text(keygen(carol_key) + "\n")
    extra = (
        f'[[server.user]]\nname = "bob"\nauthorized_keys = "{tmp_path / "bob.keys"}"\npermit_open = ["any"]\n'
        f'[[server.user]]\nname = "carol"\nauthorized_keys = "{tmp_path / "carol.keys"}"\nfrom = ["10.0.0.0/8"]\n'
    )
    server = Server(tmp_path, extra_user=extra, permit_listen='["127.0.0.1:18022"]').start()
    try:
        # permit_open miss: the channel is refused, the client keeps running
        local = free_port()
        with started(server.ssh("-L", f"127.0.0.1:{local}:10.9.9.9:80")) as client:
            wait_port(local)
            with socket.create_connection(("127.0.0.1", local), timeout=10) as probe:
                assert probe.recv(1) == b""
            line = client.wait_for("open failed")
            assert "administratively prohibited: connect to 10.9.9.9:80: not in permit_open" in line
        # permit_listen miss: ExitOnForwardFailure makes ssh exit 255 with its usual line
        result = subprocess.run(
            server.ssh("-R", "127.0.0.1:8022:127.0.0.1:22"), capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 255
        assert "remote port forwarding failed for listen port 8022" in result.stderr
        # restrict in authorized_keys: no forwarding at all
        local = free_port()
        with started(
            server.ssh("-L", f"127.0.0.1:{local}:127.0.0.1:{sink.port}", user="bob", key=bob_key)
        ) as client:
            wait_port(local)
            with socket.create_connection(("127.0.0.1", local), timeout=10) as probe:
                assert probe.recv(1) == b""
            assert "administratively prohibited" in client.wait_for("open failed")
        # from miss, unknown user, wrong key: the login fails as with sshd
        for user, key in (("carol", carol_key), ("mallory", server.key), ("alice", carol_key)):
            result = subprocess.run(
                server.ssh("-L", f"{free_port()}:127.0.0.1:9", user=user, key=key),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.returncode == 255
            assert "Permission denied (publickey)" in result.stderr
        log = server.log()
        assert "connect to 10.9.9.9:80 denied: not in permit_open" in log
        assert "listen on 127.0.0.1:8022 denied: not in permit_listen" in log
        assert "denied: port forwarding is off for this key (authorized_keys restrict)" in log
        assert "user carol is not allowed from this address" in log
        assert "unknown user mallory; refused" in log
    finally:
        server.stop()


def test_reverse_port_takeover_after_a_dead_link(tmp_path: Path, sink: Sink) -> None:
    server = Server(tmp_path, settings='takeover_probe = "1s"\n').start()
    port = free_port()
    first = Proc(server.ssh("-o", "ServerAliveInterval=0", "-R", f"127.0.0.1:{port}:127.0.0.1:{sink.port}"))
    second: Proc | None = None
    try:
        server.proc.wait_for(f"listening on 127.0.0.1:{port} for the client")  # type: ignore[union-attr]
        os.kill(first.pid, signal.SIGSTOP)  # a dead link: no FIN, no keepalive answers
        mark = server.proc.mark()  # type: ignore[union-attr]
        began = time.monotonic()
        second = Proc(server.ssh("-R", f"127.0.0.1:{port}:127.0.0.1:{sink.port}"))
        server.proc.wait_for(f"listening on 127.0.0.1:{port} for the client", start=mark)  # type: ignore[union-attr]
        took = time.monotonic() - began
        assert 1.0 <= took < 3.0, "the probe's 1 s, then served by the new session, ssh's start-up included"
        assert through(port, MiB)
        assert f"takes over 127.0.0.1:{port} from its stale session" in server.log()
        assert "(no keepalive answer within 1s)" in server.log()
        assert second.popen.poll() is None
    finally:
        with_suppress_kill(first)
        if second is not None:
            second.stop()
            second.close()
        server.stop()


def test_a_live_session_keeps_its_port_against_a_second_client_with_its_key(
    server: Server, sink: Sink
) -> None:
    """Two autossh with one key by mistake: the port stays with the first, the second is refused."""
    port = free_port()
    argv = server.ssh("-R", f"127.0.0.1:{port}:127.0.0.1:{sink.port}")
    first = Proc(argv)
    try:
        server.proc.wait_for(f"listening on 127.0.0.1:{port} for the client")  # type: ignore[union-attr]
        second = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert second.returncode == 255
        assert f"remote port forwarding failed for listen port {port}" in second.stderr
        assert first.popen.poll() is None, "the first client keeps running"
        assert through(port, MiB), "and keeps the port"
        log = server.log()
        assert f"127.0.0.1:{port} is held by alice@127.0.0.1:" in log
        assert "which is alive (it answered a keepalive); refused" in log
        assert "takes over" not in log
    finally:
        first.stop()
        first.close()


def with_suppress_kill(proc: Proc) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)
    proc.stop(signal.SIGKILL)
    proc.close()


def test_no_users_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{free_port()}"\nhost_key = "{tmp_path / "k"}"\n')
    result = run_portfwd("server", "-c", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "portfwd: server: no [[server.user]]; add one with name and authorized_keys (portfwd server never runs without users)"
    ]


def test_fingerprint_and_garbage_clients(server: Server, sink: Sink) -> None:
    printed = run_portfwd("server", "--fingerprint", "-c", str(server.config)).stdout.strip()
    listed = subprocess.run(
        ["ssh-keygen", "-lf", str(server.host_key)], capture_output=True, text=True, timeout=30
    ).stdout
    assert printed.startswith("SHA256:")
    assert printed in listed
    assert printed in server.log(), "printed at start too"
    assert oct(server.host_key.stat().st_mode & 0o777) == "0o600"
    local = free_port()
    with started(server.ssh("-L", f"127.0.0.1:{local}:127.0.0.1:{sink.port}")):
        wait_port(local)
        for garbage in (b"GET / HTTP/1.0\r\n\r\n", b"SSH-2.0-x\r\n" + os.urandom(3000), os.urandom(100)):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                raw.sendall(garbage)
                raw.settimeout(1)  # closed at once, or left to the login timeout: both are fine
                with contextlib.suppress(TimeoutError, ConnectionError):
                    while raw.recv(4096):
                        pass
        assert through(local, MiB), "the logged-in client is undisturbed"


def test_a_silent_client_is_reaped(server: Server, sink: Sink) -> None:
    """client_alive_interval = 1s (x3): a frozen client's session and -R port are released."""
    port = free_port()
    client = Proc(server.ssh("-o", "ServerAliveInterval=0", "-R", f"127.0.0.1:{port}:127.0.0.1:{sink.port}"))
    try:
        server.proc.wait_for(f"listening on 127.0.0.1:{port} for the client")  # type: ignore[union-attr]
        os.kill(client.pid, signal.SIGSTOP)
        began = time.monotonic()
        server.proc.wait_for("logged out", timeout=15)  # type: ignore[union-attr]
        assert time.monotonic() - began < 8
        snapshot = json.loads(run_portfwd("status", "--json", "-c", str(server.config)).stdout)
        assert snapshot["server_sessions"] == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        with_suppress_kill(client)


def test_shell_and_commands_are_refused(server: Server) -> None:
    argv = [item for item in server.ssh() if item != "-N"]
    result = subprocess.run([*argv, "id"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 255
    assert "open failed" in result.stderr
    assert "asked for a shell or command; refused (use ssh -N)" in server.log()


def test_stock_ssh_remote_unix_socket(tmp_path: Path, sink: Sink) -> None:
    path = tmp_path / "remote.sock"
    server = Server(tmp_path, permit_listen=f'["unix:{path}"]').start()
    try:
        with started(server.ssh("-R", f"{path}:127.0.0.1:{sink.port}")):
            server.proc.wait_for(f"listening on unix:{path} for the client")  # type: ignore[union-attr]
            data = os.urandom(8 * MiB)
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(30)
                client.connect(str(path))
                client.sendall(data)
                client.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := client.recv(4096):
                    answer += chunk
            assert answer == hashlib.sha256(data).hexdigest().encode()
        refused = subprocess.run(
            server.ssh("-R", f"{tmp_path / 'other.sock'}:127.0.0.1:{sink.port}"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode == 255
        assert "remote port forwarding failed" in refused.stderr or "forwarding failed" in refused.stderr
    finally:
        server.stop()
    assert not path.exists(), "the socket file is removed when the session ends"


@pytest.mark.root
def test_stock_sshd_fails_the_same_takeover(tmp_path: Path, sink: Sink) -> None:
    """The comparison for the takeover test: sshd keeps the dead session's -R port."""
    from tests.integration.sshd import Sshd

    sshd = Sshd(tmp_path).start()
    port = free_port()

    def client(*extra: str) -> list[str]:
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(sshd.user_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={sshd.known_hosts}",
            "-o",
            "ExitOnForwardFailure=yes",
            "-N",
            "-p",
            str(sshd.port),
            *extra,
            "-R",
            f"127.0.0.1:{port}:127.0.0.1:{sink.port}",
            "root@127.0.0.1",
        ]

    first = Proc(client("-o", "ServerAliveInterval=0"))
    try:
        wait_port(port)
        os.kill(first.pid, signal.SIGSTOP)
        result = subprocess.run(client(), capture_output=True, text=True, timeout=30)
        assert result.returncode == 255
        assert f"remote port forwarding failed for listen port {port}" in result.stderr
    finally:
        with_suppress_kill(first)
        sshd.kill()
