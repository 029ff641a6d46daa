"""`portfwd server` against hostile clients: path traversal, ports out of range, log injection.

Stock `ssh` where it can say the bad thing; asyncssh as a raw client where stock ssh refuses to
(ports above 65535, control characters in host names).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncssh
import pytest

from tests.integration.peers import free_port
from tests.integration.processes import run_portfwd, wait_listening
from tests.integration.test_server import Server
from tests.integration.test_status import Sink

pytestmark = [pytest.mark.integration]


@contextmanager
def unix_service(path: Path, greeting: bytes) -> Iterator[None]:
    """A Unix socket that greets each client and closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with client:
                client.sendall(greeting)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.close()
        thread.join(5)


def read_through(port: int) -> bytes:
    """What a client of a local `-L` port receives before the far end closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        data = b""
        while chunk := client.recv(4096):
            data += chunk
        return data


def test_unix_permits_never_reach_outside_the_permitted_directory(tmp_path: Path) -> None:
    pub, secret = tmp_path / "pub", tmp_path / "secret"
    (pub / "sub").mkdir(parents=True)
    secret.mkdir()
    permits = f'["unix:{pub}/*.sock"]'
    server = Server(tmp_path, permit_open=permits, permit_listen=permits).start()
    try:
        with (
            unix_service(pub / "ok.sock", b"public"),
            unix_service(secret / "svc.sock", b"secret"),
            unix_service(pub / "sub" / "deep.sock", b"deep"),
        ):
            (pub / "link.sock").symlink_to(secret / "svc.sock")  # anyone who may write in pub/
            ports = {name: free_port() for name in ("ok", "dotdot", "deep", "dot", "link")}
            forwards = {
                "ok": f"{pub}/ok.sock",
                "dotdot": f"{pub}/../secret/svc.sock",
                "deep": f"{pub}/sub/deep.sock",
                "dot": f"{pub}/./ok.sock",
                "link": f"{pub}/link.sock",
            }
            argv = server.ssh(*(f"-L{ports[name]}:{path}" for name, path in forwards.items()))
            client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                for port in ports.values():
                    wait_listening(port)
                assert read_through(ports["ok"]) == b"public"
                assert read_through(ports["dotdot"]) == b"", "a '..' path is refused, not followed"
                assert read_through(ports["deep"]) == b"", "a '*' does not cross a '/'"
                assert read_through(ports["dot"]) == b""
                assert read_through(ports["link"]) == b"", "a symbolic link is not followed"
            finally:
                client.terminate()
                client.wait(10)
        planted = secret / "planted.sock"
        remote = server.ssh(f"-R{pub}/../secret/planted.sock:127.0.0.1:9")
        refused = subprocess.run(remote, capture_output=True, text=True, timeout=30, check=False)
        assert refused.returncode == 255
        assert "remote port forwarding failed" in refused.stderr
        assert not planted.exists(), "nothing was created outside the permitted directory"
        log = server.log()
    finally:
        server.stop()
    not_plain = "not a plain absolute path ('..', '.' and empty components are refused)"
    assert f"connect to unix:{pub}/../secret/svc.sock denied: {not_plain}" in log
    assert f"connect to unix:{pub}/./ok.sock denied: {not_plain}" in log
    assert f"connect to unix:{pub}/sub/deep.sock denied: not in permit_open" in log
    assert f"connect to unix:{pub}/link.sock denied: the path goes through a symbolic link" in log
    assert f"listen on unix:{pub}/../secret/planted.sock denied: {not_plain}" in log


async def raw_client(server: Server) -> asyncssh.SSHClientConnection:
    """asyncssh as a client that sends what stock ssh would not."""
    return await asyncssh.connect(
        "127.0.0.1",
        server.port,
        username="alice",
        client_keys=[str(server.key)],
        known_hosts=str(server.known_hosts),
        agent_path=None,
        config=None,
    )


async def test_ports_out_of_range_are_refused_one_request_at_a_time(tmp_path: Path) -> None:
    server = Server(tmp_path).start()
    try:
        async with await raw_client(server) as conn:
            with pytest.raises(asyncssh.ChannelOpenError) as opened:
                await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", 106899)
            assert opened.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            assert opened.value.reason == "connect to 127.0.0.1:106899: port out of range (1-65535)"
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 70000, "127.0.0.1", 9)
            listener = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
            assert 0 < listener.get_port() < 65536, "the connection outlived both refusals"
            listener.close()
        log = server.log()
    finally:
        server.stop()
    assert "connect to 127.0.0.1:106899 denied: port out of range (1-65535)" in log
    assert "listen on 127.0.0.1:70000 denied: port out of range (0-65535)" in log
    assert ":41363" not in log, "never wrapped modulo 65536"


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_names_from_the_network_cannot_forge_log_lines(tmp_path: Path, log_format: str) -> None:
    server = Server(tmp_path, log_format=log_format).start()
    evil = "evil\n2026-01-01 00:00:00 ERROR forged\x1b[31m\u202e"
    try:
        async with await raw_client(server) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_connection(asyncssh.SSHTCPSession, evil, 80)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port(evil, 70000, "127.0.0.1", 9)
        log = server.log()
    finally:
        server.stop()
    lines = log.splitlines()
    assert not any(line.startswith("2026-01-01") for line in lines), "no forged line"
    assert "\x1b" not in log
    assert "\u202e" not in log
    if log_format == "json":
        messages = [json.loads(line)["msg"] for line in lines]  # every line is one JSON object
        assert any(f"connect to {evil}:80 denied: not in permit_open" in message for message in messages)
        # asyncssh lower-cases a listen host name
        assert any(f"listen on {evil.lower()}:70000 denied" in message for message in messages)
    else:
        escaped = "evil\\n2026-01-01 00:00:00 ERROR forged\\x1b[31m\\u202e"
        assert any(f"connect to {escaped}:80 denied: not in permit_open" in line for line in lines), log
        assert any(f"listen on {escaped.lower()}:70000 denied" in line for line in lines), log


async def test_a_flood_of_denied_channels_is_summarised_in_the_log(tmp_path: Path) -> None:
    server = Server(tmp_path).start()
    try:
        async with await raw_client(server) as conn:
            for port in range(1000, 1060):
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.create_connection(asyncssh.SSHTCPSession, "192.0.2.1", port)
        assert server.proc is not None
        summary = server.proc.wait_for("more like it in the last 10 s, not logged)", timeout=20)
        log = server.log()
    finally:
        server.stop()
    assert log.count("denied: not in permit_open") == 11, "ten lines, then one summary"
    assert "connect to 192.0.2.1:1059 denied: not in permit_open (and 50 more like it" in summary


async def test_a_name_the_resolver_refuses_fails_one_channel_only(tmp_path: Path) -> None:
    server = Server(tmp_path, permit_open='["any"]').start()
    sink = Sink().start()
    try:
        async with await raw_client(server) as conn:
            with pytest.raises(asyncssh.ChannelOpenError) as opened:
                await conn.create_connection(asyncssh.SSHTCPSession, "a" * 64 + ".example", 443)
            assert opened.value.code == asyncssh.OPEN_CONNECT_FAILED
            assert opened.value.reason == "Cannot resolve: not a valid host name"
            channel, _ = await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", sink.port)
            channel.close()  # the connection lives on
        status = json.loads(run_portfwd("status", "--json", "-c", str(server.config)).stdout)
        assert status["sessions"] == [], "nothing leaked"
    finally:
        server.stop()
        sink.close()
