"""relay/mmsg.py's Batch against real loopback UDP sockets, and the raw-sockaddr parser of libc.py."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterator

import pytest

from portfwd.relay.libc import sockaddr
from portfwd.relay.mmsg import NAME_SIZE, SLOTS, Batch


@pytest.fixture
def batch() -> Iterator[Batch]:
    made = Batch.create()
    if made is None:
        pytest.skip("recvmmsg/sendmmsg are not available here")
    yield made
    made.close()


def udp(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return sock


def test_nothing_waiting_is_zero(batch: Batch) -> None:
    listener = udp()
    assert batch.receive(listener.fileno()) == 0
    listener.close()


def test_receive_then_send_on_from_the_same_slots(batch: Batch) -> None:
    listener, client, target = udp(), udp(), udp()
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.connect(target.getsockname())
    sent = [os.urandom(size) for size in (1, 65507, 1400, 0, 9)]
    for datagram in sent:
        client.sendto(datagram, listener.getsockname())
    count = batch.receive(listener.fileno())
    assert count == len(sent)
    lengths = batch.lengths(count)
    assert lengths == [len(d) for d in sent]
    assert batch.payload(2, lengths[2]) == sent[2]
    sources = batch.sources(count)
    assert len(sources) == count * NAME_SIZE
    assert sockaddr(sources[:16]) == client.getsockname()
    assert batch.send(upstream.fileno(), 0, lengths, None) == count  # to the connected peer
    assert [target.recv(65536) for _ in sent] == sent
    name = ctypes.create_string_buffer(sources[:16], 16)
    assert batch.send(listener.fileno(), 1, lengths[1:], name) == count - 1  # back to the client
    assert [client.recv(65536) for _ in sent[1:]] == sent[1:]
    for sock in (listener, client, target, upstream):
        sock.close()


def test_more_than_one_batch_waits(batch: Batch) -> None:
    listener, client = udp(), udp()
    for index in range(SLOTS + 5):
        client.sendto(index.to_bytes(2, "big"), listener.getsockname())
    assert batch.receive(listener.fileno()) == SLOTS
    assert batch.payload(SLOTS - 1, 2) == (SLOTS - 1).to_bytes(2, "big")
    assert batch.receive(listener.fileno()) == 5
    assert batch.payload(0, 2) == SLOTS.to_bytes(2, "big")
    listener.close()
    client.close()


def test_a_refused_send_raises_with_its_errno(batch: Batch) -> None:
    listener, client, gone = udp(), udp(), udp()
    address = gone.getsockname()
    gone.close()  # nothing listens there now: ICMP port unreachable
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.connect(address)
    client.sendto(b"x", listener.getsockname())
    client.sendto(b"y", listener.getsockname())
    assert batch.receive(listener.fileno()) == 2
    assert batch.send(upstream.fileno(), 0, [1], None) == 1
    with pytest.raises(ConnectionRefusedError) as caught:  # OSError picks the subclass by errno
        batch.send(upstream.fileno(), 1, [1], None)  # the ICMP error of the first comes back now
    assert caught.value.errno == errno.ECONNREFUSED
    for sock in (listener, client, upstream):
        sock.close()


def test_ipv6_source_parses_like_recvfrom(batch: Batch) -> None:
    try:
        listener, client = udp("::1"), udp("::1")
    except OSError:
        pytest.skip("no IPv6 on loopback")
    client.sendto(b"v6", listener.getsockname())
    assert batch.receive(listener.fileno()) == 1
    assert sockaddr(batch.sources(1)[:28]) == client.getsockname()
    listener.close()
    client.close()


def test_send_all_drops_a_refused_datagram_and_sends_the_rest(batch: Batch) -> None:
    listener, client, gone = udp(), udp(), udp()
    address = gone.getsockname()
    gone.close()
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.connect(address)
    for datagram in (b"a", b"bb", b"ccc"):
        client.sendto(datagram, listener.getsockname())
    assert batch.receive(listener.fileno()) == 3
    assert batch.send(upstream.fileno(), 0, [1], None) == 1  # answered by ICMP port unreachable
    dropped: list[int | None] = []
    went = batch.send_all(upstream.fileno(), 1, [2, 3], None, lambda exc: dropped.append(exc.errno))
    assert dropped == [errno.ECONNREFUSED]
    assert went == 3  # "bb" took the pending error; "ccc" went
    for sock in (listener, client, upstream):
        sock.close()
