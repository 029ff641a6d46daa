"""Reading the PROXY header a load balancer in front sends (`accept_proxy_protocol = true`).

The header is read with MSG_PEEK and then taken off the socket to its last byte, so the
client's own first bytes (often in the same segment) stay in the kernel for the relay, splice
path included, exactly as if no header had come. The parsing is proto/proxy.py's (sans-IO).
Only for rules that ask for it: one peek and one read per connection, and a reader registered
only while a header is incomplete.
"""

from __future__ import annotations

import asyncio
import socket

from portfwd.proto.proxy import V2_MAX_LENGTH, Header, ProxyError, Reader

#: The most a header can take: v2's 16 fixed bytes and its largest address block (v1 is 107).
PEEK = 16 + V2_MAX_LENGTH


async def read_header(loop: asyncio.AbstractEventLoop, fd: int) -> Header:
    """Read one PROXY header from the non-blocking socket `fd`, and nothing after it.

    Raises ProxyError (not a header, or the sender closed first) or OSError.
    """
    sock = socket.socket(fileno=fd)
    try:
        seen = b""  # header bytes already taken off the socket (a header that came in pieces)
        while True:
            try:
                data = sock.recv(PEEK - len(seen), socket.MSG_PEEK)
            except BlockingIOError:
                await _readable(loop, fd)
                continue
            if not data:
                raise ProxyError("the sender closed before its PROXY header ended")
            reader = Reader()
            found = reader.feed(seen + data)
            if found is not None:
                sock.recv(len(data) - len(reader.rest))  # the rest of the header; peeked, so there
                return found
            sock.recv(len(data))  # all of it is header so far: take it, wait for the rest
            seen += data
            await _readable(loop, fd)
    finally:
        sock.detach()  # the descriptor stays the caller's


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:  # may fire again before the waiter runs
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
