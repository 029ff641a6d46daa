"""Rule features end to end: port ranges keep their offset, routes pick targets by source,
`[::]` is IPv6-only unless `dual_stack`, and an upstream that never answers times out."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator

import pytest

from tests.integration.peers import free_port, running

pytestmark = pytest.mark.integration


def free_range(count: int) -> int:
    """A base port with `count` consecutive ports free (below the ephemeral range; bounded tries)."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        probes = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise AssertionError("no free port range")


@contextlib.asynccontextmanager
async def identity_servers(ports: list[int], host: str = "127.0.0.1") -> AsyncIterator[list[str]]:
    """Servers that answer every client with their own port number, and remember who came."""
    seen: list[str] = []
    servers = []

    def handler(port: int):  # type: ignore[no-untyped-def]
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("peername")[0])
            writer.write(str(port).encode())
            await writer.drain()
            writer.close()

        return handle

    for port in ports:
        servers.append(await asyncio.start_server(handler(port), host, port))
    try:
        yield seen
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


async def ask(host: str, port: int, source: str | None = None) -> bytes:
    local = (source, 0) if source else None
    reader, writer = await asyncio.open_connection(host, port, local_addr=local)
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def test_port_range_keeps_the_offset() -> None:
    listen, target = free_range(3), free_range(3)
    async with (
        identity_servers([target, target + 1, target + 2]),
        running(
            {
                "forward": [
                    {
                        "listen": f"127.0.0.1:{listen}-{listen + 2}",
                        "connect": f"127.0.0.1:{target}-{target + 2}",
                    }
                ]
            }
        ) as runtime,
    ):
        assert len(runtime.state.listeners) == 1
        for offset in range(3):
            assert await ask("127.0.0.1", listen + offset) == str(target + offset).encode()


async def test_range_to_one_target_port() -> None:
    listen, target = free_range(2), free_port()
    async with (
        identity_servers([target]),
        running(
            {"forward": [{"listen": f"127.0.0.1:{listen}-{listen + 1}", "connect": f"127.0.0.1:{target}"}]}
        ),
    ):
        assert await ask("127.0.0.1", listen + 1) == str(target).encode()


async def test_routes_choose_the_target_by_source_first_match_wins() -> None:
    port, default, special, never = free_port(), free_port(), free_port(), free_port()
    rule = {
        "listen": f"127.0.0.1:{port}",
        "connect": f"127.0.0.1:{default}",
        "route": [
            {"source": "127.0.0.2/32", "connect": f"127.0.0.1:{special}"},
            {"source": ["127.0.0.0/8"], "connect": f"127.0.0.1:{never}"},
        ],
    }
    async with identity_servers([default, special, never]), running({"forward": [rule]}):
        assert await ask("127.0.0.1", port, source="127.0.0.2") == str(special).encode()
        assert await ask("127.0.0.1", port, source="127.0.0.3") == str(never).encode()
        # The first route covers 127.0.0.2 only; 127.0.0.1 falls to the second.
        assert await ask("127.0.0.1", port, source="127.0.0.1") == str(never).encode()


async def test_ipv6_any_is_ipv6_only_unless_dual_stack() -> None:
    target = free_port()
    v6only, dual = free_port(host="::1"), free_port(host="::1")
    rules = [
        {"listen": f"[::]:{v6only}", "connect": f"127.0.0.1:{target}"},
        {
            "listen": f"[::]:{dual}",
            "connect": f"127.0.0.1:{target}",
            "dual_stack": True,
            "allow": ["127.0.0.0/8"],
        },
    ]
    async with identity_servers([target]), running({"forward": rules}) as runtime:
        assert not runtime.failures
        assert await ask("::1", v6only) == str(target).encode()
        with pytest.raises(ConnectionRefusedError):
            await ask("127.0.0.1", v6only)
        # Dual stack: an IPv4 client arrives as ::ffff:127.0.0.1 and still matches 127.0.0.0/8...
        assert await ask("127.0.0.1", dual) == str(target).encode()
        # ...while ::1 is outside the allow list and is closed at once.
        assert await ask("::1", dual) == b""
        assert runtime.state.rules[f"[::]:{dual}"].denied_total == 1


async def test_upstream_that_never_answers_times_out() -> None:
    # A listener whose accept queue is full makes the kernel drop further SYNs: connects hang.
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    target = stuck.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", target))
            fillers.append(filler)
        port = free_port()
        rule = {"listen": f"127.0.0.1:{port}", "connect": f"127.0.0.1:{target}", "connect_timeout": "300ms"}
        async with running({"forward": [rule]}) as runtime:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            writer.close()
            assert runtime.state.rules[f"127.0.0.1:{port}"].errors == {"timeout": 1}
    finally:
        for filler in fillers:
            filler.close()
        stuck.close()
