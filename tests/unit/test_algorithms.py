"""sshalgorithms: the safe sets, their narrowing (exact error lines), host-key order, key narrowing.

The last tests sign and verify with asyncssh's own key objects: they fail if asyncssh moves what
`accept_only_safe_signatures` and `host_keypairs` rely on.
"""

from __future__ import annotations

import asyncssh
import pytest

from portfwd import config, sshalgorithms
from portfwd.errors import ConfigError, RuntimeFailure
from portfwd.sshalgorithms import HOST_KEY_ALGORITHMS, SAFE, available, host_key_order, key_type, narrow
from portfwd.tunnelspec import parse_option

#: Post-quantum hybrids asyncssh offers only with liboqs (sntrup) or a recent OpenSSL (mlkem).
OPTIONAL = {"sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com", "mlkem768x25519-sha256"}


@pytest.mark.parametrize("kind", list(SAFE))
def test_every_safe_name_is_one_asyncssh_implements(kind: sshalgorithms.Kind) -> None:
    """A name asyncssh does not know would make every connect fail: only the optional may be absent."""
    assert set(SAFE[kind]) - set(available(kind)) <= OPTIONAL


@pytest.mark.parametrize("kind", list(SAFE))
def test_nothing_weak_is_in_a_safe_set(kind: sshalgorithms.Kind) -> None:
    weak = ("sha1", "-cbc", "@ssh.com", "umac-64", "md5", "ssh-rsa", "ssh-dss", "group-exchange")
    for name in SAFE[kind]:
        assert not [part for part in weak if part in name], name
    assert not {"ssh-rsa", "ssh-dss"} & set(sshalgorithms.SIGNATURES)


def test_a_narrowing_keeps_the_given_order_once_each() -> None:
    assert narrow("kex", ["curve25519-sha256", "diffie-hellman-group14-sha256", "curve25519-sha256"]) == (
        "curve25519-sha256",
        "diffie-hellman-group14-sha256",
    )
    assert narrow("macs", "hmac-sha2-512, hmac-sha2-256-etm@openssh.com") == (
        "hmac-sha2-512",
        "hmac-sha2-256-etm@openssh.com",
    )


MACS = ", ".join(available("macs"))
BAD = [
    (
        "macs",
        ["hmac-sha1"],
        f"MAC 'hmac-sha1' is not allowed (portfwd offers OpenSSH's defaults or stricter); use one or more of: {MACS}",
    ),
    ("macs", ["hmac-sha2-256", "rot13"], f"unknown MAC 'rot13'; use one or more of: {MACS}"),
    ("macs", [], f"lists no MAC; use one or more of: {MACS}"),
    ("macs", "", f"lists no MAC; use one or more of: {MACS}"),
    ("macs", 5, 'must be a list of MAC names; write ["umac-128-etm@openssh.com"]'),
    ("macs", [None], 'must be a list of MAC names; write ["umac-128-etm@openssh.com"]'),
]


@pytest.mark.parametrize(("kind", "value", "line"), BAD)
def test_a_bad_narrowing_names_the_fix(kind: sshalgorithms.Kind, value: object, line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        narrow(kind, value)
    assert caught.value.line() == line


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("kex", "diffie-hellman-group14-sha1"),
        ("kex", "diffie-hellman-group-exchange-sha256"),
        ("ciphers", "aes128-cbc"),
        ("macs", "hmac-sha256@ssh.com"),
        ("host_key_algorithms", "ssh-rsa"),
        ("host_key_algorithms", "ssh-rsa-cert-v01@openssh.com"),
    ],
)
def test_what_the_issue_found_is_refused(kind: sshalgorithms.Kind, name: str) -> None:
    with pytest.raises(ConfigError, match="is not allowed"):
        narrow(kind, [name])


def test_config_keys_on_both_sides() -> None:
    loaded = config.validate(
        {
            "server": {
                "kex": ["curve25519-sha256"],
                "host_key_algorithms": ["ssh-ed25519"],
                "user": [{"name": "alice", "authorized_keys": "/dev/null"}],
            },
            "tunnel": [{"ssh": "a@h", "dynamic": ["1080"], "macs": "hmac-sha2-256"}],
        }
    )
    assert loaded.server is not None
    assert loaded.server.kex == ("curve25519-sha256",)
    assert loaded.server.host_key_algorithms == ("ssh-ed25519",)
    assert loaded.server.ciphers == ()
    assert loaded.tunnel[0].macs == ("hmac-sha2-256",)


def test_config_error_names_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        config.validate({"server": {"kex": ["diffie-hellman-group14-sha1"]}})
    assert caught.value.problems == [
        "server.kex: key exchange algorithm 'diffie-hellman-group14-sha1' is not allowed (portfwd offers "
        f"OpenSSH's defaults or stricter); use one or more of: {', '.join(available('kex'))}"
    ]


def test_ssh_options_map_onto_the_keys() -> None:
    table: dict[str, object] = {}
    for option in (
        "KexAlgorithms=curve25519-sha256,diffie-hellman-group14-sha256",
        "macs hmac-sha2-256-etm@openssh.com",
        "HostKeyAlgorithms=ssh-ed25519,rsa-sha2-512",
    ):
        parse_option(option, table)
    assert table == {
        "kex": ["curve25519-sha256", "diffie-hellman-group14-sha256"],
        "macs": ["hmac-sha2-256-etm@openssh.com"],
        "host_key_algorithms": ["ssh-ed25519", "rsa-sha2-512"],
    }


@pytest.mark.parametrize(
    ("algorithm", "kind"),
    [
        ("rsa-sha2-512", "ssh-rsa"),
        ("rsa-sha2-256-cert-v01@openssh.com", "ssh-rsa"),
        ("ssh-ed25519-cert-v01@openssh.com", "ssh-ed25519"),
        ("ecdsa-sha2-nistp384-cert-v01@openssh.com", "ecdsa-sha2-nistp384"),
        ("sk-ssh-ed25519-cert-v01@openssh.com", "sk-ssh-ed25519@openssh.com"),
        ("sk-ecdsa-sha2-nistp256@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com"),
        ("ssh-ed25519", "ssh-ed25519"),
    ],
)
def test_key_type(algorithm: str, kind: str) -> None:
    assert key_type(algorithm) == kind


def test_an_unknown_host_gets_openssh_preference() -> None:
    order = host_key_order(HOST_KEY_ALGORITHMS, set(), False)
    assert order == list(HOST_KEY_ALGORITHMS)
    plain = [alg for alg in order if not alg.endswith("-cert-v01@openssh.com")]
    assert plain[0] == "ssh-ed25519"
    assert plain[-2:] == ["rsa-sha2-512", "rsa-sha2-256"]


def test_a_known_rsa_key_puts_rsa_first() -> None:
    order = host_key_order(HOST_KEY_ALGORITHMS, {"ssh-rsa"}, False)
    assert order[:4] == [
        "rsa-sha2-512-cert-v01@openssh.com",
        "rsa-sha2-256-cert-v01@openssh.com",
        "rsa-sha2-512",
        "rsa-sha2-256",
    ]
    assert sorted(order) == sorted(HOST_KEY_ALGORITHMS)


def test_a_known_authority_puts_certificates_first() -> None:
    order = host_key_order(HOST_KEY_ALGORITHMS, {"ecdsa-sha2-nistp256"}, True)
    certificates = [alg for alg in HOST_KEY_ALGORITHMS if alg.endswith("-cert-v01@openssh.com")]
    assert order[: len(certificates)] == certificates
    assert order[len(certificates)] == "ecdsa-sha2-nistp256"


def _rsa_pair(signature: bytes) -> tuple[asyncssh.SSHKeyPair, asyncssh.SSHKey]:
    key = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    (pair,) = asyncssh.load_keypairs([key])
    pair.set_sig_algorithm(signature)
    return pair, key.convert_to_public()


def test_a_user_key_refuses_sha1_signatures_once_narrowed() -> None:
    for signature, accepted in ((b"ssh-rsa", False), (b"rsa-sha2-512", True), (b"rsa-sha2-256", True)):
        pair, public = _rsa_pair(signature)
        signed = pair.sign(b"session id and request")
        assert public.verify(b"session id and request", signed), "asyncssh alone accepts all three"
        sshalgorithms.accept_only_safe_signatures(public)
        assert public.verify(b"session id and request", signed) is accepted, signature


def test_an_rsa_host_key_is_offered_with_sha2_only() -> None:
    key = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    (pair,) = sshalgorithms.host_keypairs(key, ())
    assert sorted(pair.host_key_algorithms) == [b"rsa-sha2-256", b"rsa-sha2-512"]
    (pair,) = sshalgorithms.host_keypairs(key, ("rsa-sha2-512",))
    assert pair.host_key_algorithms == (b"rsa-sha2-512",)


def test_a_narrowing_that_leaves_the_host_key_nothing_is_refused() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(RuntimeFailure) as caught:
        sshalgorithms.host_keypairs(key, ("rsa-sha2-512", "rsa-sha2-256"))
    assert caught.value.line() == (
        "server.host_key_algorithms: the host key (ssh-ed25519) cannot sign with any of rsa-sha2-512, "
        "rsa-sha2-256; allow an algorithm of the host key's type, or use another host key"
    )
