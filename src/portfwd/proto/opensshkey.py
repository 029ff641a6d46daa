"""The public key an OpenSSH-format private key file carries in the clear, passphrase or not.

ssh-keygen's default format (PROTOCOL.key: "openssh-key-v1") keeps each public key unencrypted
ahead of the encrypted private part, and ssh reads it from there when a key has no `.pub` beside
it (authfile.c, sshkey_load_public): that is how `IdentitiesOnly=yes` still lets the agent sign
for a locked key. asyncssh reads this format only whole, and a locked one only with its
passphrase, so the few fixed fields before the public key are read here. Sans-IO: bytes in, the
key's SSH wire blob (or None) out.
"""

from __future__ import annotations

import base64
import binascii

BEGIN = b"-----BEGIN OPENSSH PRIVATE KEY-----"
END = b"-----END OPENSSH PRIVATE KEY-----"
MAGIC = b"openssh-key-v1\0"

#: A key file is a few KB; a public key blob far less (an RSA-16384 key is about 2 KB).
MAX_BLOB = 16 * 1024


def public_blob(data: bytes) -> bytes | None:
    """The first public key of the OpenSSH-format private key in `data`, in SSH wire format
    (what an agent and `.pub` files carry, base64-decoded); None when `data` is not one."""
    start = data.find(BEGIN)
    end = data.find(END, start + len(BEGIN))
    if start < 0 or end < 0:
        return None
    try:
        blob = base64.b64decode(b"".join(data[start + len(BEGIN) : end].split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    if not blob.startswith(MAGIC):
        return None
    at = len(MAGIC)
    for _ in range(3):  # ciphername, kdfname, kdfoptions
        field, at = _string(blob, at)
        if field is None:
            return None
    if at + 4 > len(blob) or int.from_bytes(blob[at : at + 4], "big") < 1:  # the number of keys
        return None
    key, _ = _string(blob, at + 4)
    return key or None


def _string(blob: bytes, at: int) -> tuple[bytes | None, int]:
    """An SSH `string` (uint32 length, then the bytes) at `at`, and where the next field starts."""
    if at + 4 > len(blob):
        return None, at
    size = int.from_bytes(blob[at : at + 4], "big")
    if size > MAX_BLOB or at + 4 + size > len(blob):
        return None, at
    return blob[at + 4 : at + 4 + size], at + 4 + size
