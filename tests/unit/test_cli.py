"""cli: exit codes and one-line errors for every way a command line can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from portfwd import __version__
from portfwd.cli import main

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"], capsys) == (0, f"portfwd {__version__}\n", "")


def test_unknown_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2
    assert err == "portfwd: No such command 'frobnicate'. (see portfwd --help)\n"


# click words these three messages a little differently from version to version; what portfwd
# promises is the shape: exit 2, one line, the offending word, and where to read more.
@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["forward", "--zzz", "1:h:1"], "--zzz"),
        (["forward"], "SPEC..."),
        (["forward", "--log-format", "xml", "1:h:1"], "xml"),
    ],
)
def test_click_usage_errors_are_one_line(
    argv: list[str], word: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("portfwd: ")
    assert word in err
    assert err.endswith(" (see portfwd forward --help)\n")


def test_bad_spec(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["forward", "8080:10.0.0.5:70000"], capsys)
    assert (code, err) == (
        2,
        "portfwd: spec 1 (8080:10.0.0.5:70000) target: port 70000 is out of range (1-65535)\n",
    )


def test_bad_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["forward", "--log-format", "xml", "1:h:1"], capsys)
    assert code == 2
    assert (
        err
        == "portfwd: Invalid value for '--log-format': 'xml' is not one of 'text', 'json'. (see portfwd forward --help)\n"
    )


def test_check_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["check", "-c", str(REPO / "portfwd.toml")], capsys)
    assert code == 0
    assert "demo" in out
    assert "127.0.0.1:8080" in out
    assert "127.0.0.1:9930" in out
    assert out.rstrip().endswith("config OK")


def test_check_lists_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[forward]]\nlisten = "70000"\nconnect = "x"\n')
    code, _, err = run(["check", "-c", str(config)], capsys)
    assert code == 2
    assert err.splitlines() == [
        "portfwd: forward[0].listen: port 70000 is out of range (1-65535)",
        "portfwd: forward[0].connect: missing port; write host:port",
    ]


def test_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["run", "-c", str(tmp_path / "none.toml")], capsys)
    assert (code, err) == (
        2,
        f"portfwd: {tmp_path / 'none.toml'}: no such config file; pass -c FILE or create portfwd.toml\n",
    )


def test_no_config_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PORTFWD_CONFIG", raising=False)
    if Path("/etc/portfwd/portfwd.toml").exists():
        pytest.skip("this machine has /etc/portfwd/portfwd.toml")
    code, _, err = run(["check"], capsys)
    assert code == 2
    assert err == (
        "portfwd: no config file found (looked in ./portfwd.toml, ~/.config/portfwd/portfwd.toml, "
        "/etc/portfwd/portfwd.toml); pass -c FILE or set PORTFWD_CONFIG\n"
    )


def test_nothing_to_run_and_check_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "empty.toml"
    config.write_text("[control]\nenabled = false\n")
    line = (
        "portfwd: nothing to run: the config has no [[forward]], [[tunnel]], [server], [gateway], "
        "[[map]], [metrics] or [web]; add one"
    )
    for command in ("run", "check"):
        code, out, err = run([command, "-c", str(config)], capsys)
        assert (code, out, err) == (2, "", line + "\n")


PRODUCT_TUNNEL = """
[[tunnel]]                         # SSH client tunnel (portfwd ssh, from the config)
name = "office"
ssh = "alice@bastion.example.org:22"
identity = "~/.ssh/id_ed25519"
known_hosts = "~/.ssh/known_hosts"  # strict by default
local   = ["127.0.0.1:5432:db.internal:5432"]
remote  = ["0.0.0.0:8022:localhost:22"]
dynamic = ["127.0.0.1:1080"]
"""


def test_check_shows_the_product_tunnel_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tunnel.toml"
    config.write_text(PRODUCT_TUNNEL)  # PRODUCT.md's [[tunnel]] example, verbatim
    code, out, _ = run(["check", "-c", str(config)], capsys)
    assert code == 0
    assert "office" in out
    assert "1 SSH tunnel(s)" in out
    assert out.rstrip().endswith("config OK")


def test_ssh_without_a_forward_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["ssh", "alice@host"], capsys)
    assert code == 2
    assert err.splitlines() == [
        "portfwd: no forward given; add -L, -R or -D (portfwd ssh only forwards ports)"
    ]


PRODUCT_SERVER = """
[server]                           # SSH tunnel server for stock ssh clients
listen = "0.0.0.0:2222"
host_key = "/var/lib/portfwd/host_ed25519"   # created on first start
gateway_ports = false              # -R binds loopback unless true
[[server.user]]
name = "alice"
authorized_keys = "/etc/portfwd/alice.keys"  # OpenSSH options honoured: permitopen, permitlisten, from, restrict
permit_open = ["db.internal:5432"]
permit_listen = ["0.0.0.0:8022"]
"""


def test_check_shows_the_product_server_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "server.toml"
    config.write_text(PRODUCT_SERVER)  # PRODUCT.md's [server] example, verbatim
    code, out, _ = run(["check", "-c", str(config)], capsys)
    assert code == 0
    assert "alice (open db.internal:5432; listen 0.0.0.0:8022)" in " ".join(out.split())
    assert out.rstrip().endswith("config OK")


def test_check_names_a_missing_gateway_interface(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nwan = "pfnosuch0"\nlan = "lo"\n')
    code, _, err = run(["check", "-c", str(config)], capsys)
    assert code == 2
    assert err.splitlines() == ["portfwd: gateway.wan: no interface 'pfnosuch0' on this machine; see ip link"]


def test_dependencies_warnings_are_filtered_by_module_not_ours() -> None:
    import warnings

    from portfwd.cli.console import quiet_dependencies

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_dependencies()
        for module in ("asyncssh.crypto.misc", "cryptography.utils", "aiohttp", "portfwdish"):
            warnings.warn_explicit("deprecated", DeprecationWarning, "x.py", 1, module=module)
        warnings.warn_explicit("DSA is deprecated", UserWarning, "x.py", 1, module="asyncssh")
        warnings.warn_explicit("ours", DeprecationWarning, "x.py", 1, module="portfwd.config")
        warnings.warn_explicit("a real bug", RuntimeWarning, "x.py", 1, module="asyncssh")
    assert [(str(item.message), item.category) for item in caught] == [
        ("ours", DeprecationWarning),
        ("a real bug", RuntimeWarning),
    ]


EVERY_SECTION = """
user = "nobody"
[[forward]]
name = "dns"
listen = "127.0.0.1:5353"
connect = "10.0.0.5:53"
protocol = "udp"
allow = ["10.0.0.0/8"]
map = true
[[forward]]
listen = "unix:/tmp/x.sock"
connect = "127.0.0.1:22"
relay = "protocol"
[[tunnel]]
name = "office"
ssh = "alice@bastion.example.org:22"
jump = ["bob@jump1"]
local = ["127.0.0.1:5432:db.internal:5432"]
dynamic = ["127.0.0.1:1080"]
keepalive_interval = "7.5s"
strict_host_key_checking = "accept-new"
[server]
listen = "0.0.0.0:2222"
host_key = "/var/lib/portfwd/host_ed25519"
[[server.user]]
name = "alice"
authorized_keys = "/etc/portfwd/alice.keys"
permit_open = ["db.internal:5432"]
[[map]]
port = 7000
external_port = "any"
protocol = "udp"
method = "pcp"
lease = "90m"
gateway = "192.168.1.1"
[metrics]
listen = "127.0.0.1:9930"
"""


def test_check_shows_every_section_from_its_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each section comes from the part that owns it (relay, ssh, router describe.py), in this order."""
    config = tmp_path / "every.toml"
    config.write_text(EVERY_SECTION)
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run(["check", "-c", str(config)], capsys)
    assert (code, err) == (0, "")
    lines = [line.rstrip() for line in out.splitlines()]
    rows = [[cell.strip() for cell in line.strip("│").split("│")] for line in lines if line.startswith("│")]
    assert rows == [
        ["dns", "127.0.0.1:5353", "10.0.0.5:53", "udp", "allow 10.0.0.0/8", "udp"],
        ["unix:/tmp/x.sock", "unix:/tmp/x.sock", "127.0.0.1:22", "tcp", "everyone", "protocol"],
        [
            "office",
            "alice@bastion.example.org:22 via bob@jump1",
            "-L 127.0.0.1:5432 -> db.internal:5432",
            "accept-new: ~/.ssh/known_hosts, ~/.ssh/known_hosts2",
            "7.5s x 3",
        ],
        ["", "", "-D 127.0.0.1:1080 -> socks", "", ""],
    ]
    assert [line for line in lines if line[:1] not in "┏┃┡│└"] == [
        f"{config}: 2 forward rule(s)",
        'relay = "auto": PORTFWD_AUTO_KERNEL=0 keeps relay = "auto" in userspace; no rule takes it here',
        "server: ssh on 0.0.0.0:2222, host key /var/lib/portfwd/host_ed25519, gateway_ports off; "
        "users: alice (open db.internal:5432; listen nothing)",
        "1 SSH tunnel(s)",
        "map[0]: ask router 192.168.1.1 for external port any/udp -> this host's 7000 via pcp, "
        "lease 5400 s, renewed at half",
        "forward[0].map: ask the default route's router for external port 5353/udp -> this host's 5353 "
        "via auto, lease 3600 s, renewed at half",
        "metrics: http://127.0.0.1:9930/metrics",
        "after binding, runs as user nobody",
        "config OK",
    ]
