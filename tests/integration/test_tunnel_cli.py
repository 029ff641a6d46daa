"""`portfwd ssh` and `portfwd run` with [[tunnel]] as users run them, against a stock sshd.

portfwd runs as a subprocess; sshd is killed by PID and started again; peers are threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.peers import free_port
from tests.integration.processes import READY, portfwd_argv, run_portfwd, started
from tests.integration.sshd import Sshd, keygen
from tests.integration.test_status import Sink, send_all

pytestmark = [pytest.mark.integration, pytest.mark.root]
MiB = 1024 * 1024


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(tmp_path).start()
    yield server
    server.kill()


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink().start()
    yield server
    server.close()


def through(port: int, size: int = MiB) -> bool:
    """Send `size` random bytes to a forward whose far end is a Sink; True when its sha256 came back."""
    data = os.urandom(size)
    answer: list[bytes] = []
    send_all(port, data, answer)
    return answer == [hashlib.sha256(data).hexdigest().encode()]


def status(config: Path) -> dict:  # type: ignore[type-arg]
    result = run_portfwd("status", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def poll(config: Path, condition: str, seconds: float = 20.0) -> tuple[dict, list[str]]:  # type: ignore[type-arg]
    """Poll status until the tunnel's state is `condition`; returns the snapshot and states seen."""
    deadline = time.monotonic() + seconds
    seen: list[str] = []
    while time.monotonic() < deadline:
        snapshot = status(config)
        state = snapshot["tunnels"][0]["state"]
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == condition:
            return snapshot, seen
        time.sleep(0.05)
    raise AssertionError(f"tunnel never reached {condition!r}; saw {seen}")


def ssh_argv(sshd: Sshd, *args: str) -> list[str]:
    return portfwd_argv("ssh", *sshd.ssh_args(), *args)


def test_sshd_killed_and_back_the_tunnel_returns(sshd: Sshd, sink: Sink, tmp_path: Path) -> None:
    local, metrics = free_port(), free_port()
    control, config = tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    config.write_text(
        f'[control]\nsocket = "{control}"\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
        f'[[tunnel]]\nname = "lab"\nssh = "root@127.0.0.1:{sshd.port}"\n'
        f'identity = "{sshd.user_key}"\nagent = false\nknown_hosts = "{sshd.known_hosts}"\n'
        f'ssh_config = "/dev/null"\nreconnect_min = "300ms"\nreconnect_max = "1s"\nconnect_timeout = "20s"\n'
        f'local = ["127.0.0.1:{local}:127.0.0.1:{sink.port}"]\n'
    )
    with started(portfwd_argv("run", "-c", str(config)), ready=READY) as proc:
        poll(config, "up")
        assert through(local, 8 * MiB)
        sshd.kill()
        down, _ = poll(config, "backoff")
        assert down["tunnels"][0]["last_error"]
        # a client that arrives while the link is down is accepted and waits for it
        answer: list[bytes] = []
        data = os.urandom(MiB)
        waiting = threading.Thread(target=send_all, args=(local, data, answer))
        waiting.start()
        sshd.start()
        back, _ = poll(config, "up")
        waiting.join(30)
        assert answer == [hashlib.sha256(data).hexdigest().encode()]
        assert through(local, 8 * MiB), "a new transfer after the reconnect"
        lab = status(config)["tunnels"][0]
        scrape = subprocess.run(
            ["curl", "-sS", f"http://127.0.0.1:{metrics}/metrics"], capture_output=True, text=True, timeout=10
        ).stdout
        table = run_portfwd("status", "-c", str(config)).stdout
        assert proc.stop() == 0
    assert back["tunnels"][0]["reconnects"] == 1
    assert lab["forwards"][0]["connections_total"] == 3
    assert lab["forwards"][0]["bytes_up"] == 17 * MiB
    assert 'portfwd_tunnel_up{tunnel="lab"} 1.0' in scrape
    assert 'portfwd_tunnel_reconnects_total{tunnel="lab"} 1.0' in scrape
    assert "lab" in table
    assert "1 reconnects" in table


def test_remote_port_zero_and_public_bind(sshd: Sshd, sink: Sink) -> None:
    public = free_port()
    argv = ssh_argv(
        sshd, "-N", "-R", f"0:127.0.0.1:{sink.port}", "-R", f"0.0.0.0:{public}:127.0.0.1:{sink.port}"
    )
    with started(argv) as proc:
        allocated = int(
            re.findall(
                r"Allocated port (\d+) for remote forward to 127\.0\.0\.1:\d+",
                proc.wait_for("Allocated port"),
            )[0]
        )
        proc.wait_for(f"-R listening on 0.0.0.0:{public}")
        listening = subprocess.run(
            ["ss", "-Htln", f"sport = :{public}"], capture_output=True, text=True, timeout=10
        ).stdout
        assert f"0.0.0.0:{public}" in listening, "GatewayPorts clientspecified: bound on every address"
        assert through(allocated, 8 * MiB)
        assert through(public, 8 * MiB)


def test_exit_on_forward_failure(sshd: Sshd, sink: Sink) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        argv = ssh_argv(
            sshd, "-q", "-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{port}:127.0.0.1:{sink.port}"
        )
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"portfwd: root@127.0.0.1: remote forward -R 127.0.0.1:{port} -> 127.0.0.1:{sink.port} refused: "
        "Failed to create remote TCP listener (ExitOnForwardFailure)"
    ]


def test_unknown_and_changed_host_keys_are_refused(sshd: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    changed = tmp_path / "changed_known_hosts"
    changed.write_text(
        f"# the real key was replaced\n[127.0.0.1]:{sshd.port} {keygen(tmp_path / 'impostor')}\n"
    )
    local = free_port()
    lines = {}
    for name, known in (("unknown", empty), ("changed", changed)):
        argv = ssh_argv(sshd, "-q", "-o", f"UserKnownHostsFile={known}", "-L", f"{local}:127.0.0.1:9")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 1, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        lines[name] = result.stderr.strip()
    offered = "ssh-ed25519 SHA256:"
    assert lines["unknown"].startswith(f"portfwd: host key for [127.0.0.1]:{sshd.port} is unknown ({offered}")
    assert lines["unknown"].endswith(
        f"not in {empty}); add it to {empty} (ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}) "
        "or use -o StrictHostKeyChecking=accept-new"
    )
    assert lines["changed"].startswith(
        f"portfwd: host key for [127.0.0.1]:{sshd.port} has CHANGED (server offers {offered}"
    )
    assert lines["changed"].endswith(
        f"{changed}:2 holds another); refusing to connect; if the change is expected, delete line 2 of "
        f"{changed} (ssh-keygen -R '[127.0.0.1]:{sshd.port}' -f {changed})"
    )
    assert "Accepted publickey" not in (sshd.proc.output() if sshd.proc else ""), "never authenticated"


def test_a_host_key_the_admin_keeps_is_trusted_and_never_copied(
    sshd: Sshd, sink: Sink, tmp_path: Path
) -> None:
    """GlobalKnownHostsFile (/etc/ssh/ssh_known_hosts unless told): read as ssh reads it, so a
    key only the admin's file holds is trusted; accept-new then records nothing in the user's
    file. A changed key there is refused naming that file and line."""
    user = tmp_path / "user_known_hosts"
    user.write_text("")
    local = free_port()
    argv = portfwd_argv(
        "ssh", *_without_known_hosts(sshd), "-o", f"UserKnownHostsFile={user}",
        "-o", f"GlobalKnownHostsFile=/nonexistent {sshd.known_hosts}",
        "-o", "StrictHostKeyChecking=accept-new", "-L", f"127.0.0.1:{local}:127.0.0.1:{sink.port}",
    )  # fmt: skip
    with started(argv, ready=f"-L listening on 127.0.0.1:{local}") as proc:
        assert through(local), proc.output()
        assert proc.stop() == 0
    assert user.read_text() == "", "a key the admin's file vouches for is not copied"
    changed = tmp_path / "ssh_known_hosts"
    changed.write_text(f"[127.0.0.1]:{sshd.port} {keygen(tmp_path / 'impostor')}\n")
    result = subprocess.run(
        portfwd_argv(
            "ssh", "-q", *_without_known_hosts(sshd), "-o", f"UserKnownHostsFile={user}",
            "-o", f"GlobalKnownHostsFile={changed}", "-L", f"{local}:127.0.0.1:9",
        ),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "has CHANGED (server offers ssh-ed25519 SHA256:" in result.stderr
    assert (
        f"{changed}:1 holds another); refusing to connect; if the change is expected, add the new key "
        in (result.stderr)
    )
    assert (
        f"to {user} (ssh-keyscan -p {sshd.port} 127.0.0.1 >> {user}), or have {changed} fixed"
        in result.stderr
    )
    unknown = subprocess.run(
        portfwd_argv(
            "ssh", "-q", *_without_known_hosts(sshd), "-o", f"UserKnownHostsFile={user}",
            "-o", "GlobalKnownHostsFile=none", "-L", f"{local}:127.0.0.1:9",
        ),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert unknown.returncode == 1, unknown.stderr
    assert f"; not in {user}); add it to {user}" in unknown.stderr


def _without_known_hosts(sshd: Sshd) -> list[str]:
    """The server's `portfwd ssh` arguments without its UserKnownHostsFile (a test gives its own)."""
    args = sshd.ssh_args()
    at = args.index(f"UserKnownHostsFile={sshd.known_hosts}")
    return args[: at - 1] + args[at + 1 :]


def test_hash_known_hosts_records_a_hashed_name_ssh_reads(sshd: Sshd, sink: Sink, tmp_path: Path) -> None:
    """HashKnownHosts=yes (Debian's /etc/ssh/ssh_config sets it): accept-new files the first key
    under a hash of `[127.0.0.1]:PORT`, which ssh-keygen -F finds and OpenSSH's ssh trusts."""
    user = tmp_path / "hashed_known_hosts"  # not the fixture's known_hosts, which holds the key
    local = free_port()
    argv = portfwd_argv(
        "ssh", *_without_known_hosts(sshd), "-o", f"UserKnownHostsFile={user}",
        "-o", "StrictHostKeyChecking=accept-new", "-o", "HashKnownHosts=yes",
        "-L", f"127.0.0.1:{local}:127.0.0.1:{sink.port}",
    )  # fmt: skip
    with started(argv, ready=f"-L listening on 127.0.0.1:{local}") as proc:
        assert through(local), proc.output()
        assert proc.stop() == 0
    (line,) = user.read_text().splitlines()
    assert line.startswith("|1|"), line
    assert "127.0.0.1" not in line, line
    name = f"[127.0.0.1]:{sshd.port}"
    found = subprocess.run(
        ["ssh-keygen", "-F", name, "-f", str(user)], capture_output=True, text=True, timeout=30, check=False
    )
    assert found.returncode == 0, found.stderr
    assert f"Host {name} found" in found.stdout, found.stdout
    ssh = subprocess.run(
        [
            "ssh", "-F", "/dev/null", "-i", str(sshd.user_key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={user}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            "-p", str(sshd.port), "root@127.0.0.1", "true",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert ssh.returncode == 0, ssh.stderr  # OpenSSH trusts the key under its hashed name


def test_wrong_key_is_refused_with_one_line(sshd: Sshd, tmp_path: Path) -> None:
    keygen(tmp_path / "stranger")
    args = [str(tmp_path / "stranger") if item == str(sshd.user_key) else item for item in sshd.ssh_args()]
    result = subprocess.run(
        portfwd_argv("ssh", "-q", *args, "-D", str(free_port())), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "portfwd: root@127.0.0.1: authentication failed: Permission denied for user root on host 127.0.0.1; "
        "check -i KEY, the agent and the user"
    ]


def test_bad_arguments_exit_2_with_every_problem() -> None:
    result = run_portfwd(
        "ssh",
        "-L",
        "8080",
        "-D",
        "1:2:3",
        "-o",
        "Ciphers=rot13",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "Bogus=1",
        "-R",
        "8022",
        "user@host",
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "portfwd: -L 8080: '8080' has no target; write -L [bind:]port:host:hostport, e.g. 127.0.0.1:5432:db.internal:5432",
        "portfwd: -D 1:2:3: '1:2:3' is not a -D spec; write -D [bind:]port, e.g. 127.0.0.1:1080",
        "portfwd: -o StrictHostKeyChecking=no: portfwd never skips host-key checks; use yes or accept-new",
        "portfwd: -o Bogus: not an option portfwd ssh supports; it supports ServerAliveInterval, ServerAliveCountMax, "
        "ExitOnForwardFailure, StrictHostKeyChecking, UserKnownHostsFile, GlobalKnownHostsFile, HashKnownHosts, ConnectTimeout, "
        "Compression, Ciphers, KexAlgorithms, MACs, HostKeyAlgorithms, Port, User, IdentityFile, IdentitiesOnly, "
        "ProxyJump, BatchMode, GatewayPorts, AddressFamily, ProxyCommand=none (and takes, changing nothing, "
        "the ones a forwarding-only client has no use for: TCPKeepAlive, LogLevel, ControlMaster, ...)",
        "portfwd: -o Ciphers: unknown cipher 'rot13'; use one or more of: chacha20-poly1305@openssh.com, "
        "aes256-gcm@openssh.com, aes128-gcm@openssh.com, aes256-ctr, aes192-ctr, aes128-ctr",
    ]


def test_exit_on_forward_failure_for_a_busy_local_port(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        argv = portfwd_argv(
            "ssh",
            "-q",
            "-F",
            "/dev/null",
            "-o",
            f"UserKnownHostsFile={tmp_path / 'kh'}",
            "-o",
            "ExitOnForwardFailure=yes",
            "-p",
            str(free_port()),
            "-L",
            f"127.0.0.1:{port}:127.0.0.1:9",
            "root@127.0.0.1",
        )
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"portfwd: root@127.0.0.1: -L 127.0.0.1:{port} -> 127.0.0.1:9: cannot listen on 127.0.0.1:{port}: "
        "address already in use (ExitOnForwardFailure)"
    ]
