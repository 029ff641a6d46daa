"""UDP forwarding: datagram sizes, flows kept apart, idle expiry, flow cap, ACL."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from portfwd.relay.mmsg import Batch
from tests.integration.peers import free_port, running, wait_until

pytestmark = pytest.mark.integration


class UdpEcho(asyncio.DatagramProtocol):
    """Echoes every datagram and remembers which source addresses it saw."""

    def __init__(self) -> None:
        self.sources: list[Any] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.sources.append(addr)
        assert self.transport is not None
        self.transport.sendto(data, addr)


@contextlib.asynccontextmanager
async def udp_echo(host: str = "127.0.0.1") -> AsyncIterator[tuple[UdpEcho, int]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(UdpEcho, local_addr=(host, 0))
    try:
        yield protocol, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


class UdpClient:
    """A plain non-blocking UDP socket driven by the loop, for exact datagram checks."""

    def __init__(self, target: tuple[str, int], family: int = socket.AF_INET) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(target)

    async def ask(self, data: bytes, wait: float = 5.0) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, data)
        async with asyncio.timeout(wait):
            return await loop.sock_recv(self.sock, 65536)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["batched", "per-datagram"])
def relay(request: pytest.FixtureRequest) -> str:
    """Every test runs on both UDP paths: recvmmsg/sendmmsg batches (Linux) and one call per datagram."""
    if request.param == "batched" and Batch.create() is None:
        pytest.skip("recvmmsg/sendmmsg are not available here")
    return "auto" if request.param == "batched" else "protocol"


def rule(listen_port: int, target_port: int, relay: str, **extra: Any) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{listen_port}",
        "connect": f"127.0.0.1:{target_port}",
        "protocol": "udp",
        "relay": relay,
        **extra,
    }


def uses_batches(runtime: Any) -> bool:
    """Whether the running UDP forwarders move datagrams in batches."""
    forwarders = runtime.udp_forwarders
    assert forwarders
    return all(udp.batch is not None for udp in forwarders)


@pytest.mark.parametrize("size", [1, 1400, 65507])
async def test_datagram_sizes_cross_intact(size: int, relay: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    async with udp_echo() as (_, target), running({"forward": [rule(port, target, relay)]}):
        client = UdpClient(("127.0.0.1", port))
        data = os.urandom(size)
        assert await client.ask(data) == data
        client.close()


async def test_fifty_flows_keep_their_replies_apart(relay: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    async with udp_echo() as (echo, target), running({"forward": [rule(port, target, relay)]}) as runtime:
        clients = [UdpClient(("127.0.0.1", port)) for _ in range(50)]

        async def talk(index: int, client: UdpClient) -> bool:
            ok = True
            for round_ in range(5):
                data = f"client {index} round {round_} ".encode() + os.urandom(32)
                ok = ok and await client.ask(data) == data
            return ok

        results = await asyncio.gather(*(talk(i, c) for i, c in enumerate(clients)))
        assert all(results)
        assert len(set(echo.sources)) == 50, "one upstream socket per client flow"
        assert runtime.state.rules["127.0.0.1:" + str(port) + "/udp"].udp_flows_active == 50
        for client in clients:
            client.close()


async def test_idle_flows_expire_and_a_new_flow_follows(relay: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    label = f"127.0.0.1:{port}/udp"
    async with (
        udp_echo() as (echo, target),
        running({"forward": [rule(port, target, relay, udp_idle_timeout="300ms")]}) as runtime,
    ):
        client = UdpClient(("127.0.0.1", port))
        assert await client.ask(b"one") == b"one"
        stats = runtime.state.rules[label]
        assert stats.udp_flows_active == 1
        await wait_until(lambda: stats.udp_flows_active == 0, 5, "the idle flow expires")
        assert await client.ask(b"two") == b"two"
        assert echo.sources[0] != echo.sources[1], "after expiry the client gets a fresh upstream flow"
        assert stats.connections_total == 2
        client.close()


async def test_flow_cap_drops_new_clients_only(relay: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    async with (
        udp_echo() as (_, target),
        running({"forward": [rule(port, target, relay, udp_max_flows=2)]}) as runtime,
    ):
        first, second, third = (UdpClient(("127.0.0.1", port)) for _ in range(3))
        assert await first.ask(b"a") == b"a"
        assert await second.ask(b"b") == b"b"
        with pytest.raises(TimeoutError):
            await third.ask(b"c", wait=0.5)
        assert await first.ask(b"still") == b"still"
        assert runtime.state.rules[f"127.0.0.1:{port}/udp"].errors["udp_flow_limit"] >= 1
        for client in (first, second, third):
            client.close()


async def test_denied_source_never_reaches_the_target(relay: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    async with (
        udp_echo() as (echo, target),
        running({"forward": [rule(port, target, relay, allow=["10.0.0.0/8"])]}) as runtime,
    ):
        client = UdpClient(("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            await client.ask(b"let me in", wait=0.5)
        assert echo.sources == []
        assert runtime.state.rules[f"127.0.0.1:{port}/udp"].denied_total == 1
        client.close()


async def test_ipv6_udp(relay: str) -> None:
    port = free_port(socket.SOCK_DGRAM, host="::1")
    async with (
        udp_echo("::1") as (_, target),
        running(
            {
                "forward": [
                    {
                        "listen": f"[::1]:{port}",
                        "connect": f"[::1]:{target}",
                        "protocol": "udp",
                        "relay": relay,
                    }
                ]
            }
        ) as runtime,
    ):
        assert uses_batches(runtime) == (relay == "auto")
        client = UdpClient(("::1", port), socket.AF_INET6)
        assert await client.ask(b"v6") == b"v6"
        client.close()


async def test_tcp_and_udp_on_one_rule(relay: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    async with (
        udp_echo() as (_, target),
        running({"forward": [rule(port, target, relay, protocol="tcp+udp")]}) as runtime,
    ):
        client = UdpClient(("127.0.0.1", port))
        assert await client.ask(b"both") == b"both"
        client.close()
        assert [listener.protocol for listener in runtime.state.listeners] == ["tcp+udp"]


async def test_a_burst_crosses_whole_and_in_order(relay: str) -> None:
    """Datagrams queued before the forwarder reads arrive as one batch each way; none is lost or merged."""
    port = free_port(socket.SOCK_DGRAM)
    sizes = [1, 65507, 1400, 65507, 7, *([512] * 40), 3]
    async with udp_echo() as (echo, target), running({"forward": [rule(port, target, relay)]}) as runtime:
        assert uses_batches(runtime) == (relay == "auto")
        client = UdpClient(("127.0.0.1", port))
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        assert await client.ask(b"warm up") == b"warm up"  # the flow's upstream socket exists now
        sent = [os.urandom(size) for size in sizes]
        for datagram in sent:  # no await between: the forwarder finds them all queued
            client.sock.send(datagram)
        loop = asyncio.get_running_loop()
        received = []
        async with asyncio.timeout(5):
            while len(received) < len(sent):
                received.append(await loop.sock_recv(client.sock, 65536))
        assert [hashlib.sha256(d).hexdigest() for d in received] == [
            hashlib.sha256(d).hexdigest() for d in sent
        ]
        stats = runtime.state.rules[f"127.0.0.1:{port}/udp"]
        assert stats.errors == {}
        assert len(set(echo.sources)) == 1
        client.close()


async def test_clients_interleaved_in_one_batch_keep_their_replies(relay: str) -> None:
    """A batch holding datagrams of several clients, alternating, sends each client only its own."""
    port = free_port(socket.SOCK_DGRAM)
    async with udp_echo() as (echo, target), running({"forward": [rule(port, target, relay)]}):
        clients = [UdpClient(("127.0.0.1", port)) for _ in range(3)]
        for index, client in enumerate(clients):
            assert await client.ask(f"hello {index}".encode()) == f"hello {index}".encode()
        for round_ in range(10):  # queued before the forwarder reads: a, b, c, a, b, c, ...
            for index, client in enumerate(clients):
                client.sock.send(f"{index}:{round_}".encode())
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            for index, client in enumerate(clients):
                got = [await loop.sock_recv(client.sock, 100) for _ in range(10)]
                assert got == [f"{index}:{round_}".encode() for round_ in range(10)]
        assert len(set(echo.sources)) == 3
        for client in clients:
            client.close()
