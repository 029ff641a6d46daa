"""A peer's guessed first key-exchange packet, ignored when RFC 4253 §7 says the guess was wrong.

A side may send its first key-exchange packet (dropbear's `dbclient` sends its
`KEX_ECDH_INIT`) right behind its KEXINIT, before it has seen the other side's, and say so
with `first_kex_packet_follows`. RFC 4253 §7: the guess is wrong when the two sides' *first*
key exchange or *first* host key algorithms differ ("server and client have different
preferred algorithm"); a wrong guess MUST be ignored, and the guessing side then sends the
right packet. OpenSSH (`kex.c`, `proposals_match`) and dropbear (`buf_match_algo`, unless
both sides offer `kexguess2@matt.ucc.asn.au`) decide it that way.

asyncssh (2.24, `SSHConnection._process_kexinit`) decides it differently: it ignores the
guess only when the key exchange it *chose* is not the peer's first, and never looks at host
key algorithms. Its server picks the client's first algorithm it supports, so against
dbclient (first `curve25519-sha256`, while asyncssh's own first is `mlkem768x25519-sha256`)
it took a guess dbclient itself had written off: it answered the guessed packet, sent NEWKEYS,
and then met dbclient's second `KEX_ECDH_INIT` with "Key exchange not in progress". A guess
that is wrong only by host key algorithm (an RSA host key, say) went the same way.

`fix(conn)` gives one connection its own copy of asyncssh's packet-handler table with
KEXINIT wrapped: asyncssh's handler runs unchanged, then, if the peer said a guess follows,
the wrapper sets asyncssh's `_ignore_first_kex` by the RFC's rule, comparing the first two
name-lists of the peer's KEXINIT with those of the one this side sent (both kept by asyncssh
as sent and received). asyncssh's receive loop holds every later packet until the KEXINIT
handler's task has finished, so the guessed packet is always judged after the flag is set,
and its own receive path does the ignoring (`_recv_packet`, "ignored first kex"). Nothing
else changes, on this connection or any other. It must be installed before the peer's KEXINIT
arrives: a server in `connection_made`, a client in its `SSHClient.connection_made`.

`finish_kexinit_first(conn)` mends a second ordering: asyncssh handles KEXINIT in a task, but an
end of stream at once. A peer that refuses the negotiation sends its KEXINIT and hangs up (sshd
with no cipher in common); both often arrive in one read, and the connection was reported
"Connection lost" before the KEXINIT task could say "No matching encryption algorithm found".
Until the key exchange completes, a clean end of stream now waits (at most `HOLD` seconds) for
the packet tasks already running, so the peer's last word is the one reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_KEXINIT
from asyncssh.packet import PacketDecodeError, SSHPacket

_Handler = Callable[[Any, int, int, SSHPacket], Awaitable[None]]
#: asyncssh's KEXINIT handler, the one this wraps; on any other asyncssh, nothing is installed.
_PROCESS_KEXINIT: _Handler | None = getattr(SSHConnection, "_process_kexinit", None)
#: What the wrapper reads and writes on the connection; without all of them it stays off.
_STATE = ("_client_kexinit", "_ignore_first_kex", "_packet_handlers", "_server_kexinit", "is_server")


class Proposal(NamedTuple):
    """What RFC 4253 §7 judges a guess by, read from one KEXINIT."""

    kex: bytes  # the first key exchange algorithm
    host_key: bytes  # the first server host key algorithm
    guess_follows: bool  # first_kex_packet_follows


def proposal(payload: bytes) -> Proposal:
    """Read a KEXINIT payload (its message type byte first). Raises PacketDecodeError."""
    packet = SSHPacket(payload)
    if packet.get_byte() != MSG_KEXINIT:
        raise PacketDecodeError("not a KEXINIT")
    packet.get_bytes(16)  # cookie
    kex = packet.get_namelist()
    host_key = packet.get_namelist()
    for _ in range(8):  # ciphers, MACs, compression (each way), languages (each way)
        packet.get_namelist()
    return Proposal(kex[0] if kex else b"", host_key[0] if host_key else b"", packet.get_boolean())


def guess_is_wrong(peer: bytes, ours: bytes) -> bool | None:
    """Is the peer's guessed packet to be ignored? None when it sent no guess.

    RFC 4253 §7: wrong unless both sides' first key exchange and first host key algorithms
    are the same. Raises PacketDecodeError on a payload that is not a whole KEXINIT.
    """
    theirs = proposal(peer)
    if not theirs.guess_follows:
        return None
    mine = proposal(ours)
    return (theirs.kex, theirs.host_key) != (mine.kex, mine.host_key)


def _judging_guess(process_kexinit: _Handler) -> _Handler:
    async def process(conn: Any, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        await process_kexinit(conn, pkttype, pktid, packet)
        # asyncssh kept both KEXINITs: the peer's as received, ours as sent (this one or earlier)
        if conn.is_server():
            peer, ours = conn._client_kexinit, conn._server_kexinit
        else:
            peer, ours = conn._server_kexinit, conn._client_kexinit
        wrong = guess_is_wrong(peer, ours)
        if wrong is not None and wrong != conn._ignore_first_kex:
            conn.logger.debug1(
                "Peer's guessed key exchange packet: %s (RFC 4253 section 7: first choices %s)",
                "ignored" if wrong else "used",
                "differ" if wrong else "match",
            )
            conn._ignore_first_kex = wrong

    return process


_JUDGED = None if _PROCESS_KEXINIT is None else _judging_guess(_PROCESS_KEXINIT)


def fix(conn: Any) -> bool:
    """Judge the peer's guessed first key-exchange packet by RFC 4253 §7 on this connection.

    Call it before the peer's KEXINIT can arrive (`connection_made`). Returns False, leaving
    the connection as it is, when it is not the asyncssh connection this was written for.
    """
    handlers = getattr(type(conn), "_packet_handlers", None)
    if (
        _JUDGED is None
        or not isinstance(conn, SSHConnection)
        or not all(hasattr(conn, name) for name in _STATE)
        or not isinstance(handlers, dict)
        or handlers.get(MSG_KEXINIT) is not _PROCESS_KEXINIT
    ):
        return False
    conn._packet_handlers = {**handlers, MSG_KEXINIT: _JUDGED}
    return True


#: The longest a clean end of stream waits for a KEXINIT task (it needs no network round trip).
HOLD = 2.0


def finish_kexinit_first(conn: Any) -> bool:
    """Report a peer's hang-up during the first key exchange only after the packets it sent
    before it were handled (see the module docstring). Rekeys are left alone: by then the link
    worked, and a hang-up is a lost link. False, leaving `conn` as it is, on another asyncssh."""
    original = getattr(conn, "connection_lost", None)
    tasks = getattr(conn, "_tasks", None)
    if (
        not callable(original)
        or not isinstance(tasks, set)
        or not hasattr(conn, "_kex_complete")
        or not hasattr(conn, "_recv_encryption")
    ):
        return False
    held = False

    def connection_lost(exc: Exception | None = None) -> None:
        nonlocal held
        if held:  # the transport's own call after eof_received: the first one is waiting
            return
        # Every task still in the set: one that has just failed is done, but its done callbacks
        # (asyncssh's `_reap_task`, which reports its error and takes it out) have yet to run.
        pending = list(tasks)
        first = not conn._kex_complete and conn._recv_encryption is None
        if exc is not None or not first or not pending:
            original(exc)
            return
        held = True
        loop = asyncio.get_running_loop()

        def finish(*_: object) -> None:
            nonlocal held
            if held:
                held = False
                timer.cancel()
                original(None)  # a no-op when a task already closed it with its own error

        timer = loop.call_later(HOLD, finish)
        asyncio.gather(*pending, return_exceptions=True).add_done_callback(finish)

    conn.connection_lost = connection_lost
    return True
