"""The SSH fast path's off switch, end to end: against a stock sshd, and under a stock ssh client.

Each test checks what a person reads (the decision line at -v), that the bytes come through
(8 MiB, sha256 checked by the Sink), and which packet path carried them, as the peer sees it
on the wire: asyncssh's own send path puts an empty SSH_MSG_IGNORE before every packet once
keys are in place, the fast path sends none under the ciphers negotiated here (see
portfwd/ssh/lean/packets.py), and OpenSSH logs each one it receives at DEBUG3
("Received SSH2_MSG_IGNORE"). Switched off, at least one arrives per 32 KiB data packet;
on, none once the fast path is installed. OpenSSH's logs go to files (-E): this many DEBUG3
lines would fill a pipe and stall the peer.

"On" is what the installed asyncssh allows: on a release outside lean.VERIFIED, the default is
asyncssh's own path with one WARNING line, and these tests expect exactly that.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portfwd.ssh import lean
from tests.integration.peers import MiB, free_port, open_client, peer, read_all, running, sha
from tests.integration.processes import READY, Proc, portfwd_argv, started, wait_listening
from tests.integration.sshd import SSHD, Sshd
from tests.integration.test_server import Server
from tests.integration.test_status import Sink
from tests.integration.test_tunnel import wait_up
from tests.integration.test_tunnel_cli import ssh_argv, through

pytestmark = [pytest.mark.integration, pytest.mark.root]

OFF = "SSH fast path off (ssh_fast_path = false): tunnels use asyncssh's own path"
ON = "SSH fast path on"
IGNORE = "Received SSH2_MSG_IGNORE"
#: OpenSSH's maximum packet for a TCP channel (CHAN_TCP_PACKET_DEFAULT): 8 MiB is >= 256 packets.
PACKETS = 8 * MiB // (32 * 1024)


def verified() -> bool:
    return lean.installed_asyncssh() in lean.VERIFIED


def decision(lines: list[str], switched_off: bool) -> None:
    """The one line runtime logs when a tunnel or the server starts, at the level it belongs to."""
    if switched_off:
        expected = f" DEBUG {OFF}"
    elif verified():
        expected = f" DEBUG {ON}"
    else:
        expected = (
            f" WARNING SSH fast path off: asyncssh {lean.installed_asyncssh()} is not the release it was "
            f"checked against ({', '.join(lean.VERIFIED)}); tunnels use asyncssh's own, slower path"
        )
    fast = [line for line in lines if "SSH fast path" in line]
    assert len(fast) == 1, "\n".join(lines)
    assert fast[0].endswith(expected), fast[0]


def wait_logged(path: Path, needle: str, timeout: float = 15.0) -> str:
    """Bounded wait until a log file that a peer appends to holds `needle`; returns the file."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not logged in {path} within {timeout} s:\n{text[-4000:]}")
        time.sleep(0.02)


class LoggedSshd(Sshd):
    """Stock sshd at LogLevel DEBUG3 (one line per SSH_MSG_IGNORE received), logging to a file."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, ("LogLevel DEBUG3",))
        self.log = root / "sshd.log"

    def start(self) -> LoggedSshd:
        self.proc = Proc([SSHD, "-D", "-E", str(self.log), "-f", str(self.config)])
        wait_logged(self.log, f"Server listening on 127.0.0.1 port {self.port}")
        return self

    def ignores_after_auth(self) -> int:
        """IGNOREs sshd received once logged in ("[preauth]" marks the earlier ones)."""
        text = wait_logged(self.log, "Disconnected from user root")  # the session's last line
        return sum(1 for line in text.splitlines() if IGNORE in line and "preauth" not in line)


class VerboseServer(Server):
    """test_server's `portfwd server` (user alice), run with -v, `head` prepended to its config."""

    def __init__(self, root: Path, head: str, *flags: str) -> None:
        super().__init__(root)
        self.config.write_text(head + self.config.read_text())  # top-level keys before any table
        self.flags = flags

    def start(self) -> VerboseServer:
        self.proc = Proc(portfwd_argv("server", "-v", *self.flags, "-c", str(self.config)))
        self.proc.wait_for(READY)
        public = subprocess.run(
            ["ssh-keygen", "-y", "-f", str(self.host_key)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {public}\n")
        return self


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink().start()
    yield server
    server.close()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[LoggedSshd]:
    server = LoggedSshd(tmp_path).start()
    yield server
    server.kill()


CLIENTS = {
    "ssh": False,  # -v, no switch: the fast path runs (when asyncssh is VERIFIED)
    "ssh --no-ssh-fast-path": True,
    "run, ssh_fast_path = false": True,
}


@pytest.mark.parametrize("case", list(CLIENTS))
def test_client_against_stock_sshd(case: str, sshd: LoggedSshd, sink: Sink, tmp_path: Path) -> None:
    switched_off = CLIENTS[case]
    local = free_port()
    forward = f"127.0.0.1:{local}:127.0.0.1:{sink.port}"
    if case.startswith("run"):
        config = tmp_path / "portfwd.toml"
        config.write_text(
            f'ssh_fast_path = false\n[control]\nsocket = "{tmp_path / "ctl.sock"}"\n'
            f'[[tunnel]]\nname = "lab"\nssh = "root@127.0.0.1:{sshd.port}"\n'
            f'identity = "{sshd.user_key}"\nagent = false\nknown_hosts = "{sshd.known_hosts}"\n'
            f'ssh_config = "/dev/null"\nlocal = ["{forward}"]\n'
        )
        argv = portfwd_argv("run", "-v", "-c", str(config))
    else:
        flags = ["--no-ssh-fast-path"] if switched_off else []
        argv = ssh_argv(sshd, *flags, "-v", "-N", "-L", forward)
    with started(argv, ready=READY) as proc:
        proc.wait_for(f"connected to root@127.0.0.1:{sshd.port}")
        assert through(local, 8 * MiB)
        assert proc.stop() == 0
        lines = proc.output().splitlines()
    decision(lines, switched_off)
    ignores = sshd.ignores_after_auth()
    if switched_off or not verified():
        assert ignores >= PACKETS, f"asyncssh's own path: one IGNORE per packet, {ignores} seen"
    else:
        assert ignores == 0, f"the fast path sends no IGNORE under an AEAD cipher, {ignores} seen"


SERVERS = {
    "server": ("", ()),  # -v, no switch: the fast path runs (when asyncssh is VERIFIED)
    "server, ssh_fast_path = false": ("ssh_fast_path = false\n", ()),
    "server --no-ssh-fast-path": ("", ("--no-ssh-fast-path",)),
}


@pytest.mark.parametrize("case", list(SERVERS))
def test_stock_ssh_against_the_server(case: str, sink: Sink, tmp_path: Path) -> None:
    head, flags = SERVERS[case]
    switched_off = bool(head or flags)
    server = VerboseServer(tmp_path, head, *flags).start()
    try:
        local, remote = free_port(), free_port()
        log = tmp_path / "ssh.log"
        argv = server.ssh(
            "-vvv", "-E", str(log),
            "-L", f"127.0.0.1:{local}:127.0.0.1:{sink.port}",
            "-R", f"127.0.0.1:{remote}:127.0.0.1:{sink.port}",
        )  # fmt: skip
        with started(argv):
            wait_listening(local)
            assert server.proc is not None
            server.proc.wait_for(f"listening on 127.0.0.1:{remote} for the client")
            assert through(local, 8 * MiB), "up: ssh -> portfwd server -> Sink"
            assert through(remote, 8 * MiB), "down: portfwd server -> ssh -> Sink, 8 MiB of server packets"
        lines = server.log().splitlines()
    finally:
        server.stop()
    decision(lines, switched_off)
    text = log.read_text()
    assert "Authenticated to 127.0.0.1" in text
    ignores = text.count(IGNORE)
    if switched_off or not verified():
        assert ignores >= PACKETS, f"asyncssh's own path: one IGNORE per packet, {ignores} seen"
    else:
        assert ignores == 0, f"the server's fast path is on from the first packet, {ignores} seen"


@pytest.mark.parametrize("enabled", [True, False], ids=["ssh_fast_path = true", "ssh_fast_path = false"])
async def test_nothing_is_installed_on_the_connection_when_off(enabled: bool, tmp_path: Path) -> None:
    """What the wire cannot show: tune() leaves asyncssh's send_packet and _recv_data in place."""
    server = Sshd(tmp_path).start()
    try:
        async with peer("echo", ("127.0.0.1", 0)) as upstream:
            assert not isinstance(upstream.address, str)
            local = free_port()
            tunnel = server.tunnel(
                connect_timeout="5s", local=[f"127.0.0.1:{local}:127.0.0.1:{upstream.address[1]}"]
            )
            async with running({"ssh_fast_path": enabled, "tunnel": [tunnel]}) as runtime:
                assert not runtime.failures
                await wait_up(runtime)
                conn = runtime.tunnels[0].conn
                assert conn is not None
                installed = {"send_packet", "_recv_data"} & set(vars(conn))
                if enabled and verified():
                    assert installed == {"send_packet", "_recv_data"}
                    assert type(conn.send_packet.__self__).__name__ == "_PacketPath"
                    assert type(conn._recv_data.__self__).__name__ == "Receiver"
                else:
                    assert installed == set(), "asyncssh's own methods, from its class"
                    assert conn.send_packet.__func__ is type(conn).send_packet
                    assert conn._recv_data.__func__ is type(conn)._recv_data
                reader, writer = await open_client(("127.0.0.1", local))
                data = os.urandom(MiB)
                writer.write(data)
                writer.write_eof()
                got = await read_all(reader)
                writer.close()
                assert sha(got) == sha(data)
    finally:
        server.kill()
