"""SSH tunnel features against stock sshd, in-process: host keys, jump hosts, retries, SOCKS replies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from portfwd import instances
from portfwd.runtime import Runtime
from portfwd.ssh.lean.aead import FastChacha, FastGcm
from portfwd.ssh.lean.packets import tune
from tests.conftest import need_binary
from tests.integration.peers import MiB, free_port, open_client, peer, read_all, running, sha, wait_until
from tests.integration.processes import Proc
from tests.integration.socks_client import socks4, socks5, socks5_request
from tests.integration.sshd import Sshd, descendants
from tests.integration.test_tunnel import tunnel

pytestmark = [pytest.mark.integration, pytest.mark.root]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.kill()


async def echo_through(entry: tuple[str, int], size: int = MiB) -> bool:
    data = os.urandom(size)
    reader, writer = await open_client(entry)
    writer.write(data)
    writer.write_eof()
    got = await read_all(reader)
    writer.close()
    return sha(got) == sha(data)


@contextlib.asynccontextmanager
async def echo_tunnel(sshd: Sshd, **fields: Any) -> AsyncIterator[tuple[Runtime, tuple[str, int]]]:
    async with peer("echo", ("127.0.0.1", 0)) as upstream:
        entry = ("127.0.0.1", free_port())
        assert not isinstance(upstream.address, str)
        local = [f"127.0.0.1:{entry[1]}:127.0.0.1:{upstream.address[1]}"]
        async with tunnel(sshd, local=local, **fields) as runtime:
            yield runtime, entry


# ---------------------------------------------------------------------------- host keys


def hash_known_hosts(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, timeout=30, capture_output=True)


async def test_accept_new_records_the_first_key(sshd: Sshd, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    async with echo_tunnel(sshd, known_hosts=[str(known)], strict_host_key_checking="accept-new") as (
        _,
        entry,
    ):
        assert await echo_through(entry)
    kind, key = sshd.host_public.split()[:2]
    assert known.read_text().split() == [f"[127.0.0.1]:{sshd.port}", kind, key]


async def test_hashed_known_hosts_entry(sshd: Sshd, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts.read_text())
    hash_known_hosts(known)  # before the loop has anything to serve
    assert known.read_text().startswith("|1|"), "ssh-keygen -H hashed the entry"
    async with echo_tunnel(sshd, known_hosts=[str(known)]) as (_, entry):
        assert await echo_through(entry)


async def test_cert_authority_known_hosts(tmp_path: Path) -> None:
    server = Sshd(tmp_path, certificate=True).start()
    try:
        assert server.known_hosts.read_text().startswith("@cert-authority ")
        async with echo_tunnel(server) as (_, entry):
            assert await echo_through(entry)
    finally:
        server.kill()


async def test_changed_key_in_a_config_tunnel_stops_only_that_tunnel(sshd: Sshd, tmp_path: Path) -> None:
    from tests.integration.sshd import keygen

    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {keygen(tmp_path / 'impostor')}\n")
    async with peer("echo", ("127.0.0.1", 0)) as upstream:
        assert not isinstance(upstream.address, str)
        rule_port = free_port()
        data = {
            "forward": [{"listen": f"127.0.0.1:{rule_port}", "connect": f"127.0.0.1:{upstream.address[1]}"}],
            "tunnel": [sshd.tunnel(known_hosts=[str(known)], dynamic=[str(free_port())])],
        }
        async with running(data) as runtime:
            stats = runtime.state.tunnels[0]
            await wait_until(lambda: stats.state == "failed", 10, "tunnel failed")
            assert "has CHANGED" in stats.last_error
            assert f"{known}:1 holds another" in stats.last_error
            assert await echo_through(("127.0.0.1", rule_port)), "the forward rule keeps serving"


# ---------------------------------------------------------------------------- connection


async def test_jump_host(sshd: Sshd) -> None:
    """-J through the same sshd: the second hop is a direct-tcpip channel of the first."""
    async with echo_tunnel(sshd, jump=[f"root@127.0.0.1:{sshd.port}"]) as (_, entry):
        assert await echo_through(entry)


async def test_ssh_config_proxyjump_is_followed_to_the_server(sshd: Sshd, tmp_path: Path) -> None:
    """A [[tunnel]] to an ssh_config alias whose ProxyJump names another alias: the first sshd
    (the bastion) authenticates the tunnel, and the second (the server) is reached through it,
    each host key checked against its own known_hosts entry, as `ssh target` does."""
    (tmp_path / "target").mkdir()
    server = Sshd(tmp_path / "target").start()
    try:
        config = tmp_path / "ssh_config"
        config.write_text(
            f"Host target\n  HostName 127.0.0.1\n  Port {server.port}\n  User root\n  ProxyJump bastion\n"
            f"Host bastion\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
        )
        known = tmp_path / "known_hosts"
        known.write_text(sshd.known_hosts.read_text() + server.known_hosts.read_text())
        marks = [len(item.proc.output()) if item.proc else 0 for item in (sshd, server)]
        fields = {
            "ssh": "target",
            "identity": [str(sshd.user_key), str(server.user_key)],
            "known_hosts": [str(known)],
            "ssh_config": [str(config)],
        }
        async with echo_tunnel(sshd, **fields) as (_, entry):
            assert await echo_through(entry)
        logs = [
            (item.proc.output() if item.proc else "")[mark:]
            for item, mark in zip((sshd, server), marks, strict=True)
        ]
        assert "Accepted publickey for root" in logs[0], "the bastion was logged into"
        assert "Accepted publickey for root" in logs[1], "and the server through it"
    finally:
        server.kill()


async def test_compression_and_a_chosen_cipher(sshd: Sshd) -> None:
    fields = {"compression": True, "ciphers": ["chacha20-poly1305@openssh.com"]}
    async with echo_tunnel(sshd, **fields) as (_, entry):
        assert await echo_through(entry, 4 * MiB)


async def echo_tuned(sshd: Sshd, cipher: str) -> None:
    """1 MiB echoed over a plain asyncssh connection with the lean path on (a cipher portfwd refuses)."""
    async with peer("echo", ("127.0.0.1", 0)) as upstream:
        assert not isinstance(upstream.address, str)
        conn = await asyncssh.connect(
            "127.0.0.1",
            sshd.port,
            username="root",
            client_keys=[str(sshd.user_key)],
            known_hosts=str(sshd.known_hosts),
            encryption_algs=[cipher],
        )
        async with conn:
            tune(conn)
            reader, writer = await conn.open_connection("127.0.0.1", upstream.address[1])
            data = os.urandom(MiB)
            writer.write(data)
            writer.write_eof()
            assert sha(await read_all(reader)) == sha(data)


@pytest.mark.parametrize(
    ("cipher", "ignores"), [("aes128-gcm@openssh.com", False), ("aes128-ctr", False), ("aes128-cbc", True)]
)
async def test_ignore_packets_only_under_cbc(tmp_path: Path, cipher: str, ignores: bool) -> None:
    """sshd logs each SSH_MSG_IGNORE it receives; asyncssh would send one before every packet.

    The client's wrapper goes on once connected, so the few during authentication still come.
    portfwd never offers CBC (sshalgorithms.py): that case runs the lean path on asyncssh directly.
    """
    server = Sshd(tmp_path, ("LogLevel DEBUG3", "Ciphers +aes128-cbc")).start()
    try:
        if cipher.endswith("-cbc"):
            await echo_tuned(server, cipher)
        else:
            async with echo_tunnel(server, ciphers=[cipher]) as (_, entry):
                assert await echo_through(entry, MiB)
        assert server.proc is not None
        log = server.proc.output()
        assert f"cipher: {cipher}" in log, "the cipher asked for was negotiated"
        after_auth = [
            line for line in log.splitlines() if "Received SSH2_MSG_IGNORE" in line and "preauth" not in line
        ]
        assert bool(after_auth) is ignores
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("cipher", "kind"),
    [
        ("aes128-gcm@openssh.com", FastGcm),
        ("aes256-gcm@openssh.com", FastGcm),
        ("chacha20-poly1305@openssh.com", FastChacha),
    ],
)
async def test_stateful_ciphers_across_rekeys(tmp_path: Path, cipher: str, kind: type) -> None:
    """sshd re-keys every 256 KiB; each new key gets the stateful cipher and no byte is lost.

    2 MiB each way: sshd's DEBUG1 lines for each key exchange go to a pipe read only at the end.
    """
    server = Sshd(tmp_path, ("RekeyLimit 256K", "LogLevel DEBUG1")).start()
    try:
        async with echo_tunnel(server, ciphers=[cipher]) as (runtime, entry):
            assert await echo_through(entry, 2 * MiB)
            assert await echo_through(entry, 1024)  # packets after the last key exchange
            conn = runtime.tunnels[0].conn
            assert conn is not None
            assert type(conn._send_encryption) is kind
            assert type(conn._recv_encryption) is kind
        assert server.proc is not None
        log = server.proc.output()
        rekeys = [line for line in log.splitlines() if "SSH2_MSG_NEWKEYS received" in line]
        assert len(rekeys) >= 8, "2 MiB each way at 256 KiB a key: many key exchanges"
    finally:
        server.kill()


async def test_lean_path_hands_our_own_rekeys_to_asyncssh(tmp_path: Path) -> None:
    """asyncssh re-keys after rekey_bytes of its own sending: the lean path counts those bytes."""
    server = Sshd(tmp_path, ("LogLevel DEBUG1",)).start()
    try:
        async with peer("echo", ("127.0.0.1", 0)) as upstream:
            assert not isinstance(upstream.address, str)
            conn = await asyncssh.connect(
                "127.0.0.1",
                server.port,
                username="root",
                client_keys=[str(server.user_key)],
                known_hosts=str(server.known_hosts),
                rekey_bytes=128 * 1024,
                encryption_algs=["chacha20-poly1305@openssh.com"],
            )
            async with conn:
                tune(conn)
                reader, writer = await conn.open_connection("127.0.0.1", upstream.address[1])
                data = os.urandom(MiB)
                writer.write(data)
                writer.write_eof()
                got = await read_all(reader)
                assert sha(got) == sha(data)
        assert server.proc is not None
        rekeys = server.proc.output().count("SSH2_MSG_NEWKEYS received")
        assert rekeys >= 6, "1 MiB sent at 128 KiB a key"
    finally:
        server.kill()


@contextlib.asynccontextmanager
async def choppy_proxy(port: int, seed: int) -> AsyncIterator[int]:
    """A TCP proxy to 127.0.0.1:`port` that writes what it reads in random pieces (1 to 700
    bytes, a loop pass apart), so packets reach the reader split at any offset."""
    chooser = random.Random(seed)
    writers: list[asyncio.StreamWriter] = []
    tasks: set[asyncio.Task[None]] = set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                while data:
                    cut = chooser.randint(1, 700)
                    writer.write(data[:cut])
                    data = data[cut:]
                    await writer.drain()
                    await asyncio.sleep(0)
            writer.write_eof()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        writers.extend((writer, up_writer))
        for task in (pump(reader, up_writer), pump(up_reader, writer)):
            tasks.add(asyncio.create_task(task))

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.close()
        await listener.wait_closed()


@pytest.mark.parametrize("cipher", ["chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com"])
async def test_lean_receive_takes_packets_split_anywhere(sshd: Sshd, cipher: str) -> None:
    """Packets cut at every offset (mid-length, mid-tag, many in one read) cross intact."""
    async with peer("echo", ("127.0.0.1", 0)) as upstream, choppy_proxy(sshd.port, seed=7) as port:
        assert not isinstance(upstream.address, str)
        conn = await asyncssh.connect(
            "127.0.0.1",
            port,
            username="root",
            client_keys=[str(sshd.user_key)],
            known_hosts=([asyncssh.read_public_key(f"{sshd.host_key}.pub")], [], []),  # the proxy's port
            encryption_algs=[cipher],
        )
        async with conn:
            tune(conn)
            assert conn._recv_data.__self__.on, "the lean receive path is installed"
            reader, writer = await conn.open_connection("127.0.0.1", upstream.address[1])
            data = os.urandom(256 * 1024)
            at = 0
            for size in (1, 5, 37, 300, 1500, 4000, 20000, 40000) * 20:  # packets of many sizes
                writer.write(data[at : at + size])
                at += size
                if at >= len(data):
                    break
            writer.write(data[at:])
            writer.write_eof()
            got = await read_all(reader)
            assert sha(got) == sha(data)
            assert type(conn._recv_encryption) in (FastChacha, FastGcm)


async def test_packet_logging_still_works_when_asked(sshd: Sshd, caplog: pytest.LogCaptureFixture) -> None:
    """tune() skips rendering packet log lines only while nobody could see them."""
    caplog.set_level(logging.DEBUG, logger="asyncssh")
    asyncssh.set_debug_level(3)
    try:
        async with echo_tunnel(sshd) as (_, entry):
            assert await echo_through(entry, 1024)
    finally:
        asyncssh.set_debug_level(1)
    messages = [record.getMessage() for record in caplog.records]
    assert any("Sent MSG_CHANNEL_DATA" in text for text in messages)
    assert any("Received MSG_CHANNEL_DATA" in text for text in messages)
    assert any("Sent MSG_CHANNEL_OPEN " in text for text in messages)


async def test_refused_remote_forward_is_reported_and_retried(sshd: Sshd) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    async with peer("echo", ("127.0.0.1", 0)) as upstream:
        assert not isinstance(upstream.address, str)
        fields = {
            "remote": [f"127.0.0.1:{port}:127.0.0.1:{upstream.address[1]}"],
            "reconnect_min": "200ms",
            "reconnect_max": "500ms",
        }
        async with running({"tunnel": [sshd.tunnel(**fields)]}) as runtime:
            forward = runtime.state.tunnels[0].forwards[0]
            await wait_until(lambda: forward.state == "refused", 10, "forward refused")
            assert forward.error
            busy.close()
            await wait_until(lambda: forward.state == "listening", 10, "forward retried")
            assert await echo_through(("127.0.0.1", port))
            rows = runtime.state.snapshot()["tunnels"]
            assert rows[0]["forwards"][0]["connections_total"] == 1
            assert rows[0]["forwards"][0]["bytes_up"] == MiB


async def test_local_listener_waits_for_the_link(sshd: Sshd, tmp_path: Path) -> None:
    """A client that arrives before the first connection is served once the link is up."""
    async with peer("echo", ("127.0.0.1", 0)) as upstream:
        assert not isinstance(upstream.address, str)
        entry = ("127.0.0.1", free_port())
        fields = {
            "local": [f"127.0.0.1:{entry[1]}:127.0.0.1:{upstream.address[1]}"],
            "connect_timeout": "10s",
        }
        async with running({"tunnel": [sshd.tunnel(**fields)]}) as runtime:
            # start() returns with the listener bound and the link still connecting
            assert runtime.state.tunnels[0].state == "connecting"
            assert await echo_through(entry)


# ---------------------------------------------------------------------------- SOCKS


class _HttpPeer:
    """A tiny HTTP/1.0 server: GET returns `body`; POST answers the sha256 of what was sent."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> _HttpPeer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        if head.startswith("POST"):
            length = int(
                next(
                    line.split(":")[1]
                    for line in head.split("\r\n")
                    if line.lower().startswith("content-length")
                )
            )
            answer = sha(await reader.readexactly(length)).encode()
        else:
            answer = self.body
        writer.write(f"HTTP/1.0 200 OK\r\nContent-Length: {len(answer)}\r\n\r\n".encode() + answer)
        await writer.drain()
        writer.close()


async def curl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "30",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.parametrize("proxy", ["--socks5-hostname", "--socks4a"])
async def test_curl_through_dynamic_forward(sshd: Sshd, tmp_path: Path, proxy: str) -> None:
    need_binary("curl", "curl")
    body, upload = os.urandom(8 * MiB), os.urandom(8 * MiB)
    (tmp_path / "upload").write_bytes(upload)
    socks_port = free_port()
    async with _HttpPeer(body) as http, tunnel(sshd, dynamic=[f"127.0.0.1:{socks_port}"]):
        url = f"http://localhost:{http.port}/"
        await curl(proxy, f"127.0.0.1:{socks_port}", "-o", str(tmp_path / "got"), url)
        posted = await curl(proxy, f"127.0.0.1:{socks_port}", "--data-binary", f"@{tmp_path / 'upload'}", url)
    assert sha((tmp_path / "got").read_bytes()) == sha(body)
    assert posted == sha(upload)


async def raw_exchange(entry: tuple[str, int], data: bytes) -> bytes:
    """Send raw bytes to a SOCKS port; return everything it answers before closing."""
    reader, writer = await open_client(entry)
    writer.write(data)
    async with asyncio.timeout(10):
        answer = await read_all(reader)
    writer.close()
    return answer


async def test_socks_replies_and_garbage(sshd: Sshd) -> None:
    socks_port = free_port()
    entry = ("127.0.0.1", socks_port)
    async with peer("echo", ("127.0.0.1", 0)) as upstream, tunnel(sshd, dynamic=[str(socks_port)]) as runtime:
        assert not isinstance(upstream.address, str)
        closed = free_port()  # nothing listens there
        _, writer, code = await socks5(entry, "127.0.0.1", closed)
        writer.close()
        assert code == 5, "connection refused"
        _, writer, code = await socks5(entry, "no-such-host.invalid", 80)
        writer.close()
        assert code == 4, "host unreachable"
        _, writer, code = await socks4(entry, "127.0.0.1", closed)
        writer.close()
        assert code == 91, "SOCKS4 has one failure code"
        # BIND, UDP ASSOCIATE, an unknown address type, and bytes that are not SOCKS at all
        assert await raw_exchange(entry, b"\x05\x01\x00" + socks5_request("127.0.0.1", 80, command=2)) == (
            b"\x05\x00" + b"\x05\x07\x00\x01" + bytes(6)
        )
        assert await raw_exchange(entry, b"\x05\x01\x00" + socks5_request("127.0.0.1", 80, command=3)) == (
            b"\x05\x00" + b"\x05\x07\x00\x01" + bytes(6)
        )
        assert await raw_exchange(
            entry, b"\x05\x01\x00\x05\x01\x00\x09"
        ) == b"\x05\x00" + b"\x05\x08\x00\x01" + bytes(6)
        assert await raw_exchange(entry, b"\x05\x01\x02") == b"\x05\xff", "no acceptable method"
        assert await raw_exchange(entry, b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00") == b"\x00\x5b" + bytes(6)
        assert await raw_exchange(entry, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        assert await raw_exchange(entry, os.urandom(2000)) in (b"", b"\x00\x5b" + bytes(6), b"\x05\xff")
        # ...and the next well-formed client is served
        reader, writer, code = await socks5(entry, "127.0.0.1", upstream.address[1])
        assert code == 0
        writer.write(b"still serving")
        writer.write_eof()
        assert await read_all(reader) == b"still serving"
        writer.close()
        errors = runtime.state.tunnels[0].forwards[0].stats.errors
        assert errors["socks"] >= 6
        assert errors["refused"] >= 3


async def test_socks_not_allowed_by_the_server(tmp_path: Path) -> None:
    server = Sshd(tmp_path, ("PermitOpen 127.0.0.1:1",)).start()
    try:
        socks_port = free_port()
        async with tunnel(server, dynamic=[str(socks_port)]):
            _, writer, code = await socks5(("127.0.0.1", socks_port), "127.0.0.1", 80)
            writer.close()
        assert code == 2, "connection not allowed by ruleset"
    finally:
        server.kill()


async def test_socks5_password(sshd: Sshd) -> None:
    socks_port = free_port()
    entry = ("127.0.0.1", socks_port)
    fields = {"dynamic": [str(socks_port)], "socks_user": "alice", "socks_password": "s3cret"}
    async with peer("echo", ("127.0.0.1", 0)) as upstream, tunnel(sshd, **fields):
        assert not isinstance(upstream.address, str)
        _, writer, code = await socks5(entry, "127.0.0.1", upstream.address[1])
        writer.close()
        assert code == -1, "no-auth offer refused"
        _, writer, code = await socks5(entry, "127.0.0.1", upstream.address[1], ("alice", "wrong"))
        writer.close()
        assert code == -2, "wrong password refused"
        _, writer, code = await socks4(entry, "127.0.0.1", upstream.address[1])
        writer.close()
        assert code == 91, "SOCKS4 cannot authenticate"
        reader, writer, code = await socks5(entry, "127.0.0.1", upstream.address[1], ("alice", "s3cret"))
        assert code == 0
        writer.write(b"authenticated")
        writer.write_eof()
        assert await read_all(reader) == b"authenticated"
        writer.close()


async def test_socks5_password_guessing_is_slowed_then_locked_out(sshd: Sshd) -> None:
    socks_port = free_port()
    entry = ("127.0.0.1", socks_port)
    fields = {"dynamic": [str(socks_port)], "socks_user": "alice", "socks_password": "s3cret"}
    async with peer("echo", ("127.0.0.1", 0)) as upstream, tunnel(sshd, **fields):
        assert not isinstance(upstream.address, str)
        began = time.monotonic()
        guesses = await asyncio.gather(  # eight at once: as many handshakes as one source may have
            *(socks5(entry, "127.0.0.1", upstream.address[1], ("alice", f"guess{n}")) for n in range(8))
        )
        for n in (8, 9):
            guesses.append(await socks5(entry, "127.0.0.1", upstream.address[1], ("alice", f"guess{n}")))
        for _, writer, code in guesses:
            writer.close()
            assert code == -2
        assert time.monotonic() - began >= 3.0, "each wrong password is answered a second later"
        reader, writer = await open_client(entry)
        writer.write(bytes((5, 1, 2)))
        async with asyncio.timeout(5):
            assert await reader.read() == b"", "locked out: closed before any answer, right password or not"
        writer.close()


async def test_reverse_socks_handshake_times_out(sshd: Sshd) -> None:
    port = free_port()
    async with running({"tunnel": [sshd.tunnel(remote=[f"127.0.0.1:{port}"])]}) as runtime:
        forward = runtime.state.tunnels[0].forwards[0]
        await wait_until(lambda: forward.state == "listening", 10, "-R listening")
        reader, writer = await open_client(("127.0.0.1", port))
        began = time.monotonic()
        async with asyncio.timeout(20):
            assert await reader.read() == b"", "closed without a SOCKS request"
        assert 9 <= time.monotonic() - began < 15
        writer.close()
        assert forward.stats.errors.get("socks") == 1


# ---------------------------------------------------------------------------- staying up


async def test_keepalive_finds_a_silent_server(tmp_path: Path) -> None:
    """The server's session process is frozen (SIGSTOP): no FIN, no RST, only silence."""
    server = Sshd(tmp_path).start()
    frozen: list[int] = []
    try:
        fields = {
            "keepalive_interval": "500ms",
            "keepalive_count": 2,
            "reconnect_min": "5s",
            "reconnect_max": "5s",
        }
        async with echo_tunnel(server, **fields) as (runtime, entry):
            assert await echo_through(entry)
            assert server.proc is not None
            frozen = descendants(server.proc.pid)
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            stats = runtime.state.tunnels[0]
            began = time.monotonic()
            await wait_until(lambda: stats.state != "up", 10, "dead peer noticed")
            assert time.monotonic() - began < 5, "2 x 0.5 s keepalive, not TCP's minutes"
            assert "keepalive" in stats.last_error.lower() or "timeout" in stats.last_error.lower(), (
                stats.last_error
            )
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
        server.kill()


async def test_a_client_waiting_for_a_dead_link_is_closed_after_connect_timeout(tmp_path: Path) -> None:
    entry = ("127.0.0.1", free_port())
    fields = {
        "ssh": f"root@127.0.0.1:{free_port()}",  # nothing listens: the link never comes up
        "local": [f"127.0.0.1:{entry[1]}:127.0.0.1:9"],
        "connect_timeout": "1s",
        "known_hosts": [str(tmp_path / "none")],
    }
    async with running({"tunnel": [fields]}) as runtime:
        reader, writer = await open_client(entry)  # accepted: the listener is bound
        began = time.monotonic()
        async with asyncio.timeout(10):
            assert await read_all(reader) == b""
        writer.close()
        assert 0.9 < time.monotonic() - began < 5
        assert runtime.state.tunnels[0].forwards[0].stats.errors == {"down": 1}


# ---------------------------------------------------------------------------- where keys and hosts come from


async def test_ssh_config_host_alias(sshd: Sshd, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host lab\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
        f"  IdentityFile {sshd.user_key}\n  IdentitiesOnly yes\n"
    )
    async with peer("echo", ("127.0.0.1", 0)) as upstream:
        assert not isinstance(upstream.address, str)
        entry = ("127.0.0.1", free_port())
        fields = {
            "ssh": "lab",
            "ssh_config": [str(config)],
            "agent": False,
            "known_hosts": [str(sshd.known_hosts)],
            "local": [f"127.0.0.1:{entry[1]}:127.0.0.1:{upstream.address[1]}"],
        }
        async with running({"tunnel": [fields]}) as runtime:
            await wait_until(lambda: runtime.state.tunnels[0].state == "up", 15, "up through the alias")
            assert await echo_through(entry)


@pytest.fixture
def agent(sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real ssh-agent holding the user key, as SSH_AUTH_SOCK."""
    need_binary("ssh-agent", "openssh-client")
    sock = tmp_path / "agent.sock"
    proc = Proc(["ssh-agent", "-D", "-a", str(sock)])
    try:
        proc.wait_for("SSH_AUTH_SOCK")
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(
            ["ssh-add", "-q", str(sshd.user_key)], env=env, check=True, timeout=30, capture_output=True
        )
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield sock
    finally:
        proc.stop()
        proc.close()


async def test_key_from_ssh_agent(sshd: Sshd, agent: Path) -> None:
    async with echo_tunnel(sshd, identity=[], agent=True) as (_, entry):
        assert await echo_through(entry)


async def test_reload_swaps_tunnels(sshd: Sshd, tmp_path: Path) -> None:
    from portfwd import planner

    first, second = free_port(), free_port()
    path = tmp_path / "portfwd.toml"

    def write(port: int) -> None:
        table = sshd.tunnel(dynamic=[f"127.0.0.1:{port}"])
        lines = ["[control]", "enabled = false", "[[tunnel]]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
        path.write_text("\n".join(lines) + "\n")

    write(first)
    runtime = Runtime(
        planner.load(path), identity=instances.identify("run", config=path), loader=lambda: planner.load(path)
    )
    await runtime.start()
    try:
        await wait_until(lambda: runtime.state.tunnels[0].state == "up", 15, "first tunnel up")
        write(second)
        answer = await runtime.reload()
        assert answer["ok"], answer
        assert [tunnel.forwards[0].listen for tunnel in runtime.state.tunnels] == [f"127.0.0.1:{second}"]
        with pytest.raises(ConnectionRefusedError):
            await open_client(("127.0.0.1", first))
        await wait_until(lambda: runtime.state.tunnels[0].state == "up", 15, "second tunnel up")
    finally:
        await runtime.stop()


async def test_a_failed_tunnel_is_tried_afresh_by_a_reload(sshd: Sshd, tmp_path: Path) -> None:
    """ "Stays down until reload": a reload of the same config, once known_hosts is mended,
    starts the failed tunnel again, and it comes up."""
    from portfwd import planner
    from tests.integration.sshd import keygen

    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {keygen(tmp_path / 'impostor')}\n")
    path = tmp_path / "portfwd.toml"
    table = sshd.tunnel(known_hosts=[str(known)], dynamic=[f"127.0.0.1:{free_port()}"])
    lines = ["[control]", "enabled = false", "[[tunnel]]"]
    path.write_text(
        "\n".join([*lines, *(f"{key} = {json.dumps(value)}" for key, value in table.items())]) + "\n"
    )
    runtime = Runtime(
        planner.load(path), identity=instances.identify("run", config=path), loader=lambda: planner.load(path)
    )
    await runtime.start()
    try:
        await wait_until(lambda: runtime.state.tunnels[0].state == "failed", 15, "tunnel failed")
        known.write_text(sshd.known_hosts.read_text())
        answer = await runtime.reload()
        assert answer["ok"], answer
        await wait_until(lambda: runtime.state.tunnels[0].state == "up", 15, "tried afresh, and up")
        assert len(runtime.state.tunnels) == 1
    finally:
        await runtime.stop()
