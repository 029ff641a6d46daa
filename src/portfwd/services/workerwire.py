"""The link between the main process and a worker (`workers = N`): two socket pairs.

- `orders` (SOCK_SEQPACKET, main to worker): one pickled dict a message, with the listening
  sockets it hands over as SCM_RIGHTS (at most FDS_PER_MESSAGE a message; more are sent in
  `fds` messages first). Orders are small; a sequenced packet socket keeps their edges and the
  descriptors with the message they belong to.
- `answers` (SOCK_STREAM, worker to main): length-prefixed JSON frames. A status snapshot can
  be megabytes (many live sessions), more than one datagram of a packet socket may carry.

Pickle is safe here: both ends are this program, the pair is made by the main process and
inherited by its own child; nothing else can reach it.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import socket
import struct
from typing import Any

#: SCM_MAX_FD is 253; stay under it.
FDS_PER_MESSAGE = 200
#: The largest order (pickled rules are a few KiB each); a bigger one is split by rule.
MAX_ORDER = 1 << 20
_FRAME = struct.Struct("!I")
#: The largest answer frame (a snapshot of very many sessions).
MAX_ANSWER = 256 << 20


def pairs() -> tuple[tuple[socket.socket, socket.socket], tuple[socket.socket, socket.socket]]:
    """(orders main end, orders worker end), (answers main end, answers worker end)."""
    orders = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    answers = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (*orders, *answers):
        sock.set_inheritable(False)
    orders[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_ORDER)
    return orders, answers


def send_order(sock: socket.socket, order: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one order (blocking, bounded by the socket's timeout); descriptors go first in
    `fds` orders of FDS_PER_MESSAGE when there are more than fit with it."""
    fds = list(fds or ())
    while len(fds) > FDS_PER_MESSAGE:
        chunk, fds = fds[:FDS_PER_MESSAGE], fds[FDS_PER_MESSAGE:]
        socket.send_fds(sock, [pickle.dumps({"op": "fds"})], chunk)
    data = pickle.dumps(order)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive_order(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One order and its descriptors (non-blocking socket: None when none waits). Raises
    EOFError when the main process is gone."""
    try:
        data, fds, _, _ = socket.recv_fds(sock, MAX_ORDER, FDS_PER_MESSAGE)
    except BlockingIOError:
        return None
    if not data:
        raise EOFError("the main process closed the link")
    order = pickle.loads(data)  # our own parent, over a pair it made
    assert isinstance(order, dict)
    return order, list(fds)


def frame(answer: dict[str, Any]) -> bytes:
    """An answer as one length-prefixed JSON frame."""
    data = json.dumps(answer, separators=(",", ":")).encode()
    return _FRAME.pack(len(data)) + data


async def read_answer(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next answer frame. Raises EOFError (asyncio.IncompleteReadError) when the worker is gone."""
    (size,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    if size > MAX_ANSWER:
        raise ValueError(f"an answer of {size} bytes is more than {MAX_ANSWER}")
    answer = json.loads(await reader.readexactly(size))
    assert isinstance(answer, dict)
    return answer
