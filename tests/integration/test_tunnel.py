"""SSH tunnels against a stock OpenSSH sshd: -L, -R, -D, reverse dynamic, through the conformance suite.

Every class runs the foundation's conformance suite (8 MiB each way by sha256, half-close both
ways, concurrent clients, refused upstream) over a real SSH connection to a real sshd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from portfwd.runtime import Runtime
from tests.integration.conformance import RelayConformance
from tests.integration.peers import Address, free_port, running, text, wait_until
from tests.integration.socks_client import socks4, socks5
from tests.integration.sshd import Sshd

pytestmark = [pytest.mark.integration, pytest.mark.root]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.kill()


async def wait_up(runtime: Runtime, listening: bool = True) -> None:
    """Until the tunnel is up and (for -R) the server listens for us."""
    tunnel = runtime.state.tunnels[0]

    def ready() -> bool:
        if tunnel.state != "up":
            return False
        return not listening or all(item.state == "listening" for item in tunnel.forwards)

    await wait_until(ready, 15, "tunnel up")


@contextlib.asynccontextmanager
async def tunnel(sshd: Sshd, **fields: Any) -> AsyncIterator[Runtime]:
    async with running({"tunnel": [sshd.tunnel(connect_timeout="5s", **fields)]}) as runtime:
        assert not runtime.failures
        await wait_up(runtime)
        yield runtime


class _SshTunnel(RelayConformance):
    server: Sshd

    @pytest.fixture(autouse=True)
    def _server(self, sshd: Sshd) -> None:
        self.server = sshd


class TestLocal(_SshTunnel):
    """-L 127.0.0.1:port:host:hostport."""

    @contextlib.asynccontextmanager
    async def forward(self, target: Address) -> AsyncIterator[Address]:
        entry = ("127.0.0.1", free_port())
        where = target if isinstance(target, str) else text(target)
        async with tunnel(self.server, local=[f"127.0.0.1:{entry[1]}:{where}"]):
            yield entry


class TestLocalToUnixSocket(TestLocal):
    """-L port:/remote.sock (OpenSSH's direct-streamlocal)."""

    upstream_family = "unix"


class TestRemote(_SshTunnel):
    """-R 127.0.0.1:port:host:hostport: clients connect on the server's side."""

    @contextlib.asynccontextmanager
    async def forward(self, target: Address) -> AsyncIterator[Address]:
        entry = ("127.0.0.1", free_port())
        async with tunnel(self.server, remote=[f"127.0.0.1:{entry[1]}:{text(target)}"]):
            yield entry


class _Socks(_SshTunnel):
    """A SOCKS forward: the client names the target in its handshake."""

    version = 5
    target: Address = ("127.0.0.1", 0)

    async def open_client(self, entry: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert not isinstance(self.target, str)
        _, port = self.target
        if self.version == 5:
            reader, writer, _ = await socks5(entry, "localhost", port)
        else:
            reader, writer, _ = await socks4(entry, "localhost", port)
        return reader, writer


class TestDynamicSocks5(_Socks):
    """-D port, SOCKS5 with a host name (what curl --socks5-hostname sends)."""

    @contextlib.asynccontextmanager
    async def forward(self, target: Address) -> AsyncIterator[Address]:
        self.target = target
        entry = ("127.0.0.1", free_port())
        async with tunnel(self.server, dynamic=[f"127.0.0.1:{entry[1]}"]):
            yield entry


class TestDynamicSocks4a(TestDynamicSocks5):
    version = 4


class TestReverseDynamic(_Socks):
    """-R port with no target: a SOCKS server on the far side, connecting out on ours."""

    @contextlib.asynccontextmanager
    async def forward(self, target: Address) -> AsyncIterator[Address]:
        self.target = target
        entry = ("127.0.0.1", free_port())
        async with tunnel(self.server, remote=[f"127.0.0.1:{entry[1]}"]):
            yield entry


class TestLocalUnixListener(TestLocal):
    """-L /local.sock:host:hostport."""

    @contextlib.asynccontextmanager
    async def forward(self, target: Address) -> AsyncIterator[Address]:
        entry = os.path.join(tempfile.mkdtemp(prefix="pf-"), "in.sock")
        async with tunnel(self.server, local=[f"{entry}:{text(target)}"]):
            yield entry
        assert not os.path.exists(entry), "the listener's socket file is removed"  # noqa: ASYNC240


class TestRemoteToUnixSocket(TestRemote):
    """-R port:/local.sock."""

    upstream_family = "unix"

    @contextlib.asynccontextmanager
    async def forward(self, target: Address) -> AsyncIterator[Address]:
        entry = ("127.0.0.1", free_port())
        assert isinstance(target, str)
        async with tunnel(self.server, remote=[f"127.0.0.1:{entry[1]}:{target}"]):
            yield entry
