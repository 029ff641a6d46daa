"""dropbear against portfwd, both ways: `dbclient -L` through `portfwd server`, `portfwd ssh -L` to `dropbear`.

dbclient sends a guessed first key-exchange packet behind its KEXINIT. RFC 4253 §7: when the
two sides' first key exchange or first host key algorithms differ, the guess is wrong and the
server must ignore it; asyncssh 2.24 judged only the kex algorithm it chose, so dbclient was
refused with "Key exchange not in progress" (see portfwd/ssh/lean/kex.py). The server
is run with the guess wrong by kex (asyncssh's own first choice, mlkem768x25519-sha256, is
not dbclient's curve25519-sha256), wrong by host key only (kex narrowed to dbclient's first,
an RSA host key), and right (both narrowed to dbclient's firsts). The narrowing is the server's
own `[server] kex` key.

Every transfer is 4 MiB, checked by sha256 on the far side (Sink). Processes are ours, started
and stopped by PID; dropbear runs in a private mount namespace with a temporary directory
over /root, so it finds our authorized_keys without touching the machine's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from portfwd.ssh.lean.kex import Proposal, proposal
from tests.conftest import need_binary, need_root
from tests.integration.peers import free_port
from tests.integration.processes import READY, Proc, portfwd_argv, started
from tests.integration.sshd import descendants, keygen
from tests.integration.test_status import Sink, send_all

pytestmark = [pytest.mark.integration, pytest.mark.root]
MiB = 1024 * 1024
FAILED = "key exchange failed"


# ---------------------------------------------------------------- raw SSH, before keys
def _packet(payload: bytes) -> bytes:
    """One SSH binary packet before keys (RFC 4253 §6): length, padding length, payload, padding."""
    padding = 8 - (5 + len(payload)) % 8
    padding += 8 if padding < 4 else 0
    return struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + bytes(padding)


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _kexinit(kex: str, cipher: str = "aes128-ctr") -> bytes:
    lists = [kex, "ssh-ed25519", *[cipher] * 2, *["hmac-sha2-256"] * 2, "none", "none", "", ""]
    return bytes([20]) + os.urandom(16) + b"".join(_string(n.encode()) for n in lists) + b"\0" + bytes(4)


def _disconnect(code: int, reason: bytes) -> bytes:
    return bytes([1]) + struct.pack(">I", code) + _string(reason) + _string(b"")


def _read_kexinit(peer: socket.socket) -> bytes:
    """The peer's version line, then its first packet (KEXINIT, in the clear): that payload."""
    data = b""
    while True:
        _, found, rest = data.partition(b"\r\n")
        length = int.from_bytes(rest[:4], "big")
        if found and len(rest) >= 4 and len(rest) >= 4 + length:
            body = rest[4 : 4 + length]
            return body[1 : -body[0]]  # less the padding length byte and the padding
        chunk = peer.recv(65536)
        assert chunk, f"the peer hung up before its KEXINIT: {data!r}"
        data += chunk


def server_first_choices(port: int) -> Proposal:
    """What the server offers first (kex, host key): read from its KEXINIT, then a polite goodbye."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
        peer.sendall(b"SSH-2.0-probe\r\n")
        offer = proposal(_read_kexinit(peer))
        peer.sendall(_packet(_disconnect(11, b"probe done")))  # by application: nothing to log
        while peer.recv(65536):
            pass
    return offer


def dbclient_first_choices(dbclient: str, key: Path, home: Path) -> Proposal:
    """What dbclient guesses (its first kex and host key), read from its KEXINIT."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(10)
        argv = [dbclient, "-y", "-i", str(key), "-p", str(listener.getsockname()[1]), "-N", "probe@127.0.0.1"]
        with started(argv, env={**os.environ, "HOME": str(home)}):
            peer, _ = listener.accept()
            with peer:
                peer.settimeout(10)
                peer.sendall(b"SSH-2.0-probe\r\n")
                offer = proposal(_read_kexinit(peer))
    assert offer.guess_follows, "dbclient no longer sends a guessed packet: these tests test nothing"
    return offer


# ---------------------------------------------------------------- processes
def listening(port: int) -> bool:
    """Is a TCP socket listening on 127.0.0.1:port? Read from /proc: no connection is made."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(f[1] == local and f[3] == "0A" for f in (line.split() for line in list(table)[1:]))


def wait_until_listening(port: int, proc: Proc, other: Proc, what: str, timeout: float = 15.0) -> None:
    """Bounded wait for `proc` to listen on `port`; fails at once, with both logs, if it exits."""
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"{what} never listened on {port} (exit {proc.popen.poll()}):\n{proc.output()}\n"
                f"--- its peer:\n{other.output()}"
            )
        time.sleep(0.02)


def through(port: int, size: int = 4 * MiB) -> None:
    """Send `size` random bytes into `port`; the Sink at the far end answers with their sha256."""
    data = os.urandom(size)
    answer: list[bytes] = []
    send_all(port, data, answer)
    assert answer == [hashlib.sha256(data).hexdigest().encode()]


def dropbear_key(path: Path) -> str:
    """A dropbear ed25519 key; returns its public line (`dropbearkey -y`)."""
    subprocess.run(
        ["dropbearkey", "-t", "ed25519", "-f", str(path)], check=True, capture_output=True, timeout=30
    )
    shown = subprocess.run(
        ["dropbearkey", "-y", "-f", str(path)], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    return next(line for line in shown.splitlines() if line.startswith("ssh-"))


class Server:
    """`portfwd server` on 127.0.0.1 with user alice, whose key is dbclient's."""

    def __init__(
        self, root: Path, *, host_key: str = "ssh-ed25519", narrowed: bool = False, fast: bool = True
    ) -> None:
        self.root = root
        self.port = free_port()
        self.key = root / "alice_dropbear"
        (root / "alice.keys").write_text(dropbear_key(self.key) + "\n")
        host = root / "host_key"
        if host_key != "ssh-ed25519":  # portfwd makes an ed25519 key itself; others are given
            asyncssh.generate_private_key(host_key, key_size=2048).write_private_key(str(host))
        (root / "server.toml").write_text(
            f'[control]\nsocket = "{root / "ctl.sock"}"\n'
            f'[server]\nlisten = "127.0.0.1:{self.port}"\nhost_key = "{host}"\n'
            + ('kex = ["curve25519-sha256"]\n' if narrowed else "")
            + f'[[server.user]]\nname = "alice"\nauthorized_keys = "{root / "alice.keys"}"\n'
            + 'permit_open = ["127.0.0.1:*"]\n'
        )
        args = ["server", "-c", str(root / "server.toml"), *([] if fast else ["--no-ssh-fast-path"])]
        self.proc = Proc(portfwd_argv(*args))
        self.proc.wait_for(READY)

    def stop(self) -> str:
        self.proc.stop()
        log = self.proc.output()
        self.proc.close()
        return log


@pytest.fixture
def sink() -> Iterator[Sink]:
    running = Sink().start()
    yield running
    running.close()


@pytest.mark.parametrize(
    ("host_key", "narrowed", "fast", "same_first"),
    [
        pytest.param("ssh-ed25519", False, True, (False, True), id="guess-wrong-by-kex"),
        pytest.param("ssh-ed25519", False, False, (False, True), id="guess-wrong-by-kex-fast-path-off"),
        pytest.param("ssh-rsa", True, True, (True, False), id="guess-wrong-by-host-key-only"),
        pytest.param("ssh-ed25519", True, True, (True, True), id="guess-right"),
    ],
)
def test_dbclient_forwards_through_portfwd_server(
    tmp_path: Path, sink: Sink, host_key: str, narrowed: bool, fast: bool, same_first: tuple[bool, bool]
) -> None:
    dbclient = need_binary("dbclient", "dropbear-bin")
    need_binary("dropbearkey", "dropbear-bin")
    server = Server(tmp_path, host_key=host_key, narrowed=narrowed, fast=fast)
    local = free_port()
    try:
        guess, offer = (
            dbclient_first_choices(dbclient, server.key, tmp_path),
            server_first_choices(server.port),
        )
        assert (guess.kex == offer.kex, guess.host_key == offer.host_key) == same_first, (guess, offer)
        argv = [dbclient, "-y", "-i", str(server.key), "-p", str(server.port), "-N"]
        argv += ["-L", f"127.0.0.1:{local}:127.0.0.1:{sink.port}", "alice@127.0.0.1"]
        with started(argv, env={**os.environ, "HOME": str(tmp_path)}) as client:
            wait_until_listening(local, client, server.proc, "dbclient -L")
            through(local)
    finally:
        log = server.stop()
    assert "logged in with key" in log, log
    assert FAILED not in log, log


def test_portfwd_ssh_forwards_through_a_dropbear_server(tmp_path: Path, sink: Sink) -> None:
    need_root()
    dropbear = need_binary("dropbear", "dropbear-bin")
    need_binary("unshare", "util-linux")
    port, local = free_port(), free_port()
    host_key = tmp_path / "dropbear_host"
    public = dropbear_key(host_key).split()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {public[0]} {public[1]}\n")
    home = tmp_path / "root"  # dropbear reads ~root/.ssh/authorized_keys; this stands in for /root
    (home / ".ssh").mkdir(mode=0o700, parents=True)
    home.chmod(0o700)
    user_key = tmp_path / "id_ed25519"
    (home / ".ssh" / "authorized_keys").write_text(keygen(user_key) + "\n")
    (home / ".ssh" / "authorized_keys").chmod(0o600)
    server = Proc(
        [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind "$1" /root && exec "$2" -F -E -s -p "127.0.0.1:{port}" -r "$3"',
            "dropbear", str(home), dropbear, str(host_key),
        ]
    )  # fmt: skip
    try:
        server.wait_for("Not backgrounding")
        wait_until_listening(port, server, server, "dropbear")
        argv = portfwd_argv(
            "ssh", "--control", str(tmp_path / "ctl.sock"), "-F", "/dev/null", "-i", str(user_key),
            "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-p", str(port),
            "-L", f"127.0.0.1:{local}:127.0.0.1:{sink.port}", "root@127.0.0.1",
        )  # fmt: skip
        with started(argv, ready=READY) as client:
            client.wait_for("connected to")
            through(local)
    finally:
        for pid in descendants(server.pid):  # the session dropbear forked, then dropbear
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.stop()
        log = server.output()
        server.close()
    assert "Pubkey auth succeeded for 'root'" in log, log


# ---------------------------------------------------------------- a failed key exchange is logged
def _peer(port: int, version: bytes, payload: bytes) -> None:
    """A raw SSH client: a version line, one packet, then read until the server hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(version + b"\r\n" + _packet(payload))
        while client.recv(65536):
            pass


def test_a_failed_key_exchange_is_one_line_naming_the_peer_and_the_reason(tmp_path: Path) -> None:
    need_binary("dropbearkey", "dropbear-bin")
    server = Server(tmp_path)
    try:
        _peer(server.port, b"SSH-2.0-nokex", _kexinit("no-such-kex@example.com"))
        line = server.proc.wait_for(FAILED)
        assert line.split(" INFO ", 1)[1].startswith("server: 127.0.0.1:"), line
        assert (
            "(version SSH-2.0-nokex): key exchange failed: No matching key exchange algorithm found" in line
        ), line
        # the peer's own text (its version, its DISCONNECT reason: 3, key exchange failed) stays on the line
        start = server.proc.mark()
        _peer(server.port, b"SSH-2.0-odd\x1b[31m", _disconnect(3, b"bye\nserver: forged\x1b[2J"))
        line = server.proc.wait_for(FAILED, start=start)
        assert r"(version SSH-2.0-odd\x1b[31m): key exchange failed: bye\nserver: forged\x1b[2J" in line, line
    finally:
        log = server.stop()
    assert not any(text.startswith("server: forged") for text in log.splitlines()), log
