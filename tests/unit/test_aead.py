"""tunnel/aead.py against asyncssh's own packet ciphers: the same wire bytes, the same refusals."""

from __future__ import annotations

import pytest
from asyncssh.encryption import get_encryption
from hypothesis import given, settings
from hypothesis import strategies as st

from portfwd.ssh.lean.aead import SMALL, FastChacha, FastGcm, chacha_available
from portfwd.ssh.lean.packets import _faster

ALGS = {
    b"aes128-gcm@openssh.com": (16, 12, 16, FastGcm),
    b"aes256-gcm@openssh.com": (32, 12, 16, FastGcm),
    b"chacha20-poly1305@openssh.com": (64, 0, 8, FastChacha),
}


def pair(alg: bytes, key: bytes, iv: bytes) -> tuple[object, object]:
    """asyncssh's encryption object and the one `_faster` swaps in for it."""
    theirs = get_encryption(alg, key, iv, b"", b"", False)
    ours = _faster(get_encryption(alg, key, iv, b"", b"", False))
    return theirs, ours


def test_chacha_runs_here() -> None:
    """CI has libcrypto 3 and libsodium: the fast ChaCha20-Poly1305 must not silently fall back."""
    assert chacha_available()
    assert FastChacha(bytes(64))._sodium is not None


@pytest.mark.parametrize("alg", sorted(ALGS))
def test_swapped_for_the_stateful_cipher(alg: bytes) -> None:
    keylen, ivlen, _, kind = ALGS[alg]
    _, ours = pair(alg, bytes(range(keylen)), bytes(ivlen))
    assert type(ours) is kind


def test_other_ciphers_are_left_alone() -> None:
    enc = get_encryption(b"aes128-ctr", bytes(16), bytes(16), b"hmac-sha2-256", bytes(32), False)
    assert _faster(enc) is enc


@settings(max_examples=150, deadline=None)
@given(
    alg=st.sampled_from(sorted(ALGS)),
    key=st.binary(min_size=64, max_size=64),
    iv=st.binary(min_size=12, max_size=12),
    start=st.integers(0, 2**32 - 1),
    packets=st.lists(
        st.binary(max_size=3000) | st.integers(SMALL - 40, 40_000).map(bytes), min_size=1, max_size=4
    ),
    flip=st.integers(0, 10_000),
    sodium=st.booleans(),
)
def test_same_bytes_both_ways(
    alg: bytes, key: bytes, iv: bytes, start: int, packets: list[bytes], flip: int, sodium: bool
) -> None:
    """Sequence numbers and GCM counters advance alike; a flipped bit fails the tag in both.

    ChaCha20-Poly1305 packets up to SMALL go through libsodium, larger ones through OpenSSL;
    without libsodium (`sodium` false) all go through OpenSSL.
    """
    keylen, ivlen, block, _ = ALGS[alg]
    key, iv = key[:keylen], iv[:ivlen]
    send_theirs, send_ours = pair(alg, key, iv)
    recv_theirs, recv_ours = pair(alg, key, iv)
    if not sodium and isinstance(send_ours, FastChacha):
        send_ours._sodium = recv_ours._sodium = None  # type: ignore[attr-defined]
    for offset, payload in enumerate(packets):
        seq = (start + offset) & 0xFFFFFFFF
        body = bytes([4]) + payload + bytes(4)  # padding length, payload, padding
        body += bytes(-(len(body) + 4) % block)  # whole blocks, as asyncssh pads
        header = len(body).to_bytes(4, "big")
        wire_theirs = b"".join(send_theirs.encrypt_packet(seq, header, body))  # type: ignore[attr-defined]
        packet, mac = send_ours.encrypt_packet(seq, header, body)  # type: ignore[attr-defined]
        assert mac == b""
        assert packet == wire_theirs
        first, length = recv_ours.decrypt_header(seq, packet[:block], 4)  # type: ignore[attr-defined]
        assert length == header
        if offset == len(packets) - 1:  # the last one arrives damaged
            spot = flip % (len(packet) - 4) + 4
            packet = packet[:spot] + bytes([packet[spot] ^ 1]) + packet[spot + 1 :]
            first = packet[:block]
            expect = None
        else:
            expect = body
        rest, mac = packet[block:-16], packet[-16:]
        assert recv_ours.decrypt_packet(seq, first, rest, 4, mac) == expect  # type: ignore[attr-defined]
        recv_theirs.decrypt_header(seq, first, 4)  # type: ignore[attr-defined]
        assert recv_theirs.decrypt_packet(seq, first, rest, 4, mac) == expect  # type: ignore[attr-defined]
