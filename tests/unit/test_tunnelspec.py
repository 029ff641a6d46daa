"""OpenSSH's -L/-R/-D grammar, destinations and -o options: what parses, and the exact errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portfwd.errors import ConfigError
from portfwd.tunnelspec import parse_destination, parse_forward, parse_option

GOOD = [
    ("local", "8080:db:5432", "-L 127.0.0.1:8080 -> db:5432"),
    ("local", "0.0.0.0:8080:10.0.0.5:80", "-L 0.0.0.0:8080 -> 10.0.0.5:80"),
    ("local", "*:8080:db:5432", "-L *:8080 -> db:5432"),
    ("local", ":8080:db:5432", "-L *:8080 -> db:5432"),
    ("local", "localhost:8080:db:5432", "-L 127.0.0.1:8080 -> db:5432"),
    ("local", "[::1]:8080:[2001:db8::5]:80", "-L [::1]:8080 -> [2001:db8::5]:80"),
    ("local", "8080:/run/app.sock", "-L 127.0.0.1:8080 -> unix:/run/app.sock"),
    ("local", "/tmp/in.sock:db:5432", "-L unix:/tmp/in.sock -> db:5432"),
    ("local", "unix:/tmp/in.sock:unix:/run/app.sock", "-L unix:/tmp/in.sock -> unix:/run/app.sock"),
    ("remote", "0.0.0.0:8022:localhost:22", "-R 0.0.0.0:8022 -> localhost:22"),
    ("remote", "0:localhost:80", "-R localhost:0 -> localhost:80"),
    ("remote", "8022", "-R localhost:8022 -> socks"),
    ("remote", "0.0.0.0:1080", "-R 0.0.0.0:1080 -> socks"),
    ("remote", "/tmp/r.sock:localhost:22", "-R unix:/tmp/r.sock -> localhost:22"),
    ("dynamic", "1080", "-D 127.0.0.1:1080 -> socks"),
    ("dynamic", "[::1]:1080", "-D [::1]:1080 -> socks"),
]


@pytest.mark.parametrize(("kind", "spec", "shown"), GOOD)
def test_openssh_specs(kind: str, spec: str, shown: str) -> None:
    assert str(parse_forward(kind, spec)) == shown  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["local", "remote", "dynamic"])
def test_localhost_is_the_default_bind_as_in_ssh(kind: str) -> None:
    """ssh -L localhost:8080:... listens on 127.0.0.1 and ::1, as with no bind address."""
    spec = "localhost:8080" + ("" if kind == "dynamic" else ":db:5432")
    default = "8080" + ("" if kind == "dynamic" else ":db:5432")
    assert parse_forward(kind, spec) == parse_forward(kind, default)  # type: ignore[arg-type]


BAD = [
    (
        "local",
        "8080",
        "'8080' has no target; write -L [bind:]port:host:hostport, e.g. 127.0.0.1:5432:db.internal:5432",
    ),
    ("local", "", "empty -L spec; write -L [bind:]port:host:hostport, e.g. 127.0.0.1:5432:db.internal:5432"),
    ("local", "0:db:1", "port 0 is out of range (1-65535)"),
    (
        "local",
        "a:b:c:d:e",
        "'a:b:c:d:e' is not a -L spec; write -L [bind:]port:host:hostport, e.g. 127.0.0.1:5432:db.internal:5432",
    ),
    ("local", "8080:db:http", "port 'http' is not a number; write a port number such as 8080"),
    (
        "local",
        "8080:tmp/x.sock",
        "'8080:tmp/x.sock' is not a -L spec; write -L [bind:]port:host:hostport, e.g. 127.0.0.1:5432:db.internal:5432",
    ),
    (
        "remote",
        "8080:*:80",
        "'8080:*:80' has no target host; write -R [bind:]port:host:hostport, or -R [bind:]port for reverse SOCKS",
    ),
    (
        "remote",
        "::1:8080:h:1",
        "'::1:8080:h:1' is not a -R spec; write -R [bind:]port:host:hostport, or -R [bind:]port for reverse SOCKS",
    ),
    ("dynamic", "1080:h:1", "'1080:h:1' is not a -D spec; write -D [bind:]port, e.g. 127.0.0.1:1080"),
    ("dynamic", "70000", "port 70000 is out of range (1-65535)"),
    ("dynamic", 1080, "expected a string like '127.0.0.1:1080', got 1080"),
]


@pytest.mark.parametrize(("kind", "spec", "line"), BAD)
def test_bad_specs(kind: str, spec: object, line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_forward(kind, spec)  # type: ignore[arg-type]
    assert caught.value.line() == line


def test_destinations() -> None:
    assert parse_destination("alice@bastion.example.org:2222") == ("alice", "bastion.example.org", 2222)
    assert parse_destination("bastion") == (None, "bastion", None)
    assert parse_destination("a.b@[2001:db8::1]:22") == ("a.b", "2001:db8::1", 22)
    for bad, line in [
        ("", "'' is not an SSH destination; write [user@]host[:port], e.g. alice@bastion.example.org:22"),
        (
            "@host",
            "'@host' has an empty or bad user name; write [user@]host[:port], e.g. alice@bastion.example.org:22",
        ),
        ("host:0", "port 0 is out of range (1-65535)"),
        ("2001:db8::1", "IPv6 address in '2001:db8::1' must be in brackets; write user@[::1]:22"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_destination(bad)
        assert caught.value.line() == line


def test_options_a_forwarding_client_has_no_use_for_are_taken_and_change_nothing() -> None:
    table: dict[str, object] = {}
    for option in ("TCPKeepAlive=yes", "LogLevel ERROR", "ControlMaster=no", "ControlPath=none",
                   "CheckHostIP=no", "RequestTTY=no", "SessionType=none", "ForwardAgent=no",
                   "PasswordAuthentication=no", "PubkeyAuthentication=yes", "ConnectionAttempts=3"):  # fmt: skip
        parse_option(option, table)
    assert table == {}
    with pytest.raises(ConfigError) as caught:
        parse_option("PubkeyAuthentication=no", table)
    assert caught.value.line() == (
        "-o PubkeyAuthentication=no: portfwd logs in with keys only; this leaves it no way in"
    )
    for asked in ("ControlMaster=auto", "ClearAllForwardings=yes", "Tunnel=yes", "PermitLocalCommand=yes"):
        with pytest.raises(ConfigError) as caught:  # what would silently be missing: refused
            parse_option(asked, table)
        name = asked.partition("=")[0]
        assert caught.value.line() == (
            f"-o {asked}: portfwd ssh only forwards ports and has no such feature; "
            f"leave it out or write {name}=no"
        )


def test_ssh_uri_destinations() -> None:
    assert parse_destination("ssh://alice@bastion.example.org:2222") == ("alice", "bastion.example.org", 2222)
    assert parse_destination("SSH://[2001:db8::1]/") == (None, "2001:db8::1", None)
    assert parse_destination("ssh://al%40corp;fingerprint=SHA256:x@h:2200") == ("al@corp", "h", 2200)
    with pytest.raises(ConfigError) as caught:
        parse_destination("ssh://host/path")
    assert caught.value.line().startswith("'ssh://host/path': an ssh:// destination has no path")


def test_none_stands_alone_among_known_hosts_files() -> None:
    table: dict[str, object] = {}
    parse_option("UserKnownHostsFile=None", table)
    assert table == {"known_hosts": []}
    with pytest.raises(ConfigError) as caught:
        parse_option("GlobalKnownHostsFile=none /etc/ssh/ssh_known_hosts", table)
    assert caught.value.line() == (
        "-o GlobalKnownHostsFile=none /etc/ssh/ssh_known_hosts: none must stand alone (no file at all)"
    )


def test_options_map_to_tunnel_keys() -> None:
    table: dict[str, object] = {}
    for option in [
        "ServerAliveInterval=5",
        "serveralivecountmax 2",
        "ExitOnForwardFailure=yes",
        "StrictHostKeyChecking=accept-new",
        "UserKnownHostsFile=/a /b",
        "GlobalKnownHostsFile=none",
        "ConnectTimeout=3",
        "Compression=no",
        "Ciphers=aes128-gcm@openssh.com,chacha20-poly1305@openssh.com",
        "IdentityFile=/k1",
        "IdentityFile=/k2",
        "IdentitiesOnly=yes",
        "ProxyJump=a@j1,j2:2222",
        "BatchMode=yes",
        "BatchMode=no",
    ]:
        parse_option(option, table)
    assert table == {
        "keepalive_interval": 5,
        "keepalive_count": 2,
        "exit_on_forward_failure": True,
        "strict_host_key_checking": "accept-new",
        "known_hosts": ["/a", "/b"],
        "global_known_hosts": [],  # `none`: no file, as in ssh
        "connect_timeout": 3,
        "compression": False,
        "ciphers": ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"],
        "identity": ["/k1", "/k2"],
        "identities_only": True,
        "jump": ["a@j1", "j2:2222"],
    }


@pytest.mark.parametrize(
    ("option", "line"),
    [
        (
            "ServerAliveInterval=soon",
            "-o ServerAliveInterval=soon: must be a time such as 15, 30s, 1m or 1h30m",
        ),
        ("ExitOnForwardFailure=maybe", "-o ExitOnForwardFailure=maybe: must be yes or no"),
        (
            "StrictHostKeyChecking=ask",
            "-o StrictHostKeyChecking=ask: portfwd cannot ask (it runs unattended); use yes or accept-new",
        ),
        ("BatchMode=maybe", "-o BatchMode=maybe: must be yes or no"),
        ("ConnectTimeout=0", "-o ConnectTimeout=0: must be at least 1 s"),
        ("=x", "-o '=x': write -o Key=Value, e.g. -o ServerAliveInterval=15"),
    ],
)
def test_bad_options(option: str, line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_option(option, {})
    assert caught.value.line() == line


@pytest.mark.parametrize(
    ("value", "seconds"), [("15", 15), ("30s", 30), ("1m", 60), ("1h30m", 5400), ("2M", 120)]
)
def test_times_in_openssh_s_format(value: str, seconds: int) -> None:
    into: dict[str, object] = {}
    parse_option(f"ServerAliveInterval={value}", into)
    parse_option(f"ConnectTimeout {value}", into)
    assert into == {"keepalive_interval": seconds, "connect_timeout": seconds}


def test_known_hosts_tokens_are_checked_and_expanded() -> None:
    from portfwd.tunnelspec import check_tokens, expand_tokens

    values = {"%": "%", "h": "db.example", "p": "2222", "r": "alice", "d": "/home/a"}
    assert expand_tokens("%d/.ssh/kh-%h-%p-%r-100%%", values) == "/home/a/.ssh/kh-db.example-2222-alice-100%"
    check_tokens("~/.ssh/%C", "-o UserKnownHostsFile")
    with pytest.raises(ConfigError, match=r"%q is not a token ssh expands here"):
        check_tokens("~/.ssh/%q", "-o UserKnownHostsFile")
    with pytest.raises(ConfigError, match="a lone % at the end"):
        check_tokens("~/.ssh/kh%", "-o UserKnownHostsFile")
    with pytest.raises(ConfigError, match=r"%x"):
        parse_option("UserKnownHostsFile=/tmp/%x", {})


@given(st.text(max_size=40))
def test_known_hosts_tokens_fuzzed(path: str) -> None:
    from portfwd.tunnelspec import check_tokens, expand_tokens

    try:
        check_tokens(path, "-o UserKnownHostsFile")
    except ConfigError as exc:
        message = exc.line()
        assert "not a token ssh expands here" in message
        return
    values = {letter: "" for letter in "%CdhijkLlnpru"}
    assert len(expand_tokens(path, values)) <= len(path)
    if "%" not in path:
        assert expand_tokens(path, values) == path
