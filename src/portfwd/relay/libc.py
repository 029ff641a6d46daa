"""libc calls that Python's os and socket modules lack, through ctypes, for the relays' hot paths.

shutdown(2) on a bare descriptor (splice.py) and recvmmsg/sendmmsg (mmsg.py). One place loads
libc and turns a failed call's errno into the OSError `os` itself would raise.
"""

from __future__ import annotations

import ctypes
import functools
import os
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
