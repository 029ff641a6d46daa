"""`portfwd server`'s limits before and after authentication, each met by a hostile client.

Idle connections that never log in (max_startups, login_grace_time), stock `ssh` offering key
after wrong key (max_auth_tries, max_auth_failures), and a raw asyncssh client opening channel
after channel (max_channels, max_channels_per_user) — and a legitimate user meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from tests.conftest import need_binary
from tests.integration.processes import READY, Proc, portfwd_argv
from tests.integration.sshd import keygen
from tests.integration.test_server import Server
from tests.integration.test_server_hostile import raw_client
from tests.integration.test_status import Sink

pytestmark = [pytest.mark.integration]


@contextlib.contextmanager
def idle_clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` TCP connections that read the server's banner and then say nothing."""
    clients = []
    try:
        for _ in range(count):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            clients.append(client)
        yield clients
    finally:
        for client in clients:
            client.close()


def closed_at_once(clients: list[socket.socket], seconds: float) -> list[socket.socket]:
    """The clients the server closes within `seconds` (after its banner), watched all together."""
    closed: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        for client in clients:
            client.setblocking(False)
            selector.register(client, selectors.EVENT_READ)
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                client = key.fileobj
                assert isinstance(client, socket.socket)
                try:
                    data = client.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    selector.unregister(client)
                    closed.append(client)
    return closed


async def test_unauthenticated_connections_are_capped_then_reaped(tmp_path: Path) -> None:
    server = Server(tmp_path, settings='max_startups = "4"\nlogin_grace_time = "3s"\n').start()
    try:
        with idle_clients(server.port, 8) as clients:
            dropped = closed_at_once(clients, 1.0)
            assert len(dropped) == 4, "max_startups 4: four wait, the rest are dropped at once"
            kept = [client for client in clients if client not in dropped]
            assert len(closed_at_once(kept, 10.0)) == 4, "login_grace_time reaps the four"
        async with await raw_client(server):
            pass  # and then a real user gets in
        log = server.log()
    finally:
        server.stop()
    assert log.count("dropped before authentication") == 4
    assert log.count("did not log in within login_grace_time; closed") == 4
    assert "logged in with key" in log


async def test_a_legitimate_user_logs_in_during_a_flood_of_idle_connections(tmp_path: Path) -> None:
    server = Server(tmp_path, settings='max_startups = "5:10:200"\nlogin_grace_time = "20s"\n').start()
    try:
        with idle_clients(server.port, 30):
            logged_in = False
            for _ in range(10):  # each try is dropped with p <= 10 % + 90 % * 25/195 < 22 %
                try:
                    async with await raw_client(server):
                        logged_in = True
                        break
                except (asyncssh.Error, OSError):
                    continue
        assert logged_in
    finally:
        server.stop()


def test_auth_tries_per_connection_and_failures_per_address(tmp_path: Path) -> None:
    server = Server(tmp_path, settings="max_auth_tries = 3\nmax_auth_failures = 5\n").start()
    wrong = [tmp_path / f"wrong{index}" for index in range(4)]
    for key in wrong:
        keygen(key)
    try:
        argv = server.ssh()
        keys = [item for key in wrong for item in ("-i", str(key))]
        guesses = [*argv[:1], *keys, *argv[3:]]  # stock ssh offering four wrong keys in turn
        first = subprocess.run(guesses, capture_output=True, text=True, timeout=30, check=False)
        assert first.returncode == 255
        assert "Too many authentication failures" in first.stderr
        second = subprocess.run(guesses, capture_output=True, text=True, timeout=30, check=False)
        assert second.returncode == 255
        right = subprocess.run(
            [*argv[:-1], "alice@127.0.0.1"], capture_output=True, text=True, timeout=30, check=False, input=""
        )
        assert right.returncode == 255, "6 failures from this address within a minute: refused"
        log = server.log()
    finally:
        server.stop()
    assert log.count("failed authentication attempts for alice (max_auth_tries); disconnected") == 2
    assert "refused: too many failed logins from this address" in log


async def test_channels_are_capped_per_connection_and_per_user(tmp_path: Path) -> None:
    sink = Sink().start()
    bob_key = tmp_path / "bob_key"
    (tmp_path / "bob.keys").write_text(keygen(bob_key) + "\n")
    bob = (
        f'[[server.user]]\nname = "bob"\nauthorized_keys = "{tmp_path / "bob.keys"}"\npermit_open = ["any"]\n'
    )
    server = Server(
        tmp_path, settings="max_channels = 3\nmax_channels_per_user = 5\n", extra_user=bob
    ).start()
    try:
        async with await raw_client(server) as first, await raw_client(server) as second:
            held = []
            for _ in range(3):
                held.append(await first.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", sink.port))
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await first.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", sink.port)
            assert refused.value.code == asyncssh.OPEN_RESOURCE_SHORTAGE
            assert refused.value.reason.endswith("too many channels on this connection (max_channels = 3)")
            for _ in range(2):
                held.append(await second.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", sink.port))
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await second.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", sink.port)
            assert refused.value.reason.endswith(
                "too many channels for user alice (max_channels_per_user = 5)"
            )
            async with await asyncssh.connect(
                "127.0.0.1",
                server.port,
                username="bob",
                client_keys=[str(bob_key)],
                known_hosts=str(server.known_hosts),
                agent_path=None,
                config=None,
            ) as other:  # meanwhile another user logs in and is served
                channel, _ = await other.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", sink.port)
                channel.close()
            channel, _ = held.pop(0)
            channel.close()
            await channel.wait_closed()
            for _ in range(50):  # the server counts the close when its side of the channel ends
                try:
                    held.append(await first.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", sink.port))
                    break
                except asyncssh.ChannelOpenError:
                    await asyncio.sleep(0.02)
            else:
                raise AssertionError("a closed channel never made room")
    finally:
        server.stop()
        sink.close()


def test_running_out_of_descriptors_is_logged(tmp_path: Path) -> None:
    """At EMFILE the event loop drops new clients without a word; portfwd says it is near the limit."""
    prlimit = need_binary("prlimit", "util-linux")
    server = Server(tmp_path, settings='max_startups = "200"\n')
    server.proc = Proc([prlimit, "--nofile=64:64", *portfwd_argv("server", "-c", str(server.config))])
    try:
        server.proc.wait_for(READY)
        with idle_clients(server.port, 70):
            line = server.proc.wait_for("open files: ", timeout=15)
        assert "of the limit of 64 in use; new connections fail (EMFILE) when it is reached" in line
    finally:
        server.stop()
