"""libc calls that Python's os and socket modules lack, through ctypes, for the relays' hot paths.

shutdown(2) on a bare descriptor (splice.py), accept4(2) straight to a descriptor (listener.py)
and recvmmsg/sendmmsg (mmsg.py). One place loads libc, turns a failed call's errno into the
OSError `os` itself would raise, and reads the raw socket addresses these calls fill in.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import sys
from typing import Any


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def function(name: str, argtypes: tuple[Any, ...]) -> Any | None:
    """libc's `name`, taking `argtypes` and returning a C int; None where it cannot be reached.

    Callers keep their own fallback for None (another platform, or a libc without `name`).
    """
    libc = _libc()
    call = getattr(libc, name, None) if libc is not None else None
    if call is None:
        return None
    call.argtypes = argtypes
    call.restype = ctypes.c_int
    return call


def last_error() -> OSError:
    """The error a libc call from `function` left in errno, as os raises it (by errno, the
    subclass: ConnectionRefusedError for ECONNREFUSED, BlockingIOError for EAGAIN...)."""
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code))


def sockaddr(raw: bytes) -> Any:
    """A raw sockaddr as the address Python's socket module would give for it.

    sockaddr_in: (host, port); sockaddr_in6: (host, port, flowinfo, scope_id); sockaddr_un: the
    path ("" for an unnamed client, which is what Unix clients usually are).
    """
    family = int.from_bytes(raw[:2], sys.byteorder)
    if family == socket.AF_INET:
        return sockaddr_in(raw)
    if family == socket.AF_INET6:
        port = int.from_bytes(raw[2:4], "big")
        flowinfo = int.from_bytes(raw[4:8], "big")
        scope = int.from_bytes(raw[24:28], sys.byteorder)  # host order, unlike the rest
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope
    return os.fsdecode(raw[2:].split(b"\0", 1)[0])


def sockaddr_in(raw: bytes | memoryview) -> tuple[str, int]:
    """A raw sockaddr_in as (host, port). Also read in place, from a memoryview over the buffer
    accept4(2) filled, by the accept loop of an IPv4 listener (its hot path)."""
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), raw[2] << 8 | raw[3]
