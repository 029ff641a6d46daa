"""The conformance suite every relay path passes (trio's _check_streams, for forwarders).

A subclass provides `forward(target)`: an async context manager that makes the relay path
under test carry clients from the address it yields to `target`. Every path then has to
show: 8 MiB each way intact at once, half-close kept in each direction, a stalled reader waited
for (backpressure), a second client served
while the first is open, 100 concurrent clients, and a refused upstream that leaves the
listener serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from tests.integration.peers import Address, MiB, free_port, open_client, peer, read_all, sha

PAYLOAD_UP = os.urandom(8 * MiB)
PAYLOAD_DOWN = os.urandom(8 * MiB)


class RelayConformance:
    """Base class of the suite; not collected on its own (its name has no Test prefix)."""

    #: Where upstream peers listen: "v4", "v6" or "unix".
    upstream_family = "v4"

    def upstream_address(self, tmp_path: object) -> Address:
        if self.upstream_family == "unix":
            return os.path.join(str(tmp_path), f"up-{os.getpid()}.sock")
        host = "::1" if self.upstream_family == "v6" else "127.0.0.1"
        return (host, free_port(host=host))

    def forward(self, target: Address) -> contextlib.AbstractAsyncContextManager[Address]:
        raise NotImplementedError

    async def open_client(self, entry: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect a client to the forward's entry (SOCKS paths add their handshake here)."""
        return await open_client(entry)

    async def test_eight_mib_each_way_at_once(self, tmp_path: object) -> None:
        async with peer("exchange", self.upstream_address(tmp_path), PAYLOAD_DOWN) as upstream:
            async with self.forward(upstream.address) as entry:
                reader, writer = await self.open_client(entry)

                async def send() -> None:
                    writer.write(PAYLOAD_UP)
                    await writer.drain()
                    writer.write_eof()

                sender = asyncio.create_task(send())
                got = await read_all(reader)
                await sender
                writer.close()
                await upstream.done.wait()
        assert len(got) == len(PAYLOAD_DOWN)
        assert sha(got) == sha(PAYLOAD_DOWN)
        assert upstream.received == [sha(PAYLOAD_UP)]

    async def test_client_half_close_keeps_the_reply_path(self, tmp_path: object) -> None:
        request = os.urandom(MiB)
        async with peer("reply_after_eof", self.upstream_address(tmp_path)) as upstream:
            async with self.forward(upstream.address) as entry:
                reader, writer = await self.open_client(entry)
                writer.write(request)
                await writer.drain()
                writer.write_eof()
                reply = await read_all(reader)
                writer.close()
        assert reply == sha(request).encode()

    async def test_upstream_half_close_keeps_the_request_path(self, tmp_path: object) -> None:
        greeting, request = os.urandom(MiB), os.urandom(MiB)
        async with peer("send_first", self.upstream_address(tmp_path), greeting) as upstream:
            async with self.forward(upstream.address) as entry:
                reader, writer = await self.open_client(entry)
                got = await read_all(reader)  # EOF from upstream arrives first...
                writer.write(request)  # ...and we can still send
                await writer.drain()
                writer.write_eof()
                await upstream.done.wait()
                writer.close()
        assert sha(got) == sha(greeting)
        assert upstream.received == [sha(request)]

    async def test_a_stalled_reader_is_waited_for(self, tmp_path: object) -> None:
        """The client stops reading: socket buffers fill, the relay must wait for room, not drop."""
        greeting = os.urandom(16 * MiB)  # more than loopback's socket buffers hold
        async with peer("send_first", self.upstream_address(tmp_path), greeting) as upstream:
            async with self.forward(upstream.address) as entry:
                reader, writer = await self.open_client(entry)
                first = await reader.readexactly(1024)  # the relay is up and sending
                await asyncio.sleep(0.5)  # stalled: everything between fills up
                async with asyncio.timeout(30):  # a relay that never resumes fails here
                    got = first + await read_all(reader)
                writer.write_eof()
                await upstream.done.wait()
                writer.close()
        assert sha(got) == sha(greeting)

    async def test_second_client_served_while_first_is_open(self, tmp_path: object) -> None:
        async with peer("echo", self.upstream_address(tmp_path)) as upstream:
            async with self.forward(upstream.address) as entry:
                first_reader, first_writer = await self.open_client(entry)
                first_writer.write(b"first")
                assert await first_reader.readexactly(5) == b"first"
                second_reader, second_writer = await self.open_client(entry)
                second_writer.write(b"second")
                second_writer.write_eof()
                assert await read_all(second_reader) == b"second"
                second_writer.close()
                first_writer.write(b"still here")
                assert await first_reader.readexactly(10) == b"still here"
                first_writer.close()

    async def test_hundred_concurrent_clients(self, tmp_path: object) -> None:
        async with peer("echo", self.upstream_address(tmp_path)) as upstream:
            async with self.forward(upstream.address) as entry:

                async def client(index: int) -> bool:
                    data = os.urandom(64 * 1024) + index.to_bytes(4, "big")
                    reader, writer = await self.open_client(entry)
                    writer.write(data)
                    await writer.drain()
                    writer.write_eof()
                    echoed = await read_all(reader)
                    writer.close()
                    return sha(echoed) == sha(data)

                results = await asyncio.gather(*(client(i) for i in range(100)))
        assert all(results)
        assert len(upstream.clients) == 100

    async def test_refused_upstream_does_not_stop_the_listener(self, tmp_path: object) -> None:
        target = self.upstream_address(tmp_path)  # nothing listens there yet
        async with self.forward(target) as entry:
            reader, writer = await self.open_client(entry)
            with contextlib.suppress(ConnectionError):
                assert await read_all(reader) == b""  # closed, not hung
            writer.close()
            async with peer("echo", target):
                reader, writer = await self.open_client(entry)
                writer.write(b"after refusal")
                writer.write_eof()
                assert await read_all(reader) == b"after refusal"
                writer.close()
