"""The SSH algorithms portfwd offers and accepts, as client and as server: OpenSSH's or stricter.

asyncssh's own defaults are wider than OpenSSH's (SHA-1 key exchange and signatures, a 1024-bit
group exchange, ssh.com MACs), and it names its version in its banner. Each set below is OpenSSH's
default list (`sshd -T` / `ssh -G` of OpenSSH 9.2, and 9.9+ where it says so) as far as asyncssh
implements it, in OpenSSH's order unless noted, minus what asyncssh does less safely:

- kex: OpenSSH 9.9+'s list. mlkem768x25519-sha256 (9.9+'s first; a 9.2 peer agrees on
  curve25519 instead) and sntrup761x25519 (9.2's first; offered only where asyncssh has liboqs)
  are post-quantum hybrids. diffie-hellman-group-exchange-sha256 is left out: asyncssh's server
  hands a 1024-bit group to a client asking for one, and its client takes any group a server
  sends, where OpenSSH refuses anything under 2048 bits both ways.
- ciphers: OpenSSH's six; AEAD first, as asyncssh orders them (ssh/lean speeds those up).
- macs: OpenSSH's, minus SHA-1 (hmac-sha1, hmac-sha1-etm) and 64-bit tags (umac-64, umac-64-etm):
  stricter, at no cost to a peer with SHA-2 MACs (OpenSSH 5.9+). The encrypt-and-MAC SHA-2 and
  umac-128 stay, as in OpenSSH, for peers without etm or AEAD (AEAD uses no MAC at all).
- host_key_algorithms: OpenSSH's, certificates first; RSA only with SHA-2 (never ssh-rsa or
  ssh-rsa-cert). A client puts the key types its known_hosts holds for the host first
  (`host_key_order`, as OpenSSH's order_hostkeyalgs), so an RSA-only entry still verifies.
- SIGNATURES (user keys; the server's server-sig-algs): OpenSSH's PubkeyAcceptedAlgorithms for
  plain keys, with webauthn as sshd accepts it for sk-ecdsa keys; never ssh-rsa or ssh-dss.

Config narrows the first four (`kex`, `ciphers`, `macs`, `host_key_algorithms`): any subset, in
the order given. asyncssh is imported only when a name must be checked, so config stays light.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Literal

from portfwd.errors import ConfigError, RuntimeFailure

if TYPE_CHECKING:
    import asyncssh

Kind = Literal["kex", "ciphers", "macs", "host_key_algorithms"]

KEX = (
    "mlkem768x25519-sha256",
    "sntrup761x25519-sha512",
    "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)
CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)
MACS = (
    "umac-128-etm@openssh.com",
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
)
HOST_KEY_ALGORITHMS = (
    "ssh-ed25519-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "sk-ssh-ed25519-cert-v01@openssh.com",
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "rsa-sha2-512-cert-v01@openssh.com",
    "rsa-sha2-256-cert-v01@openssh.com",
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
)
SIGNATURES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "webauthn-sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
)
SAFE: dict[Kind, tuple[str, ...]] = {
    "kex": KEX,
    "ciphers": CIPHERS,
    "macs": MACS,
    "host_key_algorithms": HOST_KEY_ALGORITHMS,
}
#: The software version after `SSH-2.0-`, both ways: the program, not the library and its release
#: (a scanner learns nothing it could look up; no peer keys a workaround to either name).
VERSION = "portfwd"

_NOUNS: dict[Kind, str] = {
    "kex": "key exchange algorithm",
    "ciphers": "cipher",
    "macs": "MAC",
    "host_key_algorithms": "host key algorithm",
}
_CERT = "-cert-v01@openssh.com"


@functools.cache
def _implemented(kind: Kind) -> frozenset[str]:
    """Every name asyncssh implements here (liboqs, nettle and OpenSSL decide some)."""
    from asyncssh.encryption import get_encryption_algs
    from asyncssh.kex import get_kex_algs
    from asyncssh.mac import get_mac_algs
    from asyncssh.public_key import get_certificate_algs, get_public_key_algs

    if kind == "kex":
        names = get_kex_algs()
    elif kind == "ciphers":
        names = get_encryption_algs()
    elif kind == "macs":
        names = get_mac_algs()
    else:
        names = get_certificate_algs() + get_public_key_algs()
    return frozenset(name.decode() for name in names)


def available(kind: Kind) -> tuple[str, ...]:
    """The safe set of `kind` that asyncssh can run here, most preferred first."""
    implemented = _implemented(kind)
    return tuple(name for name in SAFE[kind] if name in implemented)


def narrow(kind: Kind, value: object) -> tuple[str, ...]:
    """Check a configured list (or comma-separated text) of `kind` names; return it, deduplicated.

    Raises ConfigError naming the first name outside the safe set and listing what is allowed.
    """
    items = value.split(",") if isinstance(value, str) else value
    noun = _NOUNS[kind]
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise ConfigError(f'must be a list of {noun} names; write ["{SAFE[kind][0]}"]')
    allowed = available(kind)
    choices = f"use one or more of: {', '.join(allowed)}"
    chosen: list[str] = []
    for item in items:
        name = item.strip()
        if name in allowed:
            if name not in chosen:
                chosen.append(name)
        elif name in SAFE[kind]:
            raise ConfigError(f"{noun} {name!r} is not available here (asyncssh lacks it); {choices}")
        elif name in _implemented(kind):
            raise ConfigError(
                f"{noun} {name!r} is not allowed (portfwd offers OpenSSH's defaults or stricter); {choices}"
            )
        elif name:
            raise ConfigError(f"unknown {noun} {name!r}; {choices}")
    if not chosen:
        raise ConfigError(f"lists no {noun}; {choices}")
    return tuple(chosen)


def offered(kind: Kind, chosen: Sequence[str]) -> list[str]:
    """What to offer: the configured narrowing, or else the whole safe set."""
    return list(chosen or available(kind))


def key_type(algorithm: str) -> str:
    """The key type a host key algorithm needs: `rsa-sha2-512-cert-v01@openssh.com` -> `ssh-rsa`."""
    plain = algorithm
    if algorithm.endswith(_CERT):
        plain = algorithm.removesuffix(_CERT)
        plain += "@openssh.com" if plain.startswith("sk-") else ""
    return "ssh-rsa" if plain.startswith("rsa-sha2-") else plain


def host_key_order(algorithms: Sequence[str], known: Collection[str], ca_known: bool) -> list[str]:
    """OpenSSH's order_hostkeyalgs: what known_hosts can verify first, the rest after.

    `known` holds the key types (`ssh-rsa`, `ssh-ed25519`...) known_hosts trusts for this host;
    with a `@cert-authority` for it, certificates come first too. Unknown hosts get `algorithms`
    as they are, so `accept-new` records the key ssh would (ed25519 before ecdsa before RSA).
    """
    first = [alg for alg in algorithms if (ca_known and alg.endswith(_CERT)) or key_type(alg) in known]
    return first + [alg for alg in algorithms if alg not in first]


def _common(kex: Sequence[str], ciphers: Sequence[str], macs: Sequence[str]) -> dict[str, Any]:
    return {
        "kex_algs": offered("kex", kex),
        "encryption_algs": offered("ciphers", ciphers),
        "mac_algs": offered("macs", macs),
        "signature_algs": list(SIGNATURES),
    }


def client_options(kex: Sequence[str], ciphers: Sequence[str], macs: Sequence[str]) -> dict[str, Any]:
    """asyncssh.connect options for `portfwd ssh` (server_host_key_algs: see host_key_order)."""
    return {**_common(kex, ciphers, macs), "client_version": VERSION}


def server_options(kex: Sequence[str], ciphers: Sequence[str], macs: Sequence[str]) -> dict[str, Any]:
    """asyncssh.listen options for `portfwd server`; signature_algs becomes its server-sig-algs."""
    return {**_common(kex, ciphers, macs), "server_version": VERSION}


def host_keypairs(key: asyncssh.SSHKey, chosen: Sequence[str]) -> list[asyncssh.SSHKeyPair]:
    """The server's host key, offered only under the allowed algorithms (an RSA key: SHA-2 only).

    Raises RuntimeFailure when `host_key_algorithms` leaves the key nothing to sign with.
    """
    import asyncssh

    allowed = offered("host_key_algorithms", chosen)
    (pair,) = asyncssh.load_keypairs([key])
    names = tuple(alg for alg in pair.host_key_algorithms if alg.decode() in allowed)
    if not names:
        raise RuntimeFailure(
            f"the host key ({key.get_algorithm()}) cannot sign with any of {', '.join(allowed)}",
            field="server.host_key_algorithms",
            hint="allow an algorithm of the host key's type, or use another host key",
        )
    pair.host_key_algorithms = names
    return [pair]


def accept_only_safe_signatures(key: asyncssh.SSHKey) -> None:
    """Make `key` refuse a user-auth signature outside SIGNATURES (an RSA key's `ssh-rsa`).

    asyncssh 2.24's server verifies a signature with whatever algorithm the key type allows,
    whatever its `signature_algs` (which only sets server-sig-algs). The key object handed to
    `SSHServer.validate_public_key` is the one that then checks the signature, against its
    `all_sig_algorithms`; this narrows that set on this object alone.
    """
    key.all_sig_algorithms = {alg for alg in key.all_sig_algorithms if alg.decode() in SIGNATURES}
