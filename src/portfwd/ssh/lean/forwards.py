"""Be ready for a `-R`'s connections before asking for it, as OpenSSH's ssh is.

asyncssh registers a remote listener (`_remote_listeners`) only when the coroutine that sent
`tcpip-forward` resumes after the server's REQUEST_SUCCESS. The server binds the port before it
answers, and the `forwarded-tcpip` channel opens for connections that arrive meanwhile are read
in the same receive pass as the answer, before that coroutine runs: asyncssh refuses them
("No such listener") and the clients are reset. So a stand-in listener with the same session
factory is put in place before the request; asyncssh's own replaces it when the request
succeeds, and `undo` takes it out when it fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asyncssh.listener import SSHTCPClientListener, SSHUNIXClientListener


def expect(
    conn: Any,
    factory: Callable[..., Any],
    host: str | None,
    port: int,
    path: str | None,
    window: int,
    packet: int,
) -> Callable[[], None]:
    """Register a stand-in listener on `conn` for (host, port) or `path`; returns its undo."""
    listener: Any
    if path is not None:
        key: Any = path
        listener = SSHUNIXClientListener(conn, factory, path, None, "strict", window, packet)
    else:
        assert host is not None
        key = (host.lower(), port)  # as create_server keys it
        listener = SSHTCPClientListener(conn, factory, host.lower(), port, None, "strict", window, packet)
    table: dict[Any, Any] = conn._remote_listeners
    if key in table:  # someone's already: leave it
        return lambda: None
    table[key] = listener

    def undo() -> None:
        if table.get(key) is listener:
            del table[key]

    return undo
