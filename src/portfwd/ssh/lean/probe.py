"""Is the other end of an SSH connection still there? One keepalive round trip, bounded in time.

asyncssh has keepalives of its own (`keepalive_interval`), but no public call that asks once,
now, and says whether an answer came. The tunnel server needs exactly that before it takes a
`-R` port from a session that looks stale: OpenSSH's clients answer a `keepalive@openssh.com`
global request (with REQUEST_FAILURE, which counts: an answer is an answer), so a session that
answers within the bound is alive and keeps its port.

The request goes through asyncssh's `_make_global_request`, which queues the reply waiter in
order with any other global request, as asyncssh's own keepalive does.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def answers(conn: Any, within: float) -> bool:
    """True when `conn`'s peer answers a keepalive request within `within` seconds."""
    try:
        async with asyncio.timeout(within):
            await conn._make_global_request(b"keepalive@openssh.com")
    except (TimeoutError, OSError, ConnectionError):
        return False
    return bool(conn._transport)  # a connection closed meanwhile answers with a stand-in failure
