"""SSH packet ciphers that keep their cipher state: AES-GCM and OpenSSH's ChaCha20-Poly1305.

asyncssh (2.24) builds a new cipher object for every packet: `AESGCM(key)` for each
AES-GCM packet, and for chacha20-poly1305@openssh.com three ChaCha20 contexts and a Poly1305
per packet (several times AES-GCM's cost for a small packet; bench/RESULTS.md, D13). A tunnel moves
many small packets (a channel open, its data, EOF and close are about ten packets per
connection), so that set-up cost, not the cipher, bounded connections per second.

These classes have asyncssh's `Encryption` interface (`encrypt_packet`, `decrypt_header`,
`decrypt_packet`) and produce the same bytes; `ssh/lean/packets.py` swaps them in per
connection. AES-GCM keeps one `AESGCM` object per key. ChaCha20-Poly1305 calls OpenSSL's
libcrypto through ctypes with two cipher contexts and a MAC context made once per key and
re-keyed per packet with the sequence-number nonce, which is what OpenSSH does in C; no
maintained Python binding exposes OpenSSH's construction (the length and the payload under
separate keys, the Poly1305 key from block 0) with reusable contexts. Where libcrypto 3
cannot be loaded, `chacha_available()` is false and asyncssh's own cipher stays in place.

`encrypt_packet` returns the whole wire packet and an empty MAC: asyncssh sends
`packet + mac`, and adding empty bytes copies nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hmac
from ctypes import c_char_p, c_int, c_size_t, c_uint64, c_ulonglong, c_void_p
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TAG = 16
_COUNTER_MASK = (1 << 64) - 1
_COUNTER_ZERO = bytes(8)
_POLY_KEY_SIZE = c_size_t(32)
_LENGTH_SIZE = c_ulonglong(4)
_BLOCK_ZERO = c_uint64(0)
#: Packets up to this size (payload and padding) go through libsodium, larger ones through OpenSSL.
SMALL = 4096
_TAG_SIZE = c_size_t(TAG)
_ZERO_BLOCK = bytes(64)  # ChaCha20 block 0 under the payload key: its first 32 bytes key Poly1305


class FastGcm:
    """aes128-gcm@openssh.com / aes256-gcm@openssh.com (RFC 5647): one AESGCM per key."""

    __slots__ = ("_aead", "_counter", "_fixed")

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:12], "big")

    def _next_iv(self) -> bytes:
        """The 12-byte nonce: fixed field, then an invocation counter bumped per packet (§7.1)."""
        counter = self._counter
        self._counter = (counter + 1) & _COUNTER_MASK
        return self._fixed + counter.to_bytes(8, "big")

    def encrypt_packet(self, seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
        return header + self._aead.encrypt(self._next_iv(), packet, header), b""

    def decrypt_header(self, seq: int, first_block: bytes, header_len: int) -> tuple[bytes, bytes]:
        return first_block, first_block[:header_len]  # the length is sent in the clear

    def decrypt_packet(
        self, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes
    ) -> bytes | None:
        iv = self._next_iv()
        try:
            return self._aead.decrypt(iv, first[header_len:] + rest + mac, first[:header_len])
        except InvalidTag:
            return None


class _LibCrypto:
    """The few libcrypto 3 functions the ChaCha20-Poly1305 construction needs.

    Set-up and clean-up go through typed functions. The per-packet calls are separate,
    untyped function objects (`lib[name]` makes a new one), because argument conversion for
    typed calls was a third of the cost of a small packet: every argument passed to them is
    already a ctypes object (`c_void_p`, `c_size_t`, a buffer), bytes, None, or a small int.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.EVP_CIPHER_CTX_new.restype = c_void_p
        lib.EVP_CIPHER_CTX_new.argtypes = []
        lib.EVP_CIPHER_CTX_free.restype = None
        lib.EVP_CIPHER_CTX_free.argtypes = [c_void_p]
        lib.EVP_chacha20.restype = c_void_p
        lib.EVP_chacha20.argtypes = []
        lib.EVP_CipherInit_ex.restype = c_int
        lib.EVP_CipherInit_ex.argtypes = [c_void_p, c_void_p, c_void_p, c_char_p, c_char_p, c_int]
        lib.EVP_MAC_fetch.restype = c_void_p
        lib.EVP_MAC_fetch.argtypes = [c_void_p, c_char_p, c_char_p]
        lib.EVP_MAC_CTX_new.restype = c_void_p
        lib.EVP_MAC_CTX_new.argtypes = [c_void_p]
        lib.EVP_MAC_CTX_free.restype = None
        lib.EVP_MAC_CTX_free.argtypes = [c_void_p]
        self.lib = lib
        self.chacha20 = lib.EVP_chacha20()
        self.poly1305 = lib.EVP_MAC_fetch(None, b"POLY1305", None)
        if not self.chacha20 or not self.poly1305:
            raise OSError("libcrypto has no ChaCha20 or Poly1305")
        # int EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1): a new nonce, same key and direction
        self.rekey = _untyped(lib, "EVP_CipherInit_ex")
        # int EVP_Cipher(ctx, out, in, unsigned int inl): ChaCha20 is a stream, so no final step
        self.cipher = _untyped(lib, "EVP_Cipher")
        # int EVP_MAC_init(ctx, key, size_t keylen, NULL) / _update(ctx, data, size_t len)
        # / _final(ctx, out, size_t *outl, size_t outsize)
        self.mac_init = _untyped(lib, "EVP_MAC_init")
        self.mac_update = _untyped(lib, "EVP_MAC_update")
        self.mac_final = _untyped(lib, "EVP_MAC_final")


class _Sodium:
    """libsodium's original-nonce ChaCha20 and Poly1305: one call each, no context to re-key.

    OpenSSL needs a context re-keyed per nonce (two calls a stream) and three calls a MAC;
    libsodium takes key and nonce in every call, so a small packet costs three calls instead of
    eight (bench/RESULTS.md, D14). Its ChaCha20 and Poly1305 are slower per byte,
    so large packets stay on OpenSSL (the two meet near 8 KiB). Untyped like _LibCrypto's
    per-packet calls; lengths go as `c_ulonglong`, the block counter as `c_uint64`.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        if lib.sodium_init() < 0:
            raise OSError("libsodium could not start")
        # int crypto_stream_chacha20_xor_ic(c, m, unsigned long long mlen, n[8], uint64_t ic, k[32])
        self.xor = _untyped(lib, "crypto_stream_chacha20_xor_ic")
        # int crypto_onetimeauth_poly1305(out[16], in, unsigned long long inlen, k[32])
        self.poly1305 = _untyped(lib, "crypto_onetimeauth_poly1305")
        # int crypto_onetimeauth_poly1305_verify(h[16], in, unsigned long long inlen, k[32]): 0 if equal
        self.poly1305_verify = _untyped(lib, "crypto_onetimeauth_poly1305_verify")


def _untyped(lib: ctypes.CDLL, name: str) -> Any:
    function = lib[name]
    function.restype = c_int
    return function


@functools.cache  # loaded once, at the first use
def _load() -> _LibCrypto | None:
    try:
        name = ctypes.util.find_library("crypto")
        return _LibCrypto(ctypes.CDLL(name if name and ".so.3" in name else "libcrypto.so.3"))
    except (OSError, AttributeError):  # no libcrypto 3 (OpenSSL 1.1 lacks EVP_MAC)
        return None


@functools.cache
def _load_sodium() -> _Sodium | None:
    try:
        return _Sodium(ctypes.CDLL(ctypes.util.find_library("sodium") or "libsodium.so.23"))
    except (OSError, AttributeError):  # small packets then go through OpenSSL too
        return None


def chacha_available() -> bool:
    """Whether FastChacha can run here (libcrypto 3 with ChaCha20 and Poly1305)."""
    return _load() is not None


class FastChacha:
    """chacha20-poly1305@openssh.com (PROTOCOL.chacha20poly1305), on reusable OpenSSL contexts.

    The 64-byte key is two ChaCha20 keys: K_2 (first half) encrypts the payload from block 1 on
    and gives the Poly1305 key from block 0; K_1 (second half) encrypts the 4-byte length. The
    nonce is the packet sequence number; the tag covers the encrypted length and payload.
    Every call here is on the hot path (several per packet), so the contexts are wrapped as
    ctypes objects and the small buffers made once per key.
    """

    __slots__ = (
        "_block", "_crypto", "_header", "_k1", "_k2", "_length",
        "_mac", "_main", "_scratch", "_sodium", "_tag", "_tag_size",
    )  # fmt: skip

    def __init__(self, key: bytes) -> None:
        crypto = _load()
        if crypto is None:
            raise OSError("libcrypto 3 is not available")
        self._crypto = crypto
        lib = crypto.lib
        main, header, mac = (
            lib.EVP_CIPHER_CTX_new(),
            lib.EVP_CIPHER_CTX_new(),
            lib.EVP_MAC_CTX_new(crypto.poly1305),
        )
        self._main, self._header, self._mac = c_void_p(main), c_void_p(header), c_void_p(mac)
        if not (main and header and mac):
            self._free()
            raise MemoryError("OpenSSL could not allocate a cipher context")
        blank = bytes(16)
        if not (
            lib.EVP_CipherInit_ex(main, crypto.chacha20, None, key[:32], blank, 1)
            and lib.EVP_CipherInit_ex(header, crypto.chacha20, None, key[32:64], blank, 1)
        ):
            self._free()
            raise ValueError("OpenSSL refused the ChaCha20 key")
        self._sodium = _load_sodium()
        self._k2, self._k1 = key[:32], key[32:64]
        self._scratch = ctypes.create_string_buffer(64 + SMALL + 64 + TAG)  # small packets, in and out
        self._block = ctypes.create_string_buffer(64)  # payload stream block 0: the Poly1305 key
        self._length = ctypes.create_string_buffer(4)
        self._tag = ctypes.create_string_buffer(TAG)
        self._tag_size = c_size_t()

    def _free(self) -> None:
        lib = self._crypto.lib
        if self._main.value:
            lib.EVP_CIPHER_CTX_free(self._main.value)
        if self._header.value:
            lib.EVP_CIPHER_CTX_free(self._header.value)
        if self._mac.value:
            lib.EVP_MAC_CTX_free(self._mac.value)
        self._main = self._header = self._mac = c_void_p()

    def __del__(self) -> None:
        if getattr(self, "_mac", None) is not None:
            self._free()

    def _poly1305(self, data: bytes, more: bytes = b"") -> bytes:
        """The tag over `data` (then `more`), keyed by the block `_rekey` left in `_block`."""
        crypto = self._crypto
        mac = self._mac
        ok = crypto.mac_init(mac, self._block, _POLY_KEY_SIZE, None) and crypto.mac_update(
            mac, data, c_size_t(len(data))
        )
        if more:
            ok = ok and crypto.mac_update(mac, more, c_size_t(len(more)))
        if not (ok and crypto.mac_final(mac, self._tag, ctypes.byref(self._tag_size), _TAG_SIZE)):
            raise ValueError("OpenSSL Poly1305 failed")
        return self._tag.raw

    def _rekey(self, seq: int, *, header: bool) -> None:
        """Point the payload stream (and the length's, if asked) at packet `seq`; block 0 of the
        payload stream goes to `_block`. OpenSSL's 16-byte ChaCha20 IV is the block counter (0),
        then the 8-byte nonce.
        """
        crypto = self._crypto
        iv = _COUNTER_ZERO + seq.to_bytes(8, "big")
        if not (
            crypto.rekey(self._main, None, None, None, iv, -1)
            and (not header or crypto.rekey(self._header, None, None, None, iv, -1))
        ):
            raise ValueError("OpenSSL refused the ChaCha20 nonce")
        crypto.cipher(self._main, self._block, _ZERO_BLOCK, 64)

    def encrypt_packet(self, seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
        size = len(packet)
        sodium = self._sodium
        if sodium is not None and size <= SMALL:
            # One buffer: payload block 0 (its first 32 bytes key Poly1305; bytes 60-63 then
            # take the encrypted length), the encrypted payload, the tag. Bytes 60- are the wire.
            nonce = seq.to_bytes(8, "big")
            out = self._scratch  # the wire bytes are copied out below
            sodium.xor(out, _ZERO_BLOCK + packet, c_ulonglong(64 + size), nonce, _BLOCK_ZERO, self._k2)
            sodium.xor(ctypes.byref(out, 60), header, _LENGTH_SIZE, nonce, _BLOCK_ZERO, self._k1)
            sodium.poly1305(ctypes.byref(out, 64 + size), ctypes.byref(out, 60), c_ulonglong(4 + size), out)
            return memoryview(out)[60 : 64 + size + TAG].tobytes(), b""
        self._rekey(seq, header=True)
        cipher = self._crypto.cipher
        out = ctypes.create_string_buffer(4 + size)
        cipher(self._header, out, header, 4)
        cipher(self._main, ctypes.byref(out, 4), packet, size)
        body = out.raw
        return body + self._poly1305(body), b""

    def decrypt_header(self, seq: int, first_block: bytes, header_len: int) -> tuple[bytes, bytes]:
        if self._sodium is not None:
            nonce = seq.to_bytes(8, "big")
            self._sodium.xor(self._length, first_block, _LENGTH_SIZE, nonce, _BLOCK_ZERO, self._k1)
            return first_block, self._length.raw
        crypto = self._crypto
        if not crypto.rekey(self._header, None, None, None, _COUNTER_ZERO + seq.to_bytes(8, "big"), -1):
            raise ValueError("OpenSSL refused the ChaCha20 nonce")
        crypto.cipher(self._header, self._length, first_block, 4)
        return first_block, self._length.raw

    def decrypt_packet(
        self, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes
    ) -> bytes | None:
        sodium = self._sodium
        if sodium is not None and len(first) + len(rest) <= SMALL + header_len:
            nonce = seq.to_bytes(8, "big")
            covered = first + rest  # what the tag covers: the encrypted length and payload
            size = len(covered) - header_len
            out = self._scratch  # block 0 (the Poly1305 key), then the plaintext, copied out below
            sodium.xor(
                out, _ZERO_BLOCK + covered[header_len:], c_ulonglong(64 + size), nonce, _BLOCK_ZERO, self._k2
            )
            if sodium.poly1305_verify(mac, covered, c_ulonglong(len(covered)), out) != 0:
                return None
            return memoryview(out)[64 : 64 + size].tobytes()
        self._rekey(seq, header=False)  # decrypt_header came first, for the same seq
        if not hmac.compare_digest(self._poly1305(first, rest), mac):
            return None
        body = first[header_len:] + rest
        size = len(body)
        out = ctypes.create_string_buffer(size)
        self._crypto.cipher(self._main, out, body, size)
        return out.raw
