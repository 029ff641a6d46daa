"""Several backends on one [[forward]]: balancing, failover, active and passive health, status.

Backends are real TCP (and UDP) servers on loopback that answer each client with their own
port number, so every answer says which backend served it. Health timings are short (0.1-0.2 s
checks) so that down and up transitions happen within a second; the waits are bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from portfwd.logevents import record_event
from portfwd.runtime import Runtime
from tests.integration.peers import free_port, running, wait_until
from tests.integration.test_rules import ask

pytestmark = pytest.mark.integration


class Backends:
    """Identity servers that can be stopped and started again on their ports."""

    def __init__(self, count: int) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.servers: dict[int, asyncio.AbstractServer] = {}
        self.held: dict[int, list[asyncio.StreamWriter]] = {port: [] for port in self.ports}
        self.hold = False  # keep each client's connection open (least-connections)

    def handler(self, port: int):  # type: ignore[no-untyped-def]
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(str(port).encode())
            await writer.drain()
            if self.hold:
                self.held[port].append(writer)
                await reader.read()  # until the client goes
            writer.close()

        return handle

    async def start(self, port: int) -> None:
        self.servers[port] = await asyncio.start_server(
            self.handler(port), "127.0.0.1", port, reuse_address=True
        )

    async def stop(self, port: int) -> None:
        server = self.servers.pop(port)
        server.close()
        for writer in self.held[port]:
            writer.close()
        await server.wait_closed()

    @contextlib.asynccontextmanager
    async def up(self) -> AsyncIterator[Backends]:
        for port in self.ports:
            await self.start(port)
        try:
            yield self
        finally:
            for port in list(self.servers):
                await self.stop(port)

    def targets(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]


def _rule(port: int, **settings: Any) -> dict[str, Any]:
    return {"forward": [{"name": "pool", "listen": f"127.0.0.1:{port}", **settings}]}


def _backend_rows(runtime: Runtime) -> list[Any]:
    return list(runtime.state.status().rules[0].backends)


async def _spread(port: int, count: int, source: str | None = None) -> Counter[int]:
    answers: Counter[int] = Counter()
    for _ in range(count):
        answers[int(await ask("127.0.0.1", port, source=source))] += 1
    return answers


async def test_round_robin_spreads_evenly_and_by_weight() -> None:
    port = free_port()
    async with Backends(3).up() as backends, running(_rule(port, connect=backends.targets())) as runtime:
        spread = await _spread(port, 300)
        assert set(spread) == set(backends.ports)
        assert all(90 <= spread[p] <= 110 for p in backends.ports), spread
        rows = _backend_rows(runtime)
        assert [row.sessions_total for row in rows] == [spread[p] for p in backends.ports]
        assert all(row.state == "up" for row in rows)
        assert runtime.state.status().rules[0].balance == "round-robin"
    port = free_port()
    async with Backends(2).up() as backends:
        tables = [
            {"connect": target, "weight": weight}
            for target, weight in zip(backends.targets(), (1, 3), strict=True)
        ]
        async with running(_rule(port, backend=tables)):
            spread = await _spread(port, 200)
            assert 45 <= spread[backends.ports[0]] <= 55, spread
            assert 145 <= spread[backends.ports[1]] <= 155, spread


async def test_least_connections_sends_new_clients_to_the_least_busy() -> None:
    port = free_port()
    backends = Backends(2)
    backends.hold = True
    async with (
        backends.up(),
        running(_rule(port, connect=backends.targets(), balance="least-connections")) as runtime,
    ):
        slow, fast = backends.ports
        # Four clients stay; they spread two and two.
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        served = [(int(await reader.read(5)), writer) for reader, writer in held]
        assert Counter(backend for backend, _ in served) == Counter({slow: 2, fast: 2})
        # The "fast" backend's two clients finish; the next two new clients both go to it.
        for backend, writer in served:
            if backend == fast:
                writer.close()
        await wait_until(
            lambda: [row.sessions_active for row in _backend_rows(runtime)] == [2, 0], 5, "fast idle"
        )
        more = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        assert [int(await reader.read(5)) for reader, _ in more] == [fast, fast]
        for _, writer in held + more:
            writer.close()


async def test_source_hash_keeps_each_client_on_one_backend() -> None:
    port = free_port()
    async with (
        Backends(3).up() as backends,
        running(_rule(port, connect=backends.targets(), balance="source-hash")),
    ):
        chosen = {}
        for last in range(2, 14):
            source = f"127.0.0.{last}"
            spread = await _spread(port, 4, source)
            assert len(spread) == 1, (source, spread)  # always the same backend
            chosen[source] = next(iter(spread))
        assert len(set(chosen.values())) >= 2  # twelve clients do not all hash to one backend
        # A backend goes away: only its own clients move.
        gone = chosen["127.0.0.2"]
        await backends.stop(gone)
        for source, before in chosen.items():
            after = next(iter(await _spread(port, 1, source)))
            assert after != gone
            if before != gone:
                assert after == before, source


async def test_first_and_backup_fail_over_in_order() -> None:
    port = free_port()
    async with Backends(3).up() as backends:
        main, second, spare = backends.ports
        tables = [
            {"connect": f"127.0.0.1:{main}"},
            {"connect": f"127.0.0.1:{second}"},
            {"connect": f"127.0.0.1:{spare}", "backup": True},
        ]
        async with running(_rule(port, backend=tables, balance="first")):
            assert await _spread(port, 10) == Counter({main: 10})
            await backends.stop(main)
            assert await _spread(port, 10) == Counter({second: 10})  # retried: nobody saw an error
            await backends.stop(second)
            assert await _spread(port, 10) == Counter({spare: 10})  # only now the backup
            await backends.start(main)
            await backends.start(second)


async def test_route_names_a_backend() -> None:
    port = free_port()
    async with Backends(2).up() as backends:
        eu, us = backends.ports
        tables = [{"connect": f"127.0.0.1:{eu}", "name": "eu"}, {"connect": f"127.0.0.1:{us}", "name": "us"}]
        routes = [{"source": "127.0.0.5/32", "backend": "us"}]
        async with running(_rule(port, backend=tables, route=routes, balance="first")):
            assert await _spread(port, 5, "127.0.0.5") == Counter({us: 5})
            assert await _spread(port, 5, "127.0.0.6") == Counter({eu: 5})
            await backends.stop(us)  # the route's backend is down: balanced like everyone
            assert await _spread(port, 5, "127.0.0.5") == Counter({eu: 5})


async def test_a_killed_backend_costs_no_request_and_checks_take_it_down_and_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="portfwd")
    port = free_port()
    health = {"interval": "0.2s", "timeout": "0.1s", "rise": 2, "fall": 2, "passive_fall": 0}
    async with (
        Backends(3).up() as backends,
        running(_rule(port, connect=backends.targets(), health=health)) as runtime,
    ):
        victim = backends.ports[1]
        await wait_until(lambda: all(row.last_check for row in _backend_rows(runtime)), 3, "first checks")
        assert await _spread(port, 30) == Counter({p: 10 for p in backends.ports})
        await backends.stop(victim)
        stopped = asyncio.get_running_loop().time()
        spread = await _spread(port, 60)  # every request answered, none by the victim
        assert victim not in spread
        assert sum(spread.values()) == 60
        await wait_until(lambda: _backend_rows(runtime)[1].state == "down", 3, "victim down")
        # fall x interval, plus one interval of phase and the timeout, plus scheduling slack
        assert asyncio.get_running_loop().time() - stopped < 2 * 0.2 + 0.2 + 0.1 + 0.5
        row = _backend_rows(runtime)[1]
        assert row.last_check_result.startswith(("refused", "connection refused")), row
        await backends.start(victim)
        await wait_until(lambda: _backend_rows(runtime)[1].state == "up", 3, "victim up after rise")
        assert victim in await _spread(port, 30)
    downs = [r for r in caplog.records if record_event(r)[0] == "backend.down"]
    ups = [r for r in caplog.records if record_event(r)[0] == "backend.up"]
    assert len(downs) == 1, [r.getMessage() for r in caplog.records]
    assert len(ups) == 1, [r.getMessage() for r in caplog.records]
    assert f"backend 127.0.0.1:{victim} is down" in downs[0].getMessage()


async def test_passive_health_takes_a_dead_backend_out() -> None:
    port = free_port()
    health = {"check": "none", "passive_fall": 2, "passive_down": "30s"}
    async with (
        Backends(2).up() as backends,
        running(_rule(port, connect=backends.targets(), health=health)) as runtime,
    ):
        alive, dead = backends.ports
        await backends.stop(dead)
        assert await _spread(port, 20) == Counter({alive: 20})  # retried each time: no client error
        row = _backend_rows(runtime)[1]
        assert row.state == "down", row
        assert row.failures == 2, row  # down after two: not tried since
        assert "2 connects failed in a row" in row.why
        assert runtime.state.status().rules[0].errors == {}


async def test_a_check_can_send_and_expect() -> None:
    port = free_port()
    good, bad = free_port(), free_port()

    async def answer(text: bytes):  # type: ignore[no-untyped-def]
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await reader.readline() == b"PING\r\n":
                writer.write(text)
            writer.close()

        return handle

    servers = [
        await asyncio.start_server(await answer(b"+PONG\r\n"), "127.0.0.1", good),
        await asyncio.start_server(await answer(b"-ERR loading\r\n"), "127.0.0.1", bad),
    ]
    health = {"interval": "0.1s", "timeout": "0.1s", "fall": 1, "send": "PING\r\n", "expect": "+PONG"}
    targets = [f"127.0.0.1:{good}", f"127.0.0.1:{bad}"]
    try:
        async with running(_rule(port, connect=targets, health=health)) as runtime:
            await wait_until(lambda: _backend_rows(runtime)[1].state == "down", 3, "bad down")
            rows = _backend_rows(runtime)
            assert rows[0].state == "up"
            assert rows[0].last_check_result.startswith("ok in ")
            assert rows[1].last_check_result == 'no "+PONG" in the answer'
    finally:
        for server in servers:
            server.close()


async def test_udp_flows_stay_with_their_backend() -> None:
    port = free_port(socket.SOCK_DGRAM)
    ports = [free_port(socket.SOCK_DGRAM) for _ in range(2)]
    loop = asyncio.get_running_loop()

    class Identity(asyncio.DatagramProtocol):
        def __init__(self, own: int) -> None:
            self.own = own

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(str(self.own).encode(), addr)  # type: ignore[attr-defined]

    transports = [
        (await loop.create_datagram_endpoint(lambda p=p: Identity(p), local_addr=("127.0.0.1", p)))[0]
        for p in ports
    ]
    rule = _rule(port, connect=[f"127.0.0.1:{p}" for p in ports], protocol="udp")
    try:
        async with running(rule) as runtime:
            seen: dict[int, set[int]] = {}
            clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
            for index, client in enumerate(clients):
                client.setblocking(False)
                client.connect(("127.0.0.1", port))
                for _ in range(5):
                    await loop.sock_sendall(client, b"hi")
                    async with asyncio.timeout(5):
                        seen.setdefault(index, set()).add(int(await loop.sock_recv(client, 10)))
                client.close()
            assert all(len(backend) == 1 for backend in seen.values()), seen  # pinned
            assert {next(iter(b)) for b in seen.values()} == set(ports)  # and spread
            assert [row.sessions_total for row in _backend_rows(runtime)] == [2, 2]
    finally:
        for transport in transports:
            transport.close()
