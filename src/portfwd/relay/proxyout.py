"""The PROXY header portfwd sends a backend first (`proxy_protocol = "v1" | "v2"`).

The counterpart of proxyin.py: what a client connected to and from, as the header names it, and
its one send on a just-connected upstream. The header's bytes are proto/proxy.py's (sans-IO).
Paid once a connection, only by rules that ask for it (bench/RESULTS.md, D19, D20, D24).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

from portfwd.addr import Endpoint, HostPorts
from portfwd.proto.proxy import header


def listening_address(listen: Endpoint, port: int | None) -> tuple[str, int] | None:
    """The address every client of this listening port reaches, when the listen address alone
    says it: one IP literal (not the wildcard, not a name, no scope). Then a PROXY header needs
    no getsockname() a client (bench/RESULTS.md, D24); None: ask the socket."""
    if not isinstance(listen, HostPorts) or listen.is_any or "%" in listen.host:
        return None
    try:
        address = ipaddress.ip_address(listen.host)
    except ValueError:  # a host name: it may stand for several addresses
        return None
    if address.is_unspecified:
        return None
    return (str(address), port if port is not None else listen.ports.first)


def proxy_header(version: int, client: int, peer: Any, local: tuple[str, int] | None = None) -> bytes:
    """The PROXY header (v1 or v2) for a client descriptor: its address, and the address it
    reached: `local` when the listener's own address says it (one IP, one port), else the
    accepted socket's own (a getsockname); a Unix client: no addresses."""
    if not isinstance(peer, tuple):
        return header(version, None, None)
    if local is not None:
        return header(version, (str(peer[0]), int(peer[1])), local)
    borrowed = socket.socket(fileno=client)
    try:
        local = borrowed.getsockname()
    except OSError:
        return header(version, None, None)
    finally:
        borrowed.detach()  # the descriptor stays the caller's
    return header(version, (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])))


#: The most of a client's first bytes that go in one send with the PROXY header.
FIRST_BYTES = 4096


def first_bytes(client: int) -> bytes:
    """What the client sent while its upstream connected (up to FIRST_BYTES; b"" if nothing
    yet), to go in one segment with the PROXY header: a client that speaks first (HTTP, TLS)
    has usually sent its request by then, and a header of its own would cost a send and a TCP
    segment more (bench/RESULTS.md, D20). A backend that speaks first gets the header alone,
    at once: nothing waits for the client. An end of stream read here is read again by the
    relay (it stays); a reset read here ends the session as a close."""
    try:
        return os.read(client, FIRST_BYTES)
    except OSError:  # BlockingIOError: nothing yet
        return b""


def send_header(upstream: socket.socket, data: bytes) -> bool:
    """Send the PROXY header (and the client's first bytes) on a just-connected upstream. Its
    send buffer is empty and far larger than this, so it goes in one call; False (the session
    is given up) if the kernel took less."""
    try:
        return upstream.send(data) == len(data)
    except OSError:
        return False
