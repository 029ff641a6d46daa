"""Relayed TCP sessions do not outlive their peers: keepalive armed on both sides, and idle_timeout.

What the kernel says (`ss -tno`: `timer:(keepalive,...)`) is the proof that keepalive is on, for
the client side and the upstream side of a forward, and for portfwd server's upstream side.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path

import pytest

from portfwd.relay.latekeepalive import PERIOD
from tests.conftest import need_binary
from tests.integration.peers import free_port, open_client, peer, running, wait_until
from tests.integration.processes import wait_listening

pytestmark = pytest.mark.integration


async def timers(port: int) -> list[str]:
    """`ss -tno` lines of established sockets with `port` at either end (run off the loop)."""
    need_binary("ss", "iproute2")
    query = f"( sport = :{port} or dport = :{port} )"
    result = await asyncio.to_thread(
        subprocess.run,
        ["ss", "-Htno", "state", "established", query],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return result.stdout.splitlines()


@pytest.mark.parametrize(("keep", "relay"), [(True, "splice"), (True, "protocol"), (False, "splice")])
async def test_both_sides_of_a_forward_have_keepalive(keep: bool, relay: str) -> None:
    """The client's side has it from the start (inherited from the listener); the upstream side
    once the session outlives a second or two (relay/latekeepalive.py: short sessions skip the
    four system calls)."""
    port = free_port()
    async with peer("echo", ("127.0.0.1", 0)) as upstream:
        assert not isinstance(upstream.address, str)
        target = upstream.address[1]
        rule = {
            "listen": f"127.0.0.1:{port}",
            "connect": f"127.0.0.1:{target}",
            "tcp_keepalive": keep,
            "relay": relay,
        }
        async with running({"forward": [rule]}) as runtime:
            reader, writer = await open_client(("127.0.0.1", port))
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            await wait_until(lambda: len(runtime.state.sessions) == 1, 5, "session open")
            ours_client = [
                line for line in await timers(port) if f"127.0.0.1:{port} " in line.split()[2] + " "
            ]
            ours_upstream: list[str] = []
            deadline = time.monotonic() + 4 * PERIOD  # bounded: armed within two passes
            while True:
                ours_upstream = [
                    line for line in await timers(target) if f"127.0.0.1:{target}" in line.split()[3]
                ]
                armed = any("timer:(keepalive," in line for line in ours_upstream)
                if armed or time.monotonic() > deadline:  # without keepalive: the whole wait
                    break
                await asyncio.sleep(0.05)
            writer.write(b"pong")  # the session still relays after its socket was changed
            assert await reader.readexactly(4) == b"pong"
            writer.close()
    assert len(ours_client) == 1
    assert len(ours_upstream) == 1
    for line in (*ours_client, *ours_upstream):
        assert ("timer:(keepalive," in line) is keep, line


async def test_an_idle_session_is_closed_after_idle_timeout() -> None:
    port = free_port()
    async with peer("echo", ("127.0.0.1", 0)) as upstream:
        assert not isinstance(upstream.address, str)
        rule = {
            "listen": f"127.0.0.1:{port}",
            "connect": f"127.0.0.1:{upstream.address[1]}",
            "idle_timeout": "2s",
        }
        async with running({"forward": [rule]}) as runtime:
            busy_reader, busy = await open_client(("127.0.0.1", port))
            idle_reader, idle = await open_client(("127.0.0.1", port))
            began = time.monotonic()
            async with asyncio.timeout(10):
                closed = asyncio.ensure_future(idle_reader.read())
                while not closed.done():  # the busy one talks every 0.3 s, the idle one never
                    busy.write(b"x")
                    assert await busy_reader.readexactly(1) == b"x"
                    await asyncio.wait({closed}, timeout=0.3)
            assert closed.result() == b"", "the idle client's connection was ended"
            assert 2 <= time.monotonic() - began < 5
            busy.write(b"y")
            assert await busy_reader.readexactly(1) == b"y", "the busy one lives on"
            busy.close()
            idle.close()
            assert [rule.connections_total for rule in runtime.state.rules.values()] == [2]


def test_portfwd_server_upstreams_have_keepalive(tmp_path: Path) -> None:
    from tests.integration.test_server import Server
    from tests.integration.test_status import Sink

    local = free_port()
    sink = Sink().start()
    server = Server(tmp_path).start()
    client = subprocess.Popen(
        server.ssh(f"-L{local}:127.0.0.1:{sink.port}"), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(local)
        with socket.create_connection(("127.0.0.1", local), timeout=10) as held:
            held.sendall(b"held open")
            deadline = time.monotonic() + 10
            towards: list[str] = []
            # The channel opens the upstream, and the server arms keepalive just after its connect
            # returns: `ss` may see the socket in between, so wait (bounded) for the armed state.
            while time.monotonic() < deadline:
                towards = [
                    line
                    for line in asyncio.run(timers(sink.port))
                    if line.split()[3].endswith(f":{sink.port}")
                ]
                if towards and all("timer:(keepalive," in line for line in towards):
                    break
                time.sleep(0.05)
    finally:
        client.terminate()
        client.wait(10)
        server.stop()
        sink.close()
    # the held session's upstream (and, for a moment, the readiness probe's, still closing);
    # without keepalive this fails after the whole wait
    assert towards
    assert all("timer:(keepalive," in line for line in towards), towards
