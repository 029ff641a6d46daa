"""config: the TOML file, its models, and one exact line per problem."""

from __future__ import annotations

import os
import re
import textwrap
import tomllib
from pathlib import Path

import pytest

from portfwd import config, planner
from portfwd.addr import HostPorts, PortRange, Transport, UnixPath
from portfwd.errors import ConfigError

PRODUCT_FORWARD = """
[[forward]]                        # userspace proxy rule
name = "web"
listen = "0.0.0.0:8080"
connect = "192.168.1.10:80"
protocol = "tcp"                   # "tcp" | "udp" | "tcp+udp"
allow = ["192.168.0.0/16", "2001:db8::/32"]
deny  = ["192.168.5.0/24"]         # deny wins over allow; no allow list = everyone
udp_idle_timeout = "60s"
[[forward.route]]                  # a different target per source range; first match wins
source  = "10.0.0.0/8"
connect = "10.0.0.6:80"

[metrics]
listen = "127.0.0.1:9930"          # Prometheus /metrics

[control]
socket = "/run/portfwd/portfwd.sock" # what `portfwd status` reads; per-user path when not root
"""


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "portfwd.toml"
    path.write_text(textwrap.dedent(text))
    return config.load(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value.problems


def test_product_example_loads(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, PRODUCT_FORWARD)
    rule = loaded.forward[0]
    assert rule.label == "web"
    assert rule.listen == HostPorts("0.0.0.0", PortRange(8080, 8080))
    assert rule.protocol is Transport.TCP
    assert [str(n) for n in rule.allow] == ["192.168.0.0/16", "2001:db8::/32"]
    assert rule.udp_idle_timeout == 60.0
    assert str(rule.route[0].connect) == "10.0.0.6:80"
    assert loaded.metrics is not None
    assert loaded.control.socket == "/run/portfwd/portfwd.sock"


def test_default_config_in_repo_is_valid() -> None:
    loaded = config.load(Path(__file__).parents[2] / "portfwd.toml")
    assert loaded.forward
    assert loaded.metrics is not None


@pytest.mark.parametrize(
    ("text", "value"),
    [('"90s"', 90.0), ('"10m"', 600.0), ('"2h"', 7200.0), ('"500ms"', 0.5), ("30", 30.0), ('"1d"', 86400.0)],
)
def test_durations(tmp_path: Path, text: str, value: float) -> None:
    rule = load_text(tmp_path, f'[[forward]]\nlisten="1"\nconnect="h:1"\nudp_idle_timeout={text}\n').forward[
        0
    ]
    assert rule.udp_idle_timeout == value


BAD = [
    (
        '[[forward]]\nlisten = "8080"\nconnect = "10.0.0.5"\n',
        "forward[0].connect: missing port; write host:port",
    ),
    (
        '[[forward]]\nlisten = "8080"\nconnect = "h:1"\n[[forward]]\nlisten = "70000"\nconnect = "h:1"\n',
        "forward[1].listen: port 70000 is out of range (1-65535)",
    ),
    (
        '[[forward]]\nlisten = "8080"\nconnect = "h:1"\nbogus = 1\n',
        "forward[0].bogus: unknown key; remove it or use one of: name, listen, connect, backend, balance, health, protocol, allow, "
        "deny, route, udp_idle_timeout, udp_max_flows, connect_timeout, relay, dual_stack, backlog, reuseport, map, tcp_keepalive, idle_timeout, proxy_protocol, "
        "accept_proxy_protocol, trusted_proxies, max_connections, max_connections_per_source, rate, "
        "bandwidth, bandwidth_per_connection, transparent",
    ),
    ('[[forward]]\nlisten = "8080"\n', "forward[0].connect: required key is missing; add it"),
    (
        '[[forward]]\nlisten = "1"\nconnect = "h:1"\nprotocol = "sctp"\n',
        "forward[0].protocol: must be 'tcp', 'udp' or 'tcp+udp'",
    ),
    (
        '[[forward]]\nlisten = "1"\nconnect = "h:1"\nudp_idle_timeout = "soon"\n',
        'forward[0].udp_idle_timeout: \'soon\' is not a duration; write a duration such as "90s", "10m" or "2h"',
    ),
    (
        '[[forward]]\nlisten = "1"\nconnect = "h:1"\nudp_idle_timeout = "0s"\n',
        "forward[0].udp_idle_timeout: duration '0s' must be more than zero",
    ),
    (
        '[[forward]]\nlisten = "1"\nconnect = "h:1"\nallow = ["10.0.0.1/8"]\n',
        "forward[0].allow: '10.0.0.1/8' has host bits set; write 10.0.0.0/8",
    ),
    (
        '[[forward]]\nlisten = "1"\nconnect = "h:1"\ndeny = ["everyone"]\n',
        'forward[0].deny: \'everyone\' is not an IP network; write a CIDR such as "10.0.0.0/8" or "2001:db8::/32"',
    ),
    (
        '[[forward]]\nlisten = "8000-8010"\nconnect = "h:9000-9005"\n',
        "forward[0].connect: port range 9000-9005 has 6 ports but listen 8000-8010 has 11; "
        "use ranges of equal length or one target port",
    ),
    (
        '[[forward]]\nlisten = "1"\nconnect = "h:1"\n[[forward]]\nlisten = "127.0.0.1:1"\nconnect = "h:2"\n',
        "forward[1].listen: 127.0.0.1:1/tcp is already used by forward[0]; give each rule its own port",
    ),
    (
        '[[forward]]\nlisten = "unix:/tmp/a.sock"\nconnect = "h:1"\nprotocol = "udp"\n',
        'forward[0].listen: UDP cannot listen on a Unix stream socket; use protocol = "tcp"',
    ),
    (
        '[[forward]]\nlisten = "1"\nconnect = "unix:/tmp/a.sock"\nprotocol = "tcp+udp"\n',
        'forward[0].connect: UDP cannot reach a Unix stream socket; use protocol = "tcp"',
    ),
    (
        '[[forward]]\nlisten = "unix:/tmp/a.sock"\nconnect = "h:1"\nallow = ["10.0.0.0/8"]\n',
        "forward[0].allow: allow, deny and route need an IP listener; a Unix socket has no client "
        "address (use file permissions instead)",
    ),
    (
        '[[forward]]\nname = "a"\nlisten = "1"\nconnect = "h:1"\n[[forward]]\nname = "a"\nlisten = "2"\nconnect = "h:1"\n',
        "forward[1].name: 'a' is already the name of forward[0]; pick another name",
    ),
    (
        '[[forward]]\nlisten = "1"\nconnect = "h:1"\n[[forward.route]]\nsource = "10.0.0.0/8"\n',
        "forward[0].route[0].connect: required key is missing; add it",
    ),
    ('[forward]\nlisten = "1"\n', "forward: must be an array of tables; write [[forward]]"),
    (
        '[metrics]\nlisten = "127.0.0.1:9000-9001"\n',
        'metrics.listen: must be one host:port; write "127.0.0.1:9930"',
    ),
    (
        'colour = "blue"\n',
        "colour: unknown key; remove it or use one of: user, group, drain_timeout, ssh_fast_path, workers, forward, tunnel, server, gateway, map, metrics, web, control",
    ),
    ('[gateway]\nwan = "eth0"\n', "gateway.lan: required key is missing; add it"),
    (
        '[gateway]\nwan = "eth0"\nlan = "eth1"\n[[gateway.trigger]]\ntrigger = "sctp/6667"\nopen = ["tcp/7000"]\n',
        "gateway.trigger[0].trigger: 'sctp/6667': the protocol must be tcp or udp; write \"tcp/6667\"",
    ),
    (
        '[gateway]\nwan = "eth0"\nlan = "eth1"\n[[gateway.trigger]]\ntrigger = "tcp/6667"\nopen = ["tcp/70000"]\n',
        "gateway.trigger[0].open: 'tcp/70000': port 70000 is out of range (1-65535)",
    ),
    (
        '[gateway]\nwan = "eth0"\nlan = "eth1"\n[[gateway.forward]]\nport = 80\nto = "web.lan:80"\n',
        "gateway.forward[0].to: 'web.lan' is not an IP address: the kernel forwards to addresses, not names; "
        "write the LAN host's IPv4 address, or its IPv6 address for a pinhole",
    ),
    (
        '[gateway]\nwan = "eth0"\nlan = "eth1"\n[[gateway.forward]]\nport = 8443\nto = "[2001:db8:77::10]:443"\n',
        "gateway.forward[0].to: [2001:db8:77::10]:443 is IPv6, which the gateway opens rather than translates, "
        'so its port(s) must be the WAN port(s); write to = "[2001:db8:77::10]:8443"',
    ),
    (
        '[gateway]\nwan = "eth0"\nlan = "eth1"\n[[gateway.forward]]\nport = 443\nto = "[2001:db8:77::10]:443"\n'
        'allow = ["198.51.100.0/24"]\n',
        "gateway.forward[0].allow: 198.51.100.0/24 is IPv4 but the target 2001:db8:77::10 is IPv6; "
        "list networks of the target's family",
    ),
    (
        '[gateway]\nwan = "eth0"\nlan = "eth1"\n[[gateway.forward]]\nport = "80-81"\nto = "10.0.0.1:80"\n'
        '[[gateway.forward]]\nport = 81\nto = "10.0.0.2:80"\n',
        "gateway.forward[1].port: 81/tcp is already forwarded by gateway.forward[0]; give each rule its own port",
    ),
    ("[map]\nport = 1\n", "map: must be an array of tables; write [[map]]"),
    (
        '[[map]]\nport = 80\nexternal_port = "some"\n',
        "map[0].external_port: 'some' is not a port; write a number in 1-65535 or \"any\"",
    ),
    ('[[map]]\nport = 80\nmethod = "igd"\n', "map[0].method: must be 'auto', 'pcp', 'natpmp' or 'upnp'"),
    (
        '[[map]]\nport = 80\nupnp_url = "router"\n',
        "map[0].upnp_url: 'router' is not a URL; write the router's description URL, e.g. http://192.168.1.1:5000/rootDesc.xml",
    ),
    (
        '[[map]]\nport = 80\ngateway = "router.lan"\n',
        "map[0].gateway: 'router.lan' is not an IPv4 address; write the router's LAN address",
    ),
    (
        "[[map]]\nport = 80\n[[map]]\nport = 80\n",
        "map[1].port: local port 80/tcp is already mapped by map[0]; map each port once",
    ),
    (
        "[[map]]\nport = 80\n[[map]]\nport = 81\nexternal_port = 80\n",
        "map[1].external_port: external port 80/tcp is already mapped by map[0]; map each port once",
    ),
    (
        '[[forward]]\nlisten = "8000-8001"\nconnect = "h:1"\nmap = true\n',
        "forward[0].map: only a rule that listens on one TCP/UDP port can be published; add a [[map]] per port instead",
    ),
    (
        '[[forward]]\nlisten = "8000"\nconnect = "h:1"\nmap = true\n[[map]]\nport = 8000\n',
        "forward[0].map.port: local port 8000/tcp is already mapped by map[0]; map each port once",
    ),
    (
        '[server]\nlisten = "0.0.0.0:2222"\n',
        "server: no [[server.user]]; add one with name and authorized_keys (portfwd server never runs without users)",
    ),
    (
        '[server]\n[[server.user]]\nname = "alice"\nauthorized_keys = "/k"\npermit_open = ["db"]\n',
        'server.user[0].permit_open: \'db\' is not host:port; write "db.internal:5432", "*:8022", "0.0.0.0:*" or "any"',
    ),
    ('[[tunnel]]\nname = "office"\n', "tunnel[0].ssh: required key is missing; add it"),
    ('[[tunnel]]\nssh = "a@h"\n', "tunnel[0]: no forward; add local, remote or dynamic (or -L/-R/-D)"),
    (
        '[[tunnel]]\nssh = "a@h"\nlocal = ["8080"]\n',
        "tunnel[0].local: [0] '8080' has no target; write -L [bind:]port:host:hostport, e.g. 127.0.0.1:5432:db.internal:5432",
    ),
    (
        '[[tunnel]]\nssh = "a@h"\ndynamic = ["1080"]\nstrict_host_key_checking = "no"\n',
        'tunnel[0].strict_host_key_checking: portfwd never skips host-key checks; use "yes" or "accept-new"',
    ),
    (
        '[[tunnel]]\nssh = "a@h"\ndynamic = ["1080"]\nknown_hosts = ["~/.ssh/kh-%h-%z"]\n',
        "tunnel[0].known_hosts: known hosts file '~/.ssh/kh-%h-%z': %z is not a token ssh expands here; "
        "use %% for a percent sign, or one of %C %d %h %i %j %k %L %l %n %p %r %u",
    ),
    (
        '[[tunnel]]\nssh = "a@h"\ndynamic = ["1080"]\nsocks_user = "u"\n',
        "tunnel[0].socks_user: set socks_user and socks_password together",
    ),
    (
        '[[tunnel]]\nssh = "a@h:99999"\ndynamic = ["1080"]\n',
        "tunnel[0].ssh: port 99999 is out of range (1-65535)",
    ),
    (
        '[[tunnel]]\nssh = "a@h"\ndynamic = "1080"\nciphers = ["rot13"]\n',
        "tunnel[0].ciphers: unknown cipher 'rot13'; use one or more of: chacha20-poly1305@openssh.com, aes256-gcm@openssh.com, aes128-gcm@openssh.com, aes256-ctr, aes192-ctr, aes128-ctr",
    ),
    (
        '[[tunnel]]\nssh = "h"\nremote = ["1.2.3.4"]\n',
        "tunnel[0].remote: [0] port '1.2.3.4' is not a number; write a port number such as 8080",
    ),
    (
        '[[forward]]\nlisten = 8080\nconnect = "h:1"\n',
        'forward[0].listen: 8080 is not an address; write a string such as "127.0.0.1:8080"',
    ),
    (
        '[[forward]]\nlisten = "1"\nconnect = "h:1"\nudp_max_flows = 0\n',
        "forward[0].udp_max_flows: must be greater than or equal to 1",
    ),
    (
        '[[forward]]\nlisten = "1"\nconnect = "h:1"\nconnect_timeout = inf\n',
        'forward[0].connect_timeout: duration inf is too long; the longest is "365d"',
    ),
    (
        '[[forward]]\nlisten = "1"\nconnect = "h:1"\nconnect_timeout = nan\n',
        "forward[0].connect_timeout: duration nan must be more than zero",
    ),
    (
        'drain_timeout = "99999999d"\n[[forward]]\nlisten = "1"\nconnect = "h:1"\n',
        "drain_timeout: duration '99999999d' is too long; the longest is \"365d\"",
    ),
    (
        '[[forward]]\nlisten = "1"\nconnect = "h:1"\ndual_stack = "yes"\n',
        "forward[0].dual_stack: must be true or false",
    ),
    (
        '[[forward]]\nname = "web\\nERROR forged"\nlisten = "1"\nconnect = "h:1"\n',
        "forward[0].name: 'web\\nERROR forged' has control or invisible characters; use printable text",
    ),
    (
        '[[forward]]\nname = ".."\nlisten = "1"\nconnect = "h:1"\n',
        "forward[0].name: '..' is not a usable name (web addresses cannot carry it); choose another",
    ),
    (
        "[control]\nenabled = false\n",
        "nothing to run: the config has no [[forward]], [[tunnel]], [server], [gateway], [[map]], [metrics] or [web]; add one",
    ),
]


def test_a_deeply_nested_config_is_one_line(tmp_path: Path) -> None:
    assert problems(tmp_path, "x = " + "[" * 5000 + "]" * 5000 + "\n") == [
        f"{tmp_path / 'portfwd.toml'}: invalid TOML: nested too deeply"
    ]


def test_only_a_regular_file_of_sane_size_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path, line in (
        (fifo, f"{fifo}: not a regular file; pass -c with a TOML file"),
        (Path("/dev/zero"), "/dev/zero: not a regular file; pass -c with a TOML file"),
        (tmp_path, f"{tmp_path}: not a regular file; pass -c with a TOML file"),
    ):
        with pytest.raises(ConfigError) as caught:
            config.load(path)
        assert caught.value.problems == [line]
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * (config.MAX_CONFIG_BYTES + 10) + b"\n")
    with pytest.raises(ConfigError) as caught:
        config.load(big)
    assert caught.value.problems == [f"{big}: config is larger than 1 MiB"]


@pytest.mark.parametrize(
    ("text", "line"), BAD, ids=[line.split(":")[0] + str(i) for i, (_, line) in enumerate(BAD)]
)
def test_bad_configs_give_exact_lines(tmp_path: Path, text: str, line: str) -> None:
    assert problems(tmp_path, text) == [line]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, '[[forward]]\nlisten = "70000"\nconnect = "x"\nbogus = 1\n')
    assert found == [
        "forward[0].listen: port 70000 is out of range (1-65535)",
        "forward[0].connect: missing port; write host:port",
        "forward[0].bogus: unknown key; remove it or use one of: name, listen, connect, backend, balance, health, protocol, allow, "
        "deny, route, udp_idle_timeout, udp_max_flows, connect_timeout, relay, dual_stack, backlog, reuseport, map, tcp_keepalive, idle_timeout, proxy_protocol, "
        "accept_proxy_protocol, trusted_proxies, max_connections, max_connections_per_source, rate, "
        "bandwidth, bandwidth_per_connection, transparent",
    ]


def test_typo_gets_a_suggestion(tmp_path: Path) -> None:
    assert problems(tmp_path, '[[forward]]\nlisten = "8080"\nconect = "h:1"\n') == [
        "forward[0].connect: required key is missing; add it",
        "forward[0].conect: unknown key; did you mean connect?",
    ]


def test_toml_syntax_error_is_one_line(tmp_path: Path) -> None:
    found = problems(tmp_path, '[[forward]]\nlisten = "1\n')
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'portfwd.toml'}: invalid TOML: ")
    assert "line 2" in found[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.toml")
    assert (
        str(info.value)
        == f"{tmp_path / 'nope.toml'}: no such config file; pass -c FILE or create portfwd.toml"
    )


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PORTFWD_CONFIG", raising=False)
    assert config.find("explicit.toml") == Path("explicit.toml")
    (tmp_path / "home" / ".config" / "portfwd").mkdir(parents=True)
    (tmp_path / "home" / ".config" / "portfwd" / "portfwd.toml").write_text("")
    assert config.find(None) == tmp_path / "home" / ".config" / "portfwd" / "portfwd.toml"
    (tmp_path / "portfwd.toml").write_text("")
    assert config.find(None) == Path("portfwd.toml")
    monkeypatch.setenv("PORTFWD_CONFIG", "/elsewhere.toml")
    assert config.find(None) == Path("/elsewhere.toml")


def test_unix_and_ipv6_rules(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        '[[forward]]\nlisten = "unix:/tmp/in.sock"\nconnect = "[::1]:80"\n'
        '[[forward]]\nlisten = "[::]:81"\nconnect = "unix:/run/app.sock"\ndual_stack = true\n',
    )
    assert loaded.forward[0].listen == UnixPath("/tmp/in.sock")
    assert loaded.forward[1].connect[0] == UnixPath("/run/app.sock")
    assert loaded.forward[1].dual_stack


_POOL = '[[forward]]\nlisten = "8080"\n'


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            _POOL + 'connect = "a:1"\n[[forward.backend]]\nconnect = "b:1"\n',
            "forward[0].backend: give connect or [[forward.backend]] tables, not both",
        ),
        (
            _POOL + "connect = []\n",
            'forward[0].connect: must be a target or a list of 1 to 64 targets; write "10.0.0.5:80" or ["a:80", "b:80"]',
        ),
        (_POOL + 'connect = ["a:1", "b"]\n', "forward[0].connect: missing port; write host:port"),
        (
            '[[forward]]\nlisten = "8000-8001"\nconnect = ["a:1", "b:1-3"]\n',
            "forward[0].connect[1]: port range 1-3 has 3 ports but listen 8000-8001 has 2; "
            "use ranges of equal length or one target port",
        ),
        (
            _POOL
            + '[[forward.backend]]\nconnect = "a:1"\nname = "x"\n[[forward.backend]]\nconnect = "b:1"\nname = "x"\n',
            "forward[0].backend[1].name: 'x' is already backend[0]'s; give each backend its own name",
        ),
        (
            _POOL + '[[forward.backend]]\nconnect = "a:1"\nbackup = true\n',
            "forward[0].backend: every backend is a backup; make at least one backup = false",
        ),
        (
            _POOL + '[[forward.backend]]\nconnect = "a:1"\nweight = 0\n',
            "forward[0].backend[0].weight: must be greater than or equal to 1",
        ),
        (
            _POOL + 'connect = ["a:1", "b:1"]\nbalance = "random"\n',
            "forward[0].balance: must be 'round-robin', 'least-connections', 'source-hash' or 'first'",
        ),
        (
            _POOL
            + '[[forward.backend]]\nconnect = "a:1"\nname = "eu"\n[[forward.route]]\nsource = "10.0.0.0/8"\nbackend = "us"\n',
            "forward[0].route[0].backend: no backend is named 'us' ('eu'); name one in [[forward.backend]]",
        ),
        (
            _POOL
            + 'connect = "a:1"\n[[forward.route]]\nsource = "10.0.0.0/8"\nconnect = "b:1"\nbackend = "x"\n',
            "forward[0].route[0].backend: give connect or backend, not both",
        ),
        (
            _POOL + 'connect = "a:1"\n[forward.health]\ninterval = "1s"\ntimeout = "2s"\n',
            "forward[0].health.timeout: 2s is longer than interval (1s); a check must end before the next begins",
        ),
        (
            _POOL + 'connect = "a:1"\nprotocol = "udp"\n[forward.health]\n',
            "forward[0].health.send: a UDP rule's check sends a datagram and waits for an answer; "
            'give send and expect, or check = "none"',
        ),
        (
            _POOL + 'connect = "a:1"\nbandwidth = "10 furlongs"\n',
            "forward[0].bandwidth: '10 furlongs' is not a bandwidth from 8kbit to 8000Gbit; write bits or "
            'bytes a second, e.g. "10Mbit", "512kbit", "2MB" or "1MiB"',
        ),
        (
            _POOL + 'connect = "a:1"\nbandwidth = "10Mbit"\nrelay = "splice"\n',
            'forward[0].relay: "splice" moves bytes in the kernel, past any bandwidth limit; remove '
            'relay = "splice" (a limited rule uses the protocol relay)',
        ),
        (
            _POOL + 'connect = "a:1"\nprotocol = "udp"\nbandwidth_per_connection = "1Mbit"\n',
            "forward[0].bandwidth_per_connection: TCP only in this version; this rule is udp",
        ),
        (
            _POOL + 'connect = "a:1"\nprotocol = "tcp+udp"\nproxy_protocol = "v1"\n',
            'forward[0].proxy_protocol: "v1" names TCP connections only; use "v2" (each UDP datagram '
            "then begins with the header, as go-mmproxy reads it)",
        ),
        (
            _POOL + 'connect = "unix:/run/app.sock"\ntransparent = true\n',
            "forward[0].transparent: needs IP on both sides (the upstream connection leaves from the "
            "client's address); remove it or use IP addresses",
        ),
    ],
)
def test_backend_bandwidth_and_transparent_problems(tmp_path: Path, text: str, line: str) -> None:
    assert problems(tmp_path, text) == [line]


def test_backends_plan_with_names_weights_and_routes(tmp_path: Path) -> None:
    from portfwd import planner

    loaded = load_text(
        tmp_path,
        _POOL
        + 'balance = "source-hash"\nbandwidth = "8Mbit"\n'
        + '[[forward.backend]]\nconnect = "a:1"\nname = "eu"\nweight = 3\n'
        + '[[forward.backend]]\nconnect = "a:1"\nbackup = true\n'
        + '[[forward.backend]]\nconnect = "a:1"\n'
        + '[[forward.route]]\nsource = "10.0.0.0/8"\nbackend = "eu"\n'
        + '[forward.health]\nsend = "PING\\r\\n"\nexpect = "+PONG"\n',
    )
    rule = planner.plan(loaded).rules[0]
    assert [(b.name, b.weight, b.backup) for b in rule.backends] == [
        ("eu", 3, False),
        ("a:1", 1, True),
        ("a:1#3", 1, False),
    ]
    assert rule.route[0].backend == 0
    assert rule.balance == "source-hash"
    assert rule.health.send == b"PING\r\n"
    assert rule.health.interval == 2.0
    assert rule.bandwidth == 1e6
    single = planner.plan(load_text(tmp_path, _POOL + 'connect = "a:1"\n')).rules[0]
    assert single.backends == ()
    assert single.health.interval == 0.0  # one target: the fast path


def test_a_rule_the_kernel_cannot_relay_is_refused_naming_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "kernel.toml"
    path.write_text(
        '[[forward]]\nlisten = "127.0.0.1:8001"\nconnect = "127.0.0.1:9001"\nrelay = "kernel"\n'
        'proxy_protocol = "v2"\n'
        '[[forward]]\nlisten = "127.0.0.1:8002"\nconnect = "web.example:80"\nrelay = "kernel"\n'
    )
    with pytest.raises(ConfigError) as info:
        planner.load(path)
    assert info.value.problems == [
        'forward[0]: proxy_protocol needs userspace; remove relay = "kernel" or that setting',
        "forward[1].connect: host name 'web.example' needs userspace (the kernel resolves no names); "
        'write an IP address; remove relay = "kernel" or that setting',
    ]


def test_product_s_gateway_example_loads(tmp_path: Path) -> None:
    """PRODUCT.md's `[gateway]` flowtable and `[gateway.ha]` keys, and relay = "kernel", as written."""
    path = tmp_path / "ha.toml"
    path.write_text(
        textwrap.dedent(
            """
            [gateway]
            wan = "eth0"
            lan = "eth1"
            flowtable = true                   # offload established flows
            [gateway.ha]                       # two routers, keepalived (VRRP) + conntrackd (state sync)
            peer = "10.9.9.2"                  # the other router, on the sync link
            virtual_addresses = ["203.0.113.1/24", "192.168.1.1/24"]
            sync_interface = "eth2"

            [[forward]]
            listen = "0.0.0.0:443"
            connect = "10.0.0.5:443"
            relay = "kernel"
            """
        )
    )
    plan = planner.load(path)
    assert plan.gateway is not None
    assert plan.gateway.ha is not None
    assert plan.gateway.flowtable
    assert [str(vip) for vip in plan.gateway.ha.virtual_addresses] == ["203.0.113.1/24", "192.168.1.1/24"]
    assert plan.rules[0].relay == "kernel"


def test_gateway_ha_bad_input_names_the_field_and_the_fix(tmp_path: Path) -> None:
    base = '[gateway]\nwan = "eth0"\nlan = "eth1"\n[gateway.ha]\nsync_interface = "eth2"\n'
    assert problems(tmp_path, base + 'peer = "router2"\nvirtual_addresses = ["203.0.113.1/24"]\n') == [
        "gateway.ha.peer: 'router2' is not an IPv4 address; write the other router's address on the sync link"
    ]
    assert problems(tmp_path, base + 'peer = "10.9.9.2"\nvirtual_addresses = ["203.0.113.1"]\n') == [
        "gateway.ha.virtual_addresses: '203.0.113.1' is not address/prefix; write it as 203.0.113.1/24"
    ]
    assert problems(tmp_path, base + 'peer = "10.9.9.2"\nvirtual_addresses = []\n') == [
        'gateway.ha.virtual_addresses: must be a list of address/prefix; write ["203.0.113.1/24", "192.168.1.1/24"]'
    ]


def test_every_toml_example_of_the_readme_is_a_valid_config() -> None:
    """The README is the user's copy of PRODUCT.md: each of its TOML blocks, as written, passes
    the config's own validation (what `portfwd check` reads before asking the machine about
    interfaces and files). A block of top-level keys alone is a fragment: its one problem may be
    that it declares nothing to run."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert len(blocks) >= 8
    refused: list[tuple[int, list[str]]] = []
    for index, block in enumerate(blocks):
        try:
            config.validate(tomllib.loads(block), f"README.md toml block {index}")
        except ConfigError as exc:
            fragment = not any(line.startswith("[") for line in block.splitlines())
            if not (fragment and exc.problems[0].startswith("nothing to run")):
                refused.append((index, exc.problems))
    assert refused == []
