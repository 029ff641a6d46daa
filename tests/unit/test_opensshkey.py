"""proto/opensshkey.py: the clear public key of an OpenSSH-format private key file."""

from __future__ import annotations

import base64

import asyncssh
from hypothesis import given
from hypothesis import strategies as st

from portfwd.proto.opensshkey import BEGIN, END, MAGIC, public_blob


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _file(blob: bytes) -> bytes:
    body = base64.b64encode(blob)
    lines = b"\n".join(body[i : i + 70] for i in range(0, len(body), 70))
    return BEGIN + b"\n" + lines + b"\n" + END + b"\n"


def test_a_locked_key_gives_its_public_half_without_the_passphrase() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    locked = key.export_private_key("openssh", "s3cret")  # bcrypt KDF; never decrypted here
    assert public_blob(locked) == key.public_data
    assert public_blob(key.export_private_key("openssh")) == key.public_data
    assert public_blob(key.export_private_key("pkcs8-pem")) is None  # another format


@given(st.binary(max_size=300), st.integers(0, 3))
def test_any_bytes_give_a_blob_or_none_never_an_error(tail: bytes, keys: int) -> None:
    head = MAGIC + _string(b"aes256-ctr") + _string(b"bcrypt") + _string(b"x" * 8)
    for blob in (tail, MAGIC + tail, head + keys.to_bytes(4, "big") + tail):
        found = public_blob(_file(blob))
        assert found is None or (isinstance(found, bytes) and found in blob)
        assert public_blob(blob) is None  # no armour


def test_a_length_past_the_end_is_none() -> None:
    head = MAGIC + _string(b"none") + _string(b"none") + _string(b"")
    assert public_blob(_file(head + (1).to_bytes(4, "big") + (10_000).to_bytes(4, "big") + b"short")) is None
    assert public_blob(_file(head + (0).to_bytes(4, "big") + _string(b"k"))) is None  # no key
    assert public_blob(_file(head + (1).to_bytes(4, "big") + _string(b"k"))) == b"k"
