"""`portfwd ssh` against `portfwd server`, both in this process: the conformance suite for -L, -R, -D.

Also the server's own guards that need no stock client: failed-login penalty, reaping a
silent client, metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from portfwd.metrics import StateCollector
from portfwd.runtime import Runtime
from portfwd.ssh.server import load_host_key
from tests.integration.conformance import RelayConformance
from tests.integration.peers import Address, free_port, open_client, read_all, running, text, wait_until
from tests.integration.socks_client import socks5
from tests.integration.sshd import keygen

pytestmark = pytest.mark.integration


class Keys:
    """A server host key and a user key, with the known_hosts line that trusts the server."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host_key = root / "host_ed25519"
        host = load_host_key(str(self.host_key))
        self.user_key = root / "user_key"
        (root / "user.keys").write_text(keygen(self.user_key) + "\n")
        self.port = free_port()
        self.remote_path = str(root / "remote.sock")
        self.known_hosts = root / "known_hosts"
        public = host.export_public_key().decode().strip()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {public}\n")

    def server(self, **fields: Any) -> dict[str, Any]:
        user = {
            "name": "tester",
            "authorized_keys": str(self.root / "user.keys"),
            # pytest's tmp_path (/tmp/pytest-of-USER/pytest-N/TEST/): a '*' matches one component
            "permit_open": ["any", "unix:/tmp/*/*/*/*.sock"],
            "permit_listen": ["127.0.0.1:*", f"unix:{self.remote_path}"],
        }
        return {
            "listen": f"127.0.0.1:{self.port}",
            "host_key": str(self.host_key),
            "user": [user],
            **fields,
        }

    def tunnel(self, **fields: Any) -> dict[str, Any]:
        return {
            "ssh": f"tester@127.0.0.1:{self.port}",
            "identity": [str(self.user_key)],
            "agent": False,
            "known_hosts": [str(self.known_hosts)],
            "ssh_config": ["/dev/null"],
            "connect_timeout": "5s",
            **fields,
        }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("server"))


@contextlib.asynccontextmanager
async def through_server(keys: Keys, **fields: Any) -> AsyncIterator[Runtime]:
    async with running({"server": keys.server(), "tunnel": [keys.tunnel(**fields)]}) as runtime:
        assert not runtime.failures
        tunnel = runtime.state.tunnels[0]
        await wait_until(
            lambda: tunnel.state == "up" and all(item.state == "listening" for item in tunnel.forwards),
            15,
            "tunnel up through portfwd server",
        )
        yield runtime


def _not_the_servers(keys: Keys) -> int:
    """A free port for the forward's entry, never the server's own (the module's server port is
    free between tests, so the kernel may hand it out again)."""
    for _ in range(20):
        port = free_port()
        if port != keys.port:
            return port
    raise AssertionError("no free port other than the server's")


class _ThroughServer(RelayConformance):
    keys: Keys

    @pytest.fixture(autouse=True)
    def _keys(self, keys: Keys) -> None:
        self.keys = keys


class TestLocalThroughPortfwdServer(_ThroughServer):
    @contextlib.asynccontextmanager
    async def forward(self, target: Address) -> AsyncIterator[Address]:
        entry = ("127.0.0.1", _not_the_servers(self.keys))
        where = target if isinstance(target, str) else text(target)
        async with through_server(self.keys, local=[f"127.0.0.1:{entry[1]}:{where}"]):
            yield entry


class TestLocalToUnixThroughPortfwdServer(TestLocalThroughPortfwdServer):
    upstream_family = "unix"


class TestRemoteThroughPortfwdServer(_ThroughServer):
    @contextlib.asynccontextmanager
    async def forward(self, target: Address) -> AsyncIterator[Address]:
        entry = ("127.0.0.1", _not_the_servers(self.keys))
        async with through_server(self.keys, remote=[f"127.0.0.1:{entry[1]}:{text(target)}"]):
            yield entry


class TestRemoteUnixListenerThroughPortfwdServer(_ThroughServer):
    """-R /remote.sock:host:port: the server listens on a Unix socket (forwarded-streamlocal)."""

    @contextlib.asynccontextmanager
    async def forward(self, target: Address) -> AsyncIterator[Address]:
        entry = self.keys.remote_path
        async with through_server(self.keys, remote=[f"{entry}:{text(target)}"]):
            yield entry


class TestDynamicThroughPortfwdServer(_ThroughServer):
    target: Address = ("127.0.0.1", 0)

    async def open_client(self, entry: Address) -> Any:
        assert not isinstance(self.target, str)
        reader, writer, _ = await socks5(entry, "localhost", self.target[1])
        return reader, writer

    @contextlib.asynccontextmanager
    async def forward(self, target: Address) -> AsyncIterator[Address]:
        self.target = target
        entry = ("127.0.0.1", _not_the_servers(self.keys))
        async with through_server(self.keys, dynamic=[f"127.0.0.1:{entry[1]}"]):
            yield entry


async def test_failed_logins_are_penalized(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    stranger = tmp_path / "stranger"
    keygen(stranger)
    async with running({"server": keys.server(max_auth_failures=2)}) as runtime:
        options = {
            "port": keys.port,
            "known_hosts": str(keys.known_hosts),
            "agent_path": None,
            "config": ["/dev/null"],
        }
        for _ in range(2):
            with pytest.raises(asyncssh.PermissionDenied):
                await asyncssh.connect("127.0.0.1", username="tester", client_keys=[str(stranger)], **options)
        await wait_until(lambda: runtime.state.server_auth_failures == 2, 5, "two failures counted")
        with pytest.raises(
            (asyncssh.Error, OSError)
        ):  # the right key, but this address is in the penalty box
            await asyncssh.connect(
                "127.0.0.1", username="tester", client_keys=[str(keys.user_key)], **options
            )
        scrape = b"".join(
            line.encode()
            for line in _samples(runtime)
            if line.startswith("portfwd_server_auth_failures_total")
        )
        assert scrape == b"portfwd_server_auth_failures_total 2.0"


def _samples(runtime: Runtime) -> list[str]:
    """The /metrics exposition lines, as Prometheus would scrape them."""
    registry = CollectorRegistry()
    registry.register(StateCollector(runtime.state))
    return generate_latest(registry).decode().splitlines()


async def test_sessions_in_status_and_metrics(keys: Keys) -> None:
    async with through_server(keys, dynamic=[str(free_port())]) as runtime:
        await wait_until(lambda: bool(runtime.state.server_sessions), 5, "server session listed")
        [row] = runtime.state.snapshot()["server_sessions"]
        assert row["user"] == "tester"
        assert row["fingerprint"].startswith("SHA256:")
        assert 'portfwd_server_sessions_active{user="tester"} 1.0' in _samples(runtime)


async def test_any_does_not_open_unix_sockets(keys: Keys, tmp_path: Path) -> None:
    """permit_open = ["any"] covers host:port targets, never a Unix socket on the server."""
    server = keys.server()
    server["user"] = [{**server["user"][0], "permit_open": ["any"]}]
    entry = ("127.0.0.1", free_port())
    tunnel = keys.tunnel(local=[f"127.0.0.1:{entry[1]}:{tmp_path / 'secret.sock'}"])
    async with running({"server": server, "tunnel": [tunnel]}) as runtime:
        await wait_until(lambda: runtime.state.tunnels[0].state == "up", 15, "up")
        reader, writer = await open_client(entry)
        assert await read_all(reader) == b""
        writer.close()
        await wait_until(lambda: bool(runtime.state.server_sessions[0].stats.errors), 5, "denial counted")
        assert runtime.state.server_sessions[0].stats.errors == {"denied": 1}
        assert runtime.state.tunnels[0].forwards[0].stats.errors == {"refused": 1}
