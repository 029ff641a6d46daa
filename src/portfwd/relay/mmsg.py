"""Batched UDP I/O on Linux: many datagrams per recvmmsg(2) and sendmmsg(2), through ctypes.

Why: a UDP relay pays a system call, a bytes object and a trip through Python per datagram
per direction; under load that, not the kernel, is the ceiling. A `Batch` is one set of
preallocated message slots that the UDP forwarders of a process share (it is used only within
one reader callback, never across an await): a datagram is received into its slot and sent on
from that same slot, so the payload never becomes a Python object.

Slots are 64 KiB (every UDP datagram fits whole) in an anonymous mapping, so only pages the
kernel writes into become resident. Where libc lacks these calls `Batch.create()` returns None
and the forwarders keep their per-datagram path.
"""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import struct
import sys
from collections.abc import Callable
from typing import Any, Literal

from portfwd.relay import libc

#: Datagrams per system call.
SLOTS = 64
#: Bytes per slot: larger than any UDP payload (65507 over IPv4, 65527 over IPv6).
SLOT_SIZE = 65536
#: Bytes per source-address slot: a sockaddr_in6 is 28.
NAME_SIZE = 32
MSG_DONTWAIT = 0x40


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint32))


_HEADER = ctypes.sizeof(_Mmsghdr)
_IOVEC = ctypes.sizeof(_Iovec)
_Receive = Callable[[int, int, int, int, None], int]
_Send = Callable[[int, int, int, int], int]


def _libc_calls() -> tuple[_Receive, _Send] | None:
    """libc's recvmmsg and sendmmsg, or None where they cannot be reached."""
    receive = libc.function(
        "recvmmsg", (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
    )
    send = libc.function("sendmmsg", (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int))
    return (receive, send) if receive is not None and send is not None else None


class Batch:
    """Message slots for one recvmmsg and the sendmmsg calls that pass its datagrams on.

    After `receive(fd)` returns n, datagram i (< n) is `lengths(n)[i]` bytes in slot i, from
    the raw sockaddr at `sources(n)[i * NAME_SIZE:]`. `send(fd, start, lengths, name)` sends slots start..
    with those lengths, to `name` (a raw sockaddr the caller holds) or, with name None, to a
    connected socket's peer.
    """

    def __init__(self, calls: tuple[_Receive, _Send]) -> None:
        self._recvmmsg, self._sendmmsg = calls
        self._memory = mmap.mmap(-1, SLOTS * SLOT_SIZE)  # resident only where written
        self._anchor = ctypes.c_char.from_buffer(self._memory)
        slots = ctypes.addressof(self._anchor)
        self._names = (ctypes.c_char * (SLOTS * NAME_SIZE))()
        names = ctypes.addressof(self._names)
        self._rx_iov = (_Iovec * SLOTS)(*(_Iovec(slots + i * SLOT_SIZE, SLOT_SIZE) for i in range(SLOTS)))
        self._tx_iov = (_Iovec * SLOTS)(*(_Iovec(slots + i * SLOT_SIZE, 0) for i in range(SLOTS)))
        rx_iov, tx_iov = ctypes.addressof(self._rx_iov), ctypes.addressof(self._tx_iov)

        def headers(name: int | None, name_size: int, iov: int) -> ctypes.Array[_Mmsghdr]:
            return (_Mmsghdr * SLOTS)(
                *(
                    _Mmsghdr(
                        _Msghdr(
                            None if name is None else name + i * NAME_SIZE,
                            name_size,
                            iov + i * _IOVEC,
                            1,
                            None,
                            0,
                            0,
                        ),
                        0,
                    )
                    for i in range(SLOTS)
                )
            )

        self._rx = headers(names, NAME_SIZE, rx_iov)
        # The kernel writes lengths back into received headers; a fresh copy goes in before each call.
        self._rx_fresh = bytes(self._rx)
        self._rx_used = 0
        self._tx = headers(None, 0, tx_iov)  # to a connected socket's peer
        self._tx_to = headers(None, 0, tx_iov)  # to an address (replies from the listening socket)
        self._rx_at = ctypes.addressof(self._rx)
        self._tx_at = ctypes.addressof(self._tx)
        self._tx_to_at = ctypes.addressof(self._tx_to)
        self._tx_to_name: tuple[int, int] = (0, 0)  # (address, size) the reply headers point at
        self._lengths = _field(self._rx, "I", _Mmsghdr.msg_len.offset, _HEADER)
        self._names_view = memoryview(self._names).cast("B")
        self._tx_lengths = _field(self._tx_iov, "Q", _Iovec.iov_len.offset, _IOVEC)
        self._tx_to_names = _field(self._tx_to, "Q", _Msghdr.msg_name.offset, _HEADER)
        self._tx_to_namelens = _field(self._tx_to, "I", _Msghdr.msg_namelen.offset, _HEADER)

    @classmethod
    def create(cls) -> Batch | None:
        """A Batch, or None where recvmmsg/sendmmsg cannot be used (not 64-bit Linux)."""
        if ctypes.sizeof(ctypes.c_void_p) != 8 or not sys.platform.startswith("linux"):
            return None
        calls = _libc_calls()
        return cls(calls) if calls is not None else None

    def receive(self, fd: int) -> int:
        """Read up to SLOTS datagrams without blocking; 0 when none waits. Raises OSError."""
        if self._rx_used:
            ctypes.memmove(self._rx_at, self._rx_fresh, self._rx_used * _HEADER)
        count = self._recvmmsg(fd, self._rx_at, SLOTS, MSG_DONTWAIT, None)
        if count < 0:
            self._rx_used = SLOTS  # the kernel may have written some headers before failing
            error = libc.last_error()
            if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            raise error
        self._rx_used = count
        return count

    def lengths(self, count: int) -> list[int]:
        """The sizes of the first `count` received datagrams."""
        return self._lengths[:count].tolist()

    def sources(self, count: int) -> bytes:
        """The source sockaddrs of the first `count` datagrams, NAME_SIZE bytes apart.

        Datagram i's starts at i * NAME_SIZE: 16 bytes for a sockaddr_in, 28 for a sockaddr_in6.
        """
        return self._names_view[: count * NAME_SIZE].tobytes()

    def payload(self, index: int, length: int) -> bytes:
        """A copy of datagram `index`, for the slow paths that must keep it."""
        start = index * SLOT_SIZE
        return self._memory[start : start + length]

    def send(self, fd: int, start: int, lengths: list[int], name: ctypes.Array[ctypes.c_char] | None) -> int:
        """Send slots start.. (one per entry of `lengths`); how many went. Raises OSError.

        Fewer than asked means the next one failed; its error comes with the next call.
        """
        tx_lengths = self._tx_lengths
        index = start
        for length in lengths:
            tx_lengths[index] = length
            index += 1
        if name is None:
            at = self._tx_at
        else:
            # The headers keep pointing at the last client's address: its replies usually
            # come in runs. The kernel reads the address at the call, so a reused buffer is fine.
            target = (ctypes.addressof(name), len(name))
            if target != self._tx_to_name:
                self._tx_to_name = target
                self._tx_to_names[:] = _repeat("Q", target[0])
                self._tx_to_namelens[:] = _repeat("I", target[1])
            at = self._tx_to_at
        sent = self._sendmmsg(fd, at + start * _HEADER, len(lengths), MSG_DONTWAIT)
        if sent < 0:
            raise libc.last_error()
        return sent

    def send_all(
        self,
        fd: int,
        start: int,
        lengths: list[int],
        name: ctypes.Array[ctypes.c_char] | None,
        dropped: Callable[[OSError], None],
    ) -> int:
        """`send` until every slot went or was dropped; the bytes that went.

        A datagram the kernel refuses (full buffer, ICMP error) is dropped and told to
        `dropped`, and the rest still go: a UDP relay never retries.
        """
        went = 0
        while lengths:  # each pass sends at least one datagram or drops one
            try:
                sent = self.send(fd, start, lengths, name)
            except OSError as exc:
                dropped(exc)
                sent = 1
            else:
                went += sum(lengths[:sent])
            start += sent
            lengths = lengths[sent:]
        return went

    def close(self) -> None:
        """Unmap the slots; the Batch must not be used afterwards."""
        del self._anchor  # the last export of the mapping, which mmap.close() refuses while it lives
        self._memory.close()


def _field(array: ctypes.Array[Any], code: Literal["I", "Q"], offset: int, stride: int) -> memoryview:
    """One field of every element of a ctypes array, as a strided memoryview of `code` items."""
    size = struct.calcsize(code)
    return memoryview(array).cast("B").cast(code)[offset // size :: stride // size]


def _repeat(code: Literal["I", "Q"], value: int) -> memoryview:
    """SLOTS copies of `value` as `code` items, for a strided memoryview's slice assignment."""
    return memoryview(array.array(code, [value]) * SLOTS)
