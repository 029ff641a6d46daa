"""Connection limits on a [[forward]]: the N+1st is closed at once, per source, and by rate.

portfwd runs as users run it; the target is a sink that holds each connection open until the
client half-closes, so "at once" means what it says. Clients come from 127.0.0.2-5 so that
per-source limits see different sources.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.peers import free_port
from tests.integration.processes import READY, portfwd_argv, run_portfwd, started
from tests.integration.test_status import Sink

pytestmark = pytest.mark.integration


def _connect(port: int, source: str) -> socket.socket:
    client = socket.socket()
    client.bind((source, 0))
    client.settimeout(10)
    client.connect(("127.0.0.1", port))
    return client


def _served(client: socket.socket, sent: bytes = b"") -> bool:
    """Send a little more after `sent`, half-close, and see whether the sink's sha256 of it all
    comes back (True) or the connection was closed on us (False)."""
    data = os.urandom(1000)
    try:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(100):
            answer += chunk
    except (ConnectionResetError, BrokenPipeError):
        return False
    return answer == hashlib.sha256(sent + data).hexdigest().encode()


def _refused(client: socket.socket) -> bool:
    """Closed by portfwd without anything sent: an end of stream (or a reset) at once."""
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


@contextlib.contextmanager
def _rule(tmp_path: Path, sink: Sink, settings: str) -> Iterator[tuple[int, Path]]:
    port, control = free_port(), tmp_path / "ctl.sock"
    config = tmp_path / "limits.toml"
    config.write_text(
        f'[control]\nsocket = "{control}"\n'
        f'[[forward]]\nname = "lim"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:{sink.port}"\n{settings}'
    )
    with started(portfwd_argv("run", "-c", str(config)), ready=READY):
        yield port, control


def _errors(control: Path) -> dict[str, int]:
    snapshot = json.loads(run_portfwd("status", "--json", "--control", str(control)).stdout)
    return snapshot["rules"][0]["errors"]  # type: ignore[no-any-return]


def test_max_connections_refuses_the_next_then_has_room_again(tmp_path: Path) -> None:
    sink = Sink().start()
    try:
        with _rule(tmp_path, sink, "max_connections = 2\n") as (port, control):
            first, second = _connect(port, "127.0.0.2"), _connect(port, "127.0.0.3")
            first.sendall(b"held")  # both reach the sink, which waits for the rest
            second.sendall(b"held")
            with _connect(port, "127.0.0.4") as third:
                assert _refused(third), "the third at once is closed before any upstream connect"
            assert _served(first, b"held")  # the two admitted are served whole
            first.close()
            with _connect(port, "127.0.0.4") as again:
                assert _served(again), "a finished session made room"
            assert _served(second, b"held")
            second.close()
            errors = _errors(control)
    finally:
        sink.close()
    assert errors == {"max_connections": 1}


def test_per_source_and_rate_limits_count_each_client_address_apart(tmp_path: Path) -> None:
    sink = Sink().start()
    try:
        settings = 'max_connections_per_source = 1\nrate = "3/10s"\n'
        with _rule(tmp_path, sink, settings) as (port, control):
            held = _connect(port, "127.0.0.2")
            held.sendall(b"held")
            with _connect(port, "127.0.0.2") as twin:
                assert _refused(twin), "a second at once from the same address"
            with _connect(port, "127.0.0.3") as other:
                assert _served(other), "another address is not affected"
            assert _served(held, b"held")
            held.close()
            # rate: a burst of 3 from one address, then refused until the bucket refills
            outcomes = []
            for _ in range(5):
                with _connect(port, "127.0.0.5") as client:
                    outcomes.append(_served(client))
            errors = _errors(control)
    finally:
        sink.close()
    assert outcomes == [True, True, True, False, False]
    assert errors == {"max_connections_per_source": 1, "rate": 2}


async def test_udp_flows_are_limited_like_connections() -> None:
    """UDP: a flow is a connection to the limits; a refused one's datagrams are dropped and
    counted, and the flow limit has room again once a flow goes idle."""
    import asyncio

    from tests.integration.peers import running, wait_until

    loop = asyncio.get_running_loop()
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.setblocking(False)

    def answer() -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                data, peer = echo.recvfrom(100)
                echo.sendto(data, peer)

    loop.add_reader(echo.fileno(), answer)
    port = free_port(socket.SOCK_DGRAM)
    rule = {
        "listen": f"127.0.0.1:{port}",
        "connect": f"127.0.0.1:{echo.getsockname()[1]}",
        "protocol": "udp",
        "max_connections": 2,
        "rate": "2/m",
        "udp_idle_timeout": "300ms",
    }

    async def ask(client: socket.socket) -> bytes | None:
        await loop.sock_sendall(client, b"ping")
        try:
            async with asyncio.timeout(0.3):
                return await loop.sock_recv(client, 100)
        except TimeoutError:
            return None

    def client(source: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        return sock

    try:
        async with running({"forward": [rule]}) as runtime:
            first, second, third = client("127.0.0.2"), client("127.0.0.3"), client("127.0.0.4")
            assert await ask(first) == b"ping"
            assert await ask(second) == b"ping"
            assert await ask(third) is None  # a third flow at once: over max_connections
            stats = runtime.state.rules[rule_name(rule)]
            assert stats.errors["max_connections"] >= 1
            await wait_until(lambda: stats.udp_flows_active == 0, 3, "the flows go idle")
            assert await ask(third) == b"ping"  # room again
            await wait_until(lambda: stats.udp_flows_active == 0, 3, "idle again")
            again = [client("127.0.0.2") for _ in range(2)]  # 127.0.0.2's second and third flows
            assert await ask(again[0]) == b"ping"
            assert await ask(again[1]) is None  # over 2 a minute from one address
            assert stats.errors["rate"] >= 1
            for sock in (first, second, third, *again):
                sock.close()
    finally:
        loop.remove_reader(echo.fileno())
        echo.close()


def rule_name(rule: dict[str, object]) -> str:
    return f"{rule['listen']}/udp"


async def test_udp_per_source_limit_frees_its_count_on_a_balanced_rule() -> None:
    """A flow's end gives its address's count back, on a rule with several backends too (the
    balancer's own use of the address must not replace the one the limits counted)."""
    import asyncio

    from tests.integration.peers import running, wait_until

    loop = asyncio.get_running_loop()
    echoes = []
    for _ in range(2):
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind(("127.0.0.1", 0))
        echo.setblocking(False)

        def answer(sock: socket.socket = echo) -> None:
            with contextlib.suppress(BlockingIOError):
                while True:
                    data, peer = sock.recvfrom(100)
                    sock.sendto(data, peer)

        loop.add_reader(echo.fileno(), answer)
        echoes.append(echo)
    port = free_port(socket.SOCK_DGRAM)
    rule = {
        "listen": f"127.0.0.1:{port}",
        "connect": [f"127.0.0.1:{echo.getsockname()[1]}" for echo in echoes],
        "protocol": "udp",
        "max_connections_per_source": 1,
        "udp_idle_timeout": "200ms",
    }
    try:
        async with running({"forward": [rule]}) as runtime:
            stats = runtime.state.rules[rule_name(rule)]
            for round_ in range(3):  # one flow at a time from one address, three times over
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("127.0.0.2", 0))
                sock.setblocking(False)
                sock.connect(("127.0.0.1", port))
                await loop.sock_sendall(sock, b"ping")
                async with asyncio.timeout(3):
                    assert await loop.sock_recv(sock, 100) == b"ping", round_
                sock.close()
                await wait_until(lambda: stats.udp_flows_active == 0, 3, "the flow goes idle")
            assert "max_connections_per_source" not in stats.errors
    finally:
        for echo in echoes:
            loop.remove_reader(echo.fileno())
            echo.close()
