"""RFC 4253 §7 for a guessed first key-exchange packet (portfwd/ssh/lean/kex.py): bytes in, verdicts out.

The server tests run asyncssh on 127.0.0.1 and play dbclient's part in raw bytes: version,
KEXINIT with first_kex_packet_follows, the guessed KEX_ECDH_INIT, and (when the guess is
wrong) the real one, all in one write, so the guess waits in asyncssh's buffer while the
KEXINIT is handled. Without the fix asyncssh answers the wrong guess and then refuses the
real packet ("Key exchange not in progress"): that test fails once asyncssh gets it right,
and says so.
"""

from __future__ import annotations

import asyncio
import os
import struct

import asyncssh
import pytest

from portfwd.ssh import lean
from portfwd.ssh.lean.kex import Proposal, guess_is_wrong, proposal

DBCLIENT_KEX = (
    "curve25519-sha256",
    "ecdh-sha2-nistp256",
    "kexguess2@matt.ucc.asn.au",
    "kex-strict-c-v00@openssh.com",
)
DBCLIENT_HOST_KEYS = ("ssh-ed25519", "rsa-sha2-256")


def _names(names: tuple[str, ...] | list[str]) -> bytes:
    text = ",".join(names).encode()
    return struct.pack(">I", len(text)) + text


def kexinit(kex: tuple[str, ...], host_keys: tuple[str, ...], *, follows: bool) -> bytes:
    lists = [kex, host_keys, *[("aes128-ctr",)] * 2, *[("hmac-sha2-256",)] * 2, ("none",), ("none",), (), ()]
    return bytes([20]) + os.urandom(16) + b"".join(map(_names, lists)) + bytes([follows]) + bytes(4)


def packet(payload: bytes) -> bytes:
    """One SSH binary packet before keys (RFC 4253 §6)."""
    padding = 8 - (5 + len(payload)) % 8
    padding += 8 if padding < 4 else 0
    return struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + bytes(padding)


# ---------------------------------------------------------------- the verdict
def test_a_proposal_is_read_from_a_kexinit() -> None:
    payload = kexinit(DBCLIENT_KEX, DBCLIENT_HOST_KEYS, follows=True)
    assert proposal(payload) == Proposal(b"curve25519-sha256", b"ssh-ed25519", True)


@pytest.mark.parametrize(
    ("ours", "wrong"),
    [
        pytest.param((("curve25519-sha256", "mlkem768x25519-sha256"), ("ssh-ed25519",)), False, id="right"),
        pytest.param(
            (("mlkem768x25519-sha256", "curve25519-sha256"), ("ssh-ed25519",)), True, id="kex-differs"
        ),
        pytest.param((("curve25519-sha256",), ("rsa-sha2-256", "ssh-ed25519")), True, id="host-key-differs"),
    ],
)
def test_the_guess_is_right_only_when_both_first_choices_match(
    ours: tuple[tuple[str, ...], tuple[str, ...]], wrong: bool
) -> None:
    peer = kexinit(DBCLIENT_KEX, DBCLIENT_HOST_KEYS, follows=True)
    assert guess_is_wrong(peer, kexinit(*ours, follows=False)) is wrong


def test_no_guess_no_verdict() -> None:
    peer = kexinit(DBCLIENT_KEX, DBCLIENT_HOST_KEYS, follows=False)
    assert guess_is_wrong(peer, kexinit(("mlkem768x25519-sha256",), ("ssh-ed25519",), follows=False)) is None


# ---------------------------------------------------------------- the fence
def test_fix_stands_aside_on_another_asyncssh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean, "installed_asyncssh", lambda: "2.99.0")
    lean.verified.cache_clear()
    try:

        class Connection:
            _packet_handlers = "asyncssh's own"

        conn = Connection()
        assert lean.fix(conn) is False
        assert conn._packet_handlers == "asyncssh's own"
    finally:
        lean.verified.cache_clear()


def test_fix_leaves_anything_but_an_asyncssh_connection_alone() -> None:
    assert lean.fix(object()) is False


def test_fix_is_not_the_fast_path() -> None:
    """The fast path's off switch does not reach the fix: `fix` has no switch to pass."""
    assert lean.fast_path(False).on is False
    assert lean.verified() is True, "asyncssh is not a VERIFIED release: see test_lean_fence.py"


# ---------------------------------------------------------------- asyncssh, dbclient's bytes
class _Recorder(asyncssh.SSHServer):
    def __init__(self, fixed: bool, lost: asyncio.Future[Exception | None]) -> None:
        self.fixed = fixed
        self.lost = lost

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        if self.fixed:
            assert lean.fix(conn) is True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@pytest.fixture
def ed25519() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


async def _exchange(
    host_key: asyncssh.SSHKey, *, fixed: bool, guess_right: bool, narrowed: bool = False
) -> tuple[list[int], Exception | None]:
    """Play dbclient's opening against an asyncssh server; the packet types it sent, and how it ended.

    `narrowed`: the server's kex list is dbclient's first choice alone (else asyncssh's default,
    which starts with mlkem768x25519-sha256).
    """
    lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
    options = {"kex_algs": ["curve25519-sha256"]} if narrowed else {}
    acceptor = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        server_factory=lambda: _Recorder(fixed, lost),
        **options,
    )
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", acceptor.get_port())
            init = packet(bytes([30]) + struct.pack(">I", 32) + os.urandom(32))  # KEX_ECDH_INIT
            writer.write(
                b"SSH-2.0-dropbear_2022.83\r\n"
                + packet(kexinit(DBCLIENT_KEX, DBCLIENT_HOST_KEYS, follows=True))
                + init  # the guess
                + (b"" if guess_right else init)  # dbclient's second one, after the server's KEXINIT
            )
            await reader.readline()  # the server's version
            sent: list[int] = []
            while 21 not in sent:  # up to NEWKEYS: everything before it is in the clear
                length = int.from_bytes(await reader.readexactly(4), "big")
                sent.append((await reader.readexactly(length))[1])
            writer.close()
            return sent, await lost
    finally:
        acceptor.close()
        await acceptor.wait_closed()


@pytest.mark.parametrize("kind", ["kex", "host-key"])
async def test_a_wrong_guess_is_ignored_and_the_real_packet_answered(
    kind: str, ed25519: asyncssh.SSHKey
) -> None:
    if kind == "kex":  # asyncssh's first kex is not dbclient's
        sent, ended = await _exchange(ed25519, fixed=True, guess_right=False)
    else:  # the same first kex, but an RSA host key: asyncssh alone never looked at host keys
        rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
        sent, ended = await _exchange(rsa, fixed=True, guess_right=False, narrowed=True)
    assert sent == [20, 31, 21]  # KEXINIT, KEX_ECDH_REPLY (to the real packet), NEWKEYS
    assert isinstance(ended, asyncssh.ConnectionLost), ended  # we hung up; asyncssh had no complaint


async def test_a_right_guess_is_answered(ed25519: asyncssh.SSHKey) -> None:
    sent, ended = await _exchange(ed25519, fixed=True, guess_right=True, narrowed=True)
    assert sent == [20, 31, 21]
    assert isinstance(ended, asyncssh.ConnectionLost), ended


@pytest.mark.parametrize("kind", ["kex", "host-key"])
async def test_asyncssh_alone_still_takes_the_wrong_guess(kind: str, ed25519: asyncssh.SSHKey) -> None:
    if kind == "kex":
        _, ended = await _exchange(ed25519, fixed=False, guess_right=False)
    else:
        rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
        _, ended = await _exchange(rsa, fixed=False, guess_right=False, narrowed=True)
    assert isinstance(ended, asyncssh.ProtocolError), ended
    assert ended.reason == "Key exchange not in progress", (
        f"asyncssh {lean.installed_asyncssh()} now ends this way: {ended!r}; if it ignores a wrong "
        "guess itself, portfwd/ssh/lean/kex.py may be dropped"
    )


# ------------------------------------------------ finish_kexinit_first: the peer's last word first
class _Conn:
    """The attributes finish_kexinit_first reads, and a record of asyncssh's connection_lost."""

    def __init__(self, *, rekey: bool = False) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._kex_complete = False
        self._recv_encryption = object() if rekey else None
        self.lost: list[Exception | None] = []

    def connection_lost(self, exc: Exception | None = None) -> None:
        self.lost.append(exc)


async def test_a_hang_up_waits_for_the_packet_task_already_running() -> None:
    from portfwd.ssh.lean.kex import finish_kexinit_first

    conn = _Conn()
    assert finish_kexinit_first(conn)
    release = asyncio.Event()
    task = asyncio.get_running_loop().create_task(release.wait())  # type: ignore[arg-type]
    conn._tasks.add(task)  # type: ignore[arg-type]
    conn.connection_lost(None)  # eof_received
    conn.connection_lost(None)  # the transport's own call right after
    await asyncio.sleep(0)
    assert conn.lost == [], "held while the KEXINIT task runs"
    release.set()
    await task
    conn._tasks.discard(task)  # type: ignore[arg-type]
    for _ in range(3):
        await asyncio.sleep(0)
    assert conn.lost == [None], "then reported once"


async def test_a_rekey_or_an_error_is_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    from portfwd.ssh.lean import kex

    never = asyncio.get_running_loop().create_future()
    rekey = _Conn(rekey=True)
    assert kex.finish_kexinit_first(rekey)
    rekey._tasks.add(never)  # type: ignore[arg-type]
    rekey.connection_lost(None)
    assert rekey.lost == [None], "after the first key exchange a hang-up is a lost link, at once"
    failed = _Conn()
    kex.finish_kexinit_first(failed)
    failed._tasks.add(never)  # type: ignore[arg-type]
    error = OSError("reset")
    failed.connection_lost(error)
    assert failed.lost == [error]
    # a task that never ends holds the hang-up HOLD seconds at most
    monkeypatch.setattr(kex, "HOLD", 0.05)
    stuck = _Conn()
    reported = asyncio.Event()
    record = stuck.connection_lost

    def noted(exc: Exception | None = None) -> None:
        record(exc)
        reported.set()

    stuck.connection_lost = noted  # type: ignore[method-assign]
    kex.finish_kexinit_first(stuck)
    stuck._tasks.add(never)  # type: ignore[arg-type]
    stuck.connection_lost(None)
    async with asyncio.timeout(5):
        await reported.wait()
    assert stuck.lost == [None]
    never.cancel()
