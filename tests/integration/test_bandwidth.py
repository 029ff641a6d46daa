"""Bandwidth limits on a [[forward]], measured through real sockets on loopback.

Each limited transfer carries five seconds' worth of bytes at "10Mbit" (1.25 MB/s), so the
burst a bucket allows at the start is a small part of it; the rate is measured end to end (from
the client's first byte to the answer that everything arrived) and must be within 10 % of the
limit. Every byte is checked by sha256. portfwd runs in the test's own loop (`running`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import Any

import pytest

from tests.integration.peers import Address, free_port, peer, read_all, running, sha, text

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

LIMIT = "10Mbit"
RATE = 10e6 / 8  #: LIMIT in bytes a second
SECONDS = 5.0  #: how long each limited transfer should take
TOLERANCE = 0.10


def _forward(port: int, target: Address, **limits: Any) -> dict[str, Any]:
    rule = {"name": "bw", "listen": f"127.0.0.1:{port}", "connect": text(target), **limits}
    return {"forward": [rule]}


def _near_the_limit(what: str, size: int, seconds: float) -> None:
    rate = size / seconds
    log.info("%s: %d bytes in %.3f s: %.0f B/s, %.3f of the limit", what, size, seconds, rate, rate / RATE)
    assert abs(rate / RATE - 1.0) <= TOLERANCE, f"{what}: {rate:.0f} B/s against a limit of {RATE:.0f}"


async def _upload(port: int, payload: bytes) -> float:
    """Send `payload` through `port` to a target that answers its sha256 at EOF; the seconds from
    connecting until that answer came (checked)."""
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()  # goes once the transport's buffer has gone
        async with asyncio.timeout(SECONDS * 3):
            answer = await read_all(reader)
    finally:
        writer.close()
    took = time.monotonic() - began
    assert answer == sha(payload).encode(), "the target got every byte, in order"
    return took


async def test_per_connection_limit_paces_an_upload() -> None:
    payload = os.urandom(int(RATE * SECONDS))
    port = free_port()
    async with (
        peer("reply_after_eof", ("127.0.0.1", 0)) as target,
        running(_forward(port, target.address, bandwidth_per_connection=LIMIT)),
    ):
        took = await _upload(port, payload)
    _near_the_limit("upload", len(payload), took)


async def test_per_connection_limit_paces_a_download() -> None:
    payload = os.urandom(int(RATE * SECONDS))
    port = free_port()
    async with (
        peer("send_first", ("127.0.0.1", 0), payload) as target,
        running(_forward(port, target.address, bandwidth_per_connection=LIMIT)),
    ):
        began = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(SECONDS * 3):
                received = await read_all(reader)
            took = time.monotonic() - began
            writer.write_eof()
            async with asyncio.timeout(5):
                await target.done.wait()
        finally:
            writer.close()
    assert sha(received) == sha(payload), "the client got every byte, in order"
    assert target.received == [sha(b"")], "and the half-close went the other way"
    _near_the_limit("download", len(received), took)


class _CountingTarget:
    """A target that counts what each client has sent so far; at a client's EOF it answers the
    sha256 of what came, and the first to finish notes how far each client had got by then."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.at_first_end: list[int] | None = None
        self.server: asyncio.Server | None = None

    async def start(self) -> Address:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return ("127.0.0.1", int(self.server.sockets[0].getsockname()[1]))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.counts)
        self.counts.append(0)
        digest = hashlib.sha256()
        try:
            for _ in range(100_000):  # bounded: far more reads than the payload needs
                chunk = await reader.read(256 * 1024)
                if not chunk:
                    break
                self.counts[index] += len(chunk)
                digest.update(chunk)
            if self.at_first_end is None:
                self.at_first_end = list(self.counts)
            writer.write(digest.hexdigest().encode())
            await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_rule_limit_is_shared_fairly_by_concurrent_connections() -> None:
    halves = [os.urandom(int(RATE * SECONDS / 2)) for _ in range(2)]
    port = free_port()
    target = _CountingTarget()
    address = await target.start()
    try:
        async with running(_forward(port, address, bandwidth=LIMIT)):
            began = time.monotonic()
            await asyncio.gather(*(_upload(port, half) for half in halves))
            took = time.monotonic() - began
    finally:
        await target.stop()
    _near_the_limit("two connections together", sum(map(len, halves)), took)
    at_first_end = target.at_first_end
    assert at_first_end is not None
    assert len(at_first_end) == 2
    shares = [count / sum(at_first_end) for count in at_first_end]
    log.info("shares when the first finished: %s", ", ".join(f"{share:.3f}" for share in shares))
    assert min(shares) >= 0.3, f"each connection gets a fair part of the rule's limit: {shares}"


async def test_an_unlimited_rule_is_not_slowed() -> None:
    payload = os.urandom(int(RATE * SECONDS))
    port = free_port()
    async with (
        peer("reply_after_eof", ("127.0.0.1", 0)) as target,
        running(_forward(port, target.address, relay="protocol")),
    ):
        took = await _upload(port, payload)
    log.info("unlimited: %d bytes in %.3f s", len(payload), took)
    assert took < SECONDS / 10, f"{len(payload) / took:.0f} B/s is the speed of no limit"
