"""cli/sshargs.py: ssh_config fills in what `portfwd ssh`'s command line leaves out, as in ssh."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import asyncssh
import pytest

from portfwd import planner
from portfwd.cli import sshargs
from portfwd.cli.sshargs import batch_mode, listen_flags, read_ssh_config, tunnel_from_args, with_flags
from portfwd.errors import ConfigError
from portfwd.specs import TunnelSpec
from portfwd.ssh import connection


def lab(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text("\n".join(["Host lab", "  HostName 10.0.0.1", *(f"  {line}" for line in lines), ""]))
    return path


def tunnel(config: Path, *options: str, local: tuple[str, ...] = ()) -> TunnelSpec:
    found = read_ssh_config("lab", str(config))
    args = ("lab", local, (), (), None, (), None, options, str(config), False, None)
    return planner.plan(tunnel_from_args(*args, found=found)).tunnels[0]


def test_forwards_join_and_options_fill_in(tmp_path: Path) -> None:
    known = tmp_path / "kh"
    config = lab(
        tmp_path,
        "LocalForward 8080 db:5432",
        "LocalForward 127.0.0.1:8081 db:5433",
        "RemoteForward 9000 localhost:22",
        "DynamicForward 1080",
        "ServerAliveInterval 5",
        "ServerAliveCountMax 2",
        "ExitOnForwardFailure yes",
        f"UserKnownHostsFile {known}",
        f"GlobalKnownHostsFile {known}.global",
        "StrictHostKeyChecking accept-new",
        "BatchMode yes",
        "Host *",
        "  ServerAliveInterval 99",
    )
    spec = tunnel(config, "ServerAliveCountMax=7", local=("7000:web:80",))
    assert [str(item) for item in spec.forwards] == [
        "-L 127.0.0.1:7000 -> web:80",
        "-L 127.0.0.1:8080 -> db:5432",
        "-L 127.0.0.1:8081 -> db:5433",
        "-R localhost:9000 -> localhost:22",
        "-D 127.0.0.1:1080 -> socks",
    ]
    assert spec.keepalive_interval == 5  # the first value wins
    assert spec.keepalive_count == 7  # the command line comes first
    assert spec.exit_on_forward_failure is True
    assert spec.known_hosts == (str(known),)
    assert spec.global_known_hosts == (f"{known}.global",)
    assert spec.strict_host_key_checking == "accept-new"
    assert read_ssh_config("lab", str(config))["BatchMode"] is True
    assert batch_mode(("BatchMode=no",)) is False
    assert batch_mode(()) is None


def test_without_f_the_users_then_the_systems_ssh_config_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ssh: ~/.ssh/config, then /etc/ssh/ssh_config (here a stand-in: tests never touch the
    machine's), the first value of each keyword winning across both."""
    user, system = tmp_path / "user_config", tmp_path / "system_config"
    user.write_text("Host systun\n  ServerAliveInterval 7\n")
    system.write_text("Host systun\n  ServerAliveInterval 99\n  LocalForward 8080 db:5432\n")
    monkeypatch.setattr(sshargs, "SSH_CONFIGS", (str(user), str(system)))
    found = read_ssh_config("systun", None)
    assert found["ServerAliveInterval"] == 7
    assert found["LocalForward"] == ["8080 db:5432"]
    monkeypatch.setattr(connection, "SSH_CONFIGS", (str(tmp_path / "missing"), str(system)))
    spec = TunnelSpec(label="t", ssh="systun", user=None, host="systun", port=None)
    assert connection._config_paths(spec) == [str(system)]  # what a connect hands asyncssh too
    assert connection._config_paths(replace(spec, ssh_config=())) == []  # `ssh_config = []`: none


def test_times_in_ssh_config_take_openssh_s_format(tmp_path: Path) -> None:
    """`ServerAliveInterval 1m` as ssh reads it, in portfwd's reading and in asyncssh's own (a
    connect parses the same file); a word that is no time is named with its file and line."""
    config = lab(tmp_path, "LocalForward 8080 db:5432", "ServerAliveInterval 1m", "ConnectTimeout 1h30m")
    spec = tunnel(config)
    assert (spec.keepalive_interval, spec.connect_timeout) == (60, 5400)
    options = asyncssh.SSHClientConnectionOptions(host="lab", config=[str(config)], known_hosts=None)
    assert options.keepalive_interval == 60
    bad = lab(tmp_path, "ConnectTimeout 1min")
    with pytest.raises(ConfigError) as caught:
        read_ssh_config("lab", str(bad))
    assert caught.value.line() == (
        f"ssh_config: {bad} line 3: Invalid ConnectTimeout time value: 1min; write e.g. 30, 30s, 1m or 1h30m"
    )


def test_known_hosts_none_in_ssh_config_is_no_file(tmp_path: Path) -> None:
    config = lab(
        tmp_path, "LocalForward 8080 db:5432", "UserKnownHostsFile none", "GlobalKnownHostsFile none"
    )
    spec = tunnel(config)
    assert (spec.known_hosts, spec.global_known_hosts) == ((), ())


def test_another_host_gets_nothing_and_a_bad_line_is_named(tmp_path: Path) -> None:
    config = lab(tmp_path, "LocalForward 8080 db:5432")
    assert read_ssh_config("elsewhere", str(config)) == {}
    bad = lab(tmp_path, "ServerAliveInterval soon")
    with pytest.raises(ConfigError) as caught:
        read_ssh_config("lab", str(bad))
    assert caught.value.line().startswith(f"ssh_config: {bad} line 3: ")
    spoiled = lab(tmp_path, "LocalForward 8080", "StrictHostKeyChecking no")
    with pytest.raises(ConfigError) as problems:
        tunnel(spoiled)
    assert problems.value.problems == [
        f"{spoiled}: LocalForward 8080: '8080' has no target; write -L [bind:]port:host:hostport, "
        "e.g. 127.0.0.1:5432:db.internal:5432",
        f"{spoiled}: StrictHostKeyChecking=no: portfwd never skips host-key checks; use yes or accept-new",
    ]


def test_g_listens_everywhere_and_4_narrows_the_family(tmp_path: Path) -> None:
    spec = tunnel(lab(tmp_path), local=("8080:web:80", "127.0.0.1:8081:web:80"))
    flagged = with_flags(spec, gateway_ports=True, family=socket.AF_INET)
    assert [item.bind for item in flagged.local] == ["", "127.0.0.1"]
    assert flagged.family == socket.AF_INET


def test_gateway_ports_and_address_family_come_from_o_or_ssh_config_as_g_and_4_do(tmp_path: Path) -> None:
    config = lab(tmp_path, "GatewayPorts yes", "AddressFamily inet6")
    found = read_ssh_config("lab", str(config))
    assert listen_flags((), found, False, None) == (True, "6")
    # the command line comes first: flags, then -o, then ssh_config
    assert listen_flags(("GatewayPorts=no", "AddressFamily=inet"), found, False, None) == (False, "4")
    assert listen_flags(("AddressFamily any",), found, True, None) == (True, None)
    assert listen_flags(("AddressFamily=inet6",), {}, False, "4") == (False, "4")
    assert listen_flags((), {}, False, None) == (False, None)
    tunnel(config, "GatewayPorts=yes", "AddressFamily=inet", local=("1:h:1",))  # accepted
    with pytest.raises(ConfigError) as caught:
        tunnel(lab(tmp_path), "AddressFamily=ipx", local=("1:h:1",))
    assert caught.value.problems == ["-o AddressFamily=ipx: must be any, inet or inet6"]
    with pytest.raises(ConfigError) as bad:
        tunnel(lab(tmp_path, "AddressFamily inet7"), local=("1:h:1",))
    assert bad.value.problems == [
        f"{tmp_path / 'ssh_config'}: AddressFamily=inet7: must be any, inet or inet6"
    ]


def test_proxy_jump_comes_from_ssh_config_and_a_proxy_command_is_refused(tmp_path: Path) -> None:
    """ssh reaches such a host through the bastion; portfwd ssh must not connect to it directly."""
    spec = tunnel(lab(tmp_path, "ProxyJump admin@bastion:2222"), local=("1:h:1",))
    assert spec.jump == ("admin@bastion:2222",)
    assert tunnel(lab(tmp_path, "ProxyJump bastion"), "ProxyJump=none", local=("1:h:1",)).jump == ()
    assert tunnel(lab(tmp_path, "ProxyCommand none"), local=("1:h:1",)).jump == ()
    with pytest.raises(ConfigError) as caught:
        tunnel(lab(tmp_path, "ProxyCommand nc %h %p"), local=("1:h:1",))
    assert caught.value.problems == [
        f"{tmp_path / 'ssh_config'}: ProxyCommand=nc 10.0.0.1 22: portfwd ssh runs no proxy commands; "
        "reach the server through a jump host with ProxyJump (-J user@host) instead"
    ]


def test_a_config_tunnel_follows_ssh_config_s_proxy_jump_and_refuses_its_proxy_command(
    tmp_path: Path,
) -> None:
    """A [[tunnel]] hands asyncssh a connector of its own, which would override ssh_config's
    ProxyJump: the jump hosts are read at connect time instead, each hop's own ProxyJump
    before it, as ssh follows them. `portfwd ssh` read the server's already."""
    from portfwd.ssh.connection import _hops

    base = TunnelSpec(label="lab", ssh="lab", user=None, host="lab", port=None)

    def hops(*lines: str, spec: TunnelSpec = base) -> list[str]:
        return _hops(replace(spec, ssh_config=(str(lab(tmp_path, *lines)),)))

    assert hops("ProxyJump admin@bastion:2222,second") == ["admin@bastion:2222", "second"]
    assert hops("ProxyJump none") == []
    assert hops("ProxyCommand=none") == [], "asyncssh keeps the '=': read as OpenSSH reads it"
    assert hops("ProxyJump b1", "Host b1", "  ProxyJump b2") == ["b2", "b1"], "b1 is reached through b2"
    with pytest.raises(ConfigError) as loop:
        hops("ProxyJump b1", "Host b1", "  ProxyJump b2", "Host b2", "  ProxyJump b1")
    assert loop.value.message == "ssh_config: ProxyJump leads through more than 8 hosts (a loop?)"
    with pytest.raises(ConfigError) as caught:
        hops("ProxyCommand nc %h %p")
    assert caught.value.message == (
        "ssh_config's ProxyCommand 'nc 10.0.0.1 22' for lab: portfwd runs no proxy commands"
    )
    with pytest.raises(ConfigError) as bad:
        hops("ExitOnForwardFailure maybe")
    assert bad.value.message.startswith("ssh_config: ")
    six = replace(base, ssh="[2001:db8::1]:22", host="2001:db8::1")
    assert hops("ServerAliveInterval 5", spec=six) == [], "an IPv6 server is not parsed again"
    assert _hops(replace(base, ssh_config=(str(tmp_path / "missing"),))) == []
    assert _hops(replace(base, jump=("j1",), ssh_config=(str(lab(tmp_path, "ProxyJump other")),))) == ["j1"]
    cli = tunnel(lab(tmp_path, "ProxyJump bastion"), "ProxyJump=none", local=("1:h:1",))
    assert with_flags(cli, gateway_ports=False, family=0).jump_from_ssh_config is False


def test_proxy_jump_wins_over_a_proxy_command_set_too(tmp_path: Path) -> None:
    """As asyncssh (and ssh when ProxyJump comes first): `Host *`'s ProxyCommand does not
    stop a host that has a ProxyJump."""
    config = lab(tmp_path, "ProxyJump bastion", "Host *", "  ProxyCommand nc %h %p")
    assert tunnel(config, local=("1:h:1",)).jump == ("bastion",)
