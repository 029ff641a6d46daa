"""`portfwd ssh` as a drop-in for `ssh -N` and autossh (#21), against a stock sshd.

Keys as ssh treats them (a missing -i, a key others can read, a passphrase asked on a real
pseudo-terminal or left to the agent), first-connect failures that end it at once, SIGHUP,
a -R that loses no connection while it comes up, and a refused channel's reason in the log.
portfwd runs as a subprocess; sshd, the agent and the terminal are real.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import need_binary, need_root
from tests.integration.peers import MiB, free_port
from tests.integration.processes import READY, REPO, Proc, portfwd_argv, run_portfwd, started
from tests.integration.sshd import Sshd, descendants, keygen
from tests.integration.test_dropbear import _kexinit, _packet
from tests.integration.test_status import Sink
from tests.integration.test_tunnel_cli import through

pytestmark = [pytest.mark.integration, pytest.mark.root]
PASSPHRASE = "correct horse battery staple"


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


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without an agent of the caller's (each test brings its own)."""
    env = {key: value for key, value in os.environ.items() if key != "SSH_AUTH_SOCK"}
    return {**env, **extra}


def locked_key(sshd: Sshd, path: Path) -> Path:
    """A passphrase-protected key that sshd accepts."""
    subprocess.run(
        # PKCS#8 (PBES2): asyncssh decrypts it without bcrypt, which OpenSSH's own format needs
        ["ssh-keygen", "-q", "-t", "ecdsa", "-m", "PKCS8", "-N", PASSPHRASE, "-C", "locked", "-f", str(path)],
        check=True,
        timeout=30,
    )
    with (sshd.root / "authorized_keys").open("a") as keys:
        keys.write(Path(f"{path}.pub").read_text())
    return path


def argv_with_key(sshd: Sshd, key: Path, *args: str) -> list[str]:
    """`portfwd ssh` to sshd with `key` as the only -i."""
    given = [str(key) if item == str(sshd.user_key) else item for item in sshd.ssh_args()]
    return portfwd_argv("ssh", *given, *args)


def detached(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run with no controlling terminal (a new session), as under cron or systemd."""
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env=env or clean_env(),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def alive(pid: int) -> bool:
    """Is `pid` running (not gone, not a zombie its new parent has yet to reap)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class OnTerminal:
    """A process on a pseudo-terminal of its own (its controlling tty), read and typed into."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, self.master = pty.fork()
        if pid == 0:  # the child: become portfwd at once
            os.chdir(REPO)
            os.execve(argv[0], argv, env)
        self.pid = pid
        self.text = ""
        self.status: int | None = None

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.text += chunk.decode(errors="replace")
        return bool(chunk)

    def wait_for(self, needle: str, count: int = 1, timeout: float = 20.0) -> None:
        """Until `needle` has appeared `count` times, bounded."""
        deadline = time.monotonic() + timeout
        while self.text.count(needle) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(min(remaining, 0.5)):
                raise AssertionError(f"{needle!r} (x{count}) not seen on the terminal:\n{self.text}")

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def wait(self, timeout: float = 15.0) -> int:
        """Until the process exits by itself (bounded; then stopped), reading what it prints."""
        deadline = time.monotonic() + timeout
        while self.status is None and time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = os.waitstatus_to_exitcode(status)
            else:
                self._read(0.05)
        while self._read(0.05) and self.status is not None and select.select([self.master], [], [], 0)[0]:
            pass  # the rest of its output
        return self.stop()

    def stop(self) -> int:
        """SIGTERM by PID, wait (bounded), KILL if need be; returns the exit code."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while self.status is None:
                done, status = os.waitpid(self.pid, os.WNOHANG)
                if done:
                    self.status = os.waitstatus_to_exitcode(status)
                elif time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    self.status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
                else:
                    self._read(0.1)
        with contextlib.suppress(OSError):
            os.close(self.master)
        return self.status


# ---------------------------------------------------------------------------------------- keys


def test_a_missing_identity_file_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_key"
    result = detached(
        portfwd_argv(
            "ssh", "-F", "/dev/null", "-i", str(missing), "-L", f"{free_port()}:127.0.0.1:9", "u@127.0.0.1"
        )
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"portfwd: -i: {missing}: no such key file; give an existing private key"
    ]


def test_a_key_others_can_read_is_refused_like_openssh(tmp_path: Path) -> None:
    key = tmp_path / "open_key"
    keygen(key)
    key.chmod(0o644)
    result = detached(
        portfwd_argv(
            "ssh", "-F", "/dev/null", "-i", str(key), "-L", f"{free_port()}:127.0.0.1:9", "u@127.0.0.1"
        )
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"portfwd: -i: UNPROTECTED PRIVATE KEY FILE {key}: permissions 0644 are too open "
        f"(a private key must not be readable by group or others); chmod 600 {key}"
    ]


def test_a_passphrase_is_asked_once_on_the_terminal(sshd: Sshd, sink: Sink, tmp_path: Path) -> None:
    key = locked_key(sshd, tmp_path / "locked")
    local = free_port()
    argv = argv_with_key(sshd, key, "-o", "ServerAliveInterval=1", "-L", f"{local}:127.0.0.1:{sink.port}")
    terminal = OnTerminal(argv, clean_env())
    try:
        terminal.wait_for(f"Enter passphrase for key '{key}': ")
        terminal.type(PASSPHRASE)
        terminal.wait_for("connected to")
        assert PASSPHRASE not in terminal.text, "no echo"
        assert through(local)
        sshd.kill()  # the link drops and comes back: the key is not asked for again
        sshd.start()
        terminal.wait_for("connected to", count=2, timeout=30)
        assert through(local)
        assert terminal.text.count("Enter passphrase") == 1
    finally:
        assert terminal.stop() == 0, terminal.text


def test_a_wrong_passphrase_three_times_exits_1(sshd: Sshd, tmp_path: Path) -> None:
    key = locked_key(sshd, tmp_path / "locked")
    terminal = OnTerminal(argv_with_key(sshd, key, "-L", f"{free_port()}:127.0.0.1:9"), clean_env())
    try:
        for attempt in range(1, 4):
            terminal.wait_for("Enter passphrase", count=attempt)
            terminal.type("wrong")
        terminal.wait_for("wrong passphrase")
    finally:
        assert terminal.wait() == 1
    assert f"portfwd: -i: {key}: wrong passphrase (3 tries)" in terminal.text


def test_a_locked_key_without_a_terminal_or_in_batch_mode_is_one_line(sshd: Sshd, tmp_path: Path) -> None:
    key = locked_key(sshd, tmp_path / "locked")
    hint = f"add it to the agent first (ssh-add {key}) or run portfwd ssh on a terminal"
    no_tty = detached(argv_with_key(sshd, key, "-L", f"{free_port()}:127.0.0.1:9"))
    assert no_tty.returncode == 1
    assert no_tty.stderr.splitlines() == [
        f"portfwd: -i: {key}: the key needs a passphrase and there is no terminal to ask on; {hint}"
    ]
    # BatchMode=yes: not even a terminal is asked
    terminal = OnTerminal(
        argv_with_key(sshd, key, "-o", "BatchMode=yes", "-L", f"{free_port()}:127.0.0.1:9"), clean_env()
    )
    try:
        terminal.wait_for("BatchMode=yes forbids asking")
    finally:
        assert terminal.wait() == 1
    assert "Enter passphrase" not in terminal.text
    assert (
        f"portfwd: -i: {key}: the key needs a passphrase and BatchMode=yes forbids asking; {hint}"
        in terminal.text
    )
    assert "Accepted publickey" not in (sshd.proc.output() if sshd.proc else "")


def test_a_locked_key_the_agent_holds_needs_no_passphrase(sshd: Sshd, sink: Sink, tmp_path: Path) -> None:
    """The agent signs for a locked -i key, with IdentitiesOnly=yes too (as ssh: the agent's copy
    of that key, and only it, is offered; the agent also holds another key sshd accepts); and
    for a key named by its .pub alone (world-readable, as public keys are)."""
    key = locked_key(sshd, tmp_path / "locked")
    agent_socket = tmp_path / "agent.sock"
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho '{PASSPHRASE}'\n")
    askpass.chmod(0o700)
    env = clean_env(SSH_AUTH_SOCK=str(agent_socket))
    agent = Proc(["ssh-agent", "-D", "-a", str(agent_socket)], env=env)
    try:
        deadline = time.monotonic() + 10
        while not agent_socket.exists():
            assert time.monotonic() < deadline, agent.output()
            time.sleep(0.02)
        for added in (sshd.user_key, key):  # the other key first: offered first unless restricted
            subprocess.run(
                ["ssh-add", str(added)],
                env={**env, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"},
                check=True,
                timeout=30,
                capture_output=True,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        fingerprint = subprocess.run(
            ["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()[1]
        # the key file itself, then (a hardware key's, a password manager's way) only its .pub
        for named, only in (
            (key, "no"),
            (key, "yes"),
            (Path(f"{key}.pub"), "yes"),
            (Path(f"{key}.pub"), "no"),
        ):
            local = free_port()
            args = portfwd_argv(
                "ssh", "-F", "/dev/null", "-i", str(named), "-o", f"IdentitiesOnly={only}",
                "-o", f"UserKnownHostsFile={sshd.known_hosts}", "-p", str(sshd.port), "root@127.0.0.1",
                "-L", f"{local}:127.0.0.1:{sink.port}",
            )  # fmt: skip
            mark = len(sshd.proc.output()) if sshd.proc else 0
            proc = Proc(args, env=env, cwd=REPO)  # stdin is /dev/null; it has our terminal, if any
            try:
                proc.wait_for("connected to")
                assert through(local)
            finally:
                assert proc.stop() == 0
                proc.close()
            assert "passphrase" not in proc.output()
            accepted = [
                line
                for line in (sshd.proc.output() if sshd.proc else "")[mark:].splitlines()
                if "Accepted publickey" in line
            ]
            assert len(accepted) == 1, accepted
            # the agent's other key first unless restricted, or unless only the .pub is named
            # (named keys go first, as ssh orders them)
            assert (fingerprint in accepted[0]) == (only == "yes" or named.suffix == ".pub"), (named, only)
    finally:
        agent.stop()
        agent.close()


# ------------------------------------------------------------------------- the first connect


def test_first_connect_failures_end_it_with_one_line(tmp_path: Path) -> None:
    server = Sshd(tmp_path, ("Ciphers aes256-gcm@openssh.com",)).start()
    try:
        unknown = detached(
            portfwd_argv(
                "ssh",
                "-q",
                *server.ssh_args()[:-1],
                "root@nosuch.invalid",
                "-L",
                f"{free_port()}:127.0.0.1:9",
            )
        )
        ciphers = detached(
            portfwd_argv(
                "ssh",
                "-q",
                *server.ssh_args(),
                "-o",
                "Ciphers=aes128-ctr",
                "-L",
                f"{free_port()}:127.0.0.1:9",
            )
        )
    finally:
        server.kill()
    assert unknown.returncode == 1, unknown.stderr
    assert unknown.stderr.splitlines() == [
        "portfwd: root@nosuch.invalid: cannot resolve nosuch.invalid: Name or service not known"
    ]
    assert ciphers.returncode == 1, ciphers.stderr
    # sshd sends its KEXINIT and hangs up; the KEXINIT is read first (lean/kex.py), never
    # "Connection lost" and a retry.
    assert ciphers.stderr.splitlines() == [
        "portfwd: root@127.0.0.1: no algorithm in common with the server: No matching encryption algorithm "
        "found, sent aes128-ctr and received aes256-gcm@openssh.com"
    ]


def test_retry_first_connect_keeps_trying_what_would_end_it(tmp_path: Path) -> None:
    """--retry-first-connect (autossh's AUTOSSH_GATETIME=0): a first connect that fails for good
    is retried with backoff instead of ending portfwd ssh."""
    server = Sshd(tmp_path).start()
    try:
        argv = portfwd_argv(
            "ssh", "--retry-first-connect", *server.ssh_args()[:-1], "root@nosuch.invalid",
            "-L", f"{free_port()}:127.0.0.1:9",
        )  # fmt: skip
        with started(argv, ready="-L listening on") as proc:
            first = proc.wait_for("reconnecting in")
            proc.wait_for("reconnecting in", start=proc.mark())
            assert proc.stop() == 0
    finally:
        server.kill()
    assert "cannot resolve nosuch.invalid: Name or service not known; reconnecting in" in first


def _kexinit_then_hang_up(listener: socket.socket) -> None:
    """A server that answers the version line with its own, a KEXINIT naming one cipher nobody
    has, and its end of stream, in one write (then reads until the client goes: no RST)."""
    packet = _packet(_kexinit("curve25519-sha256", cipher="no-such-cipher"))
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        seen = b""
        while b"\n" not in seen and (chunk := conn.recv(256)):
            seen += chunk
        conn.sendall(b"SSH-2.0-OnlyNoSuchCipher\r\n" + packet)
        conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while conn.recv(4096):
                pass


def test_a_server_that_sends_its_kexinit_and_hangs_up_is_reported_by_what_it_said(tmp_path: Path) -> None:
    """The KEXINIT and the end of stream arrive together: the cipher mismatch is the one line,
    never "Connection lost" (asyncssh handles KEXINIT in a task; lean/kex.py waits for it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    known = tmp_path / "known_hosts"
    known.write_text("")
    fake = threading.Thread(target=_kexinit_then_hang_up, args=(listener,), daemon=True)
    fake.start()
    try:
        result = detached(
            portfwd_argv(
                "ssh", "-q", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={known}", "-p", str(port), "root@127.0.0.1",
                "-L", f"{free_port()}:127.0.0.1:9",
            )
        )  # fmt: skip
    finally:
        fake.join(15)
        listener.close()
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "portfwd: root@127.0.0.1: no algorithm in common with the server: No matching encryption algorithm "
        "found, sent chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-gcm@openssh.com,aes256-ctr,"
        "aes192-ctr,aes128-ctr and received no-such-cipher"
    ]


def test_a_config_tunnel_fails_at_first_unless_told_to_retry(sshd: Sshd, tmp_path: Path) -> None:
    keygen(tmp_path / "stranger")
    lines = {}
    for retry in ("false", "true"):
        config = tmp_path / f"retry-{retry}.toml"
        config.write_text(
            f'[control]\nsocket = "{tmp_path / retry}.sock"\n[[tunnel]]\nname = "lab"\n'
            f'ssh = "root@127.0.0.1:{sshd.port}"\nidentity = "{tmp_path / "stranger"}"\nagent = false\n'
            f'known_hosts = "{sshd.known_hosts}"\nssh_config = "/dev/null"\nreconnect_min = "300ms"\n'
            f'reconnect_max = "1s"\nretry_first_connect = {retry}\nlocal = ["127.0.0.1:{free_port()}:127.0.0.1:9"]\n'
        )
        with started(portfwd_argv("run", "-c", str(config)), ready=READY) as proc:
            lines[retry] = proc.wait_for("authentication failed")
            if retry == "true":
                proc.wait_for("authentication failed", start=proc.lines.index(lines[retry]) + 1)  # again
    assert lines["false"].endswith(
        "lab: authentication failed: Permission denied for user root on host 127.0.0.1; check -i KEY, the agent "
        "and the user; this tunnel stays down until reload (retry_first_connect = true retries it)"
    )
    assert "reconnecting in" in lines["true"]


# ------------------------------------------------------------------------------------- SIGHUP


def test_sighup_without_a_config_file_ends_portfwd_ssh(sshd: Sshd, sink: Sink) -> None:
    argv = portfwd_argv("ssh", *sshd.ssh_args(), "-L", f"{free_port()}:127.0.0.1:{sink.port}")
    with started(argv, ready="connected to") as proc:
        os.kill(proc.pid, signal.SIGHUP)
        proc.popen.wait(15)
        assert proc.popen.returncode == 0
        proc.wait_for("SIGHUP: no config file to reload; stopping")
        proc.wait_for("stopped")


def test_sighup_ends_portfwd_forward() -> None:
    with started(portfwd_argv("forward", f"127.0.0.1:{free_port()}:127.0.0.1:9"), ready=READY) as proc:
        os.kill(proc.pid, signal.SIGHUP)
        proc.popen.wait(15)
        assert proc.popen.returncode == 0


# ------------------------------------------------------------------------------- -R readiness


def restart(server: Sshd | Dropbear) -> None:
    """Kill the server and its sessions, wait until every one is gone (so none of their sockets
    takes a connection meant for the next), and start it again."""
    pids = descendants(server.proc.pid) if server.proc is not None else []
    server.kill()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    server.start()


def hammer(port: int, stop: threading.Event, accepted: list[bool]) -> None:
    """Connect to `port` again and again until `stop` (bounded): each connection the server
    accepts sends 100 bytes and must get the sink's sha256 back (True in `accepted`)."""
    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:  # not bound yet: refused, not lost
            continue
        reply = b""
        with client:
            try:
                client.sendall(b"x" * 100)
                client.shutdown(socket.SHUT_WR)
                while len(reply) < 64 and (chunk := client.recv(100)):  # the sink's sha256 hex
                    reply += chunk
            except OSError:
                pass
        accepted.append(len(reply) == 64)


def test_a_remote_forward_loses_no_connection_while_it_comes_up(sshd: Sshd, sink: Sink) -> None:
    """A burst of clients at the -R port while the link comes back: each one sshd accepts is served.

    The burst starts with sshd (before the -R port exists: those are refused, not lost) and
    stops before sshd is killed again, so no connection is cut by the kill itself.
    """
    remote = free_port()
    argv = portfwd_argv("ssh", *sshd.ssh_args(), "-R", f"127.0.0.1:{remote}:127.0.0.1:{sink.port}")
    accepted: list[bool] = []

    with started(argv, ready="-R listening on") as proc:
        for _ in range(3):  # three reconnects, each met by a burst
            mark = proc.mark()
            restart(sshd)
            stop = threading.Event()
            workers = [threading.Thread(target=hammer, args=(remote, stop, accepted)) for _ in range(4)]
            for worker in workers:
                worker.start()
            try:
                proc.wait_for("-R listening on", timeout=30, start=mark)
                served = len(accepted)
                deadline = time.monotonic() + 10
                while len(accepted) < served + 20 and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                stop.set()
                for worker in workers:
                    worker.join(30)
        log = [line for line in proc.output().splitlines() if "failed" in line or "refused" in line]
    assert len(accepted) > 60
    assert all(accepted), f"{accepted.count(False)} of {len(accepted)} accepted connections lost: {log}"


# -------------------------------------------------------------------------- refusal reasons


def test_a_refused_channel_is_logged_with_the_servers_reason(tmp_path: Path) -> None:
    server = Sshd(tmp_path, ("PermitOpen 127.0.0.1:1",)).start()
    local = free_port()
    try:
        with started(
            portfwd_argv("ssh", *server.ssh_args(), "-L", f"{local}:127.0.0.1:9"), ready="connected to"
        ) as proc:
            with socket.create_connection(("127.0.0.1", local), timeout=10) as client:
                assert client.recv(10) == b""  # closed: the server said no
            line = proc.wait_for("failed:")
    finally:
        server.kill()
    assert line.endswith("-> 127.0.0.1:9 failed: open failed (administratively prohibited); client closed"), (
        line
    )
    assert "ChannelOpenError" not in line


# ------------------------------------------------------------------------------- ssh_config


def lab_config(sshd: Sshd, path: Path, *lines: str) -> Path:
    """An ssh_config with a `lab` host for sshd, and `lines` under it."""
    body = [
        "Host lab",
        "  HostName 127.0.0.1",
        f"  Port {sshd.port}",
        "  User root",
        f"  IdentityFile {sshd.user_key}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {sshd.known_hosts}",
        *(f"  {line}" for line in lines),
    ]
    path.write_text("\n".join(body) + "\n")
    return path


def test_ssh_config_forwards_and_options_replace_autossh(sshd: Sshd, sink: Sink, tmp_path: Path) -> None:
    """`portfwd ssh -N -F FILE lab` does what `autossh -M0 -N lab` does with that ssh_config."""
    local, remote, dynamic = free_port(), free_port(), free_port()
    config = lab_config(
        sshd,
        tmp_path / "ssh_config",
        f"LocalForward {local} 127.0.0.1:{sink.port}",
        f"RemoteForward 127.0.0.1:{remote} 127.0.0.1:{sink.port}",
        f"DynamicForward 127.0.0.1:{dynamic}",
        "ServerAliveInterval 1m",  # OpenSSH's time format, read by portfwd and by asyncssh alike
        "ConnectTimeout 1m30s",
    )
    with started(portfwd_argv("ssh", "-N", "-F", str(config), "lab"), ready="-R listening on") as proc:
        assert through(local)
        assert through(remote)
        assert f"-D listening on 127.0.0.1:{dynamic}" in proc.output()


def test_ssh_config_exit_on_forward_failure(sshd: Sshd, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        config = lab_config(
            sshd,
            tmp_path / "ssh_config",
            f"LocalForward 127.0.0.1:{port} 127.0.0.1:9",
            "ExitOnForwardFailure yes",
        )
        result = detached(portfwd_argv("ssh", "-q", "-N", "-F", str(config), "lab"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"portfwd: lab: -L 127.0.0.1:{port} -> 127.0.0.1:9: cannot listen on 127.0.0.1:{port}: "
        "address already in use (ExitOnForwardFailure)"
    ]


# ------------------------------------------------------------------------------------ flags


def test_w_makes_portfwd_a_proxycommand_for_stock_ssh(sshd: Sshd, tmp_path: Path) -> None:
    proxy = " ".join(
        shlex.quote(item)
        for item in portfwd_argv(
            "ssh", *sshd.ssh_args()[:-3], "-p", str(sshd.port), "-W", "%h:%p", "root@127.0.0.1"
        )
    )
    result = subprocess.run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            f"ProxyCommand={proxy}",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-i",
            str(sshd.user_key),
            "-o",
            f"UserKnownHostsFile={sshd.known_hosts}",
            "-p",
            str(sshd.port),
            "root@127.0.0.1",
            "echo through-portfwd",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    assert (result.returncode, result.stdout) == (0, "through-portfwd\n"), result.stderr
    closed = detached(portfwd_argv("ssh", *sshd.ssh_args(), "-W", "127.0.0.1:1"))
    assert closed.returncode == 1
    assert closed.stderr.splitlines() == ["portfwd: root@127.0.0.1: -W 127.0.0.1:1: Connection refused"]
    log = tmp_path / "w.log"  # with -E, the line that ends it is in the file too (as ssh -E puts it)
    logged = detached(portfwd_argv("ssh", "-E", str(log), *sshd.ssh_args(), "-W", "127.0.0.1:1"))
    assert logged.returncode == 1
    assert (
        log.read_text().splitlines()[-1].endswith(" ERROR root@127.0.0.1: -W 127.0.0.1:1: Connection refused")
    )


def test_f_returns_once_the_forwards_are_up_and_e_logs_to_a_file(
    sshd: Sshd, sink: Sink, tmp_path: Path
) -> None:
    local, control, log = free_port(), tmp_path / "bg.sock", tmp_path / "bg.log"
    argv = portfwd_argv(
        "ssh",
        "-f",
        "-E",
        str(log),
        "--control",
        str(control),
        *sshd.ssh_args(),
        "-L",
        f"{local}:127.0.0.1:{sink.port}",
    )
    with (tmp_path / "stderr").open("w") as stderr:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            timeout=60,
            check=False,
            cwd=REPO,
        )
    snapshot = json.loads(run_portfwd("status", "--control", str(control), "--json").stdout)
    pid = int(snapshot["pid"])
    try:
        assert result.returncode == 0, (tmp_path / "stderr").read_text()
        assert snapshot["tunnels"][0]["state"] == "up", "up before the parent returned"
        assert through(local)
    finally:
        os.kill(pid, signal.SIGTERM)  # the background portfwd this test started, by its PID
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert (tmp_path / "stderr").read_text() == "", "-E: the log goes to the file"
    text = log.read_text()
    assert "connected to" in text
    assert "stopped" in text


def test_f_leaves_a_captured_output_and_goes_on_after_a_forward_that_failed(
    sshd: Sshd, sink: Sink, tmp_path: Path
) -> None:
    """As ssh -f: run with its output captured (`$(...)`, a pipe), portfwd returns once the
    tunnel is up and its forwards have settled; one that could not listen is said (and retried
    on) rather than holding the return; the background process keeps no pipe of its caller
    (stdin, stdout and, once the caller has it all, stderr on /dev/null)."""
    local, control = free_port(), tmp_path / "bg.sock"
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[1]
        argv = portfwd_argv(
            "ssh", "-f", "--control", str(control), *sshd.ssh_args(),
            "-L", f"{local}:127.0.0.1:{sink.port}", "-L", f"{taken}:127.0.0.1:{sink.port}",
        )  # fmt: skip
        began = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
        took = time.monotonic() - began
    snapshot = json.loads(run_portfwd("status", "--control", str(control), "--json").stdout)
    pid = int(snapshot["pid"])
    try:
        assert result.returncode == 0, result.stderr
        assert took < 10, "returned as soon as both forwards had settled, not after ConnectTimeout"
        assert f"cannot listen on 127.0.0.1:{taken}: address already in use" in result.stderr
        assert [item["state"] for item in snapshot["tunnels"][0]["forwards"]] == ["listening", "failed"]
        assert through(local)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.readlink(f"/proc/{pid}/fd/2") != os.devnull:
            time.sleep(0.02)  # the background process lets go of the caller's stderr (bounded)
        assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == [os.devnull] * 3
        with socket.create_server(("127.0.0.1", 0)) as busy:  # ExitOnForwardFailure: all or nothing
            strict = subprocess.run(
                portfwd_argv(
                    "ssh", "-q", "-f", "-o", "ExitOnForwardFailure=yes", *sshd.ssh_args(),
                    "-L", f"{busy.getsockname()[1]}:127.0.0.1:{sink.port}",
                ),
                capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
            )  # fmt: skip
        assert strict.returncode == 1, strict.stderr
        assert "address already in use" in strict.stderr
    finally:
        os.kill(pid, signal.SIGTERM)  # the background portfwd this test started, by its PID
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_l_localhost_listens_on_both_loopbacks_as_ssh_does(sshd: Sshd, sink: Sink) -> None:
    """`-L localhost:PORT:...` is ssh's default bind spelled out: 127.0.0.1 and ::1 both."""
    port = free_port()
    argv = portfwd_argv("ssh", *sshd.ssh_args(), "-L", f"localhost:{port}:127.0.0.1:{sink.port}")
    with started(argv, ready="connected to"):
        listening = subprocess.run(
            ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        assert f"127.0.0.1:{port}" in listening, listening
        assert f"[::1]:{port}" in listening, listening
        assert through(port)
        data = os.urandom(MiB)
        with socket.create_connection(("::1", port), timeout=60) as client:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := client.recv(4096):  # bounded: the sink answers once, then closes
                reply += chunk
        assert reply == hashlib.sha256(data).hexdigest().encode()


def test_known_hosts_file_tokens_are_expanded_as_ssh_does(sshd: Sshd, sink: Sink, tmp_path: Path) -> None:
    """`UserKnownHostsFile=.../%h-%p-%r` names the file of that host, port and user (strict
    checking: the connection is made only if the expanded file, holding the key, was read)."""
    (tmp_path / f"127.0.0.1-{sshd.port}-root").write_text(Path(sshd.known_hosts).read_text())
    port = free_port()
    args = [
        f"UserKnownHostsFile={tmp_path}/%h-%p-%r" if item.startswith("UserKnownHostsFile=") else item
        for item in sshd.ssh_args()
    ]
    argv = portfwd_argv(
        "ssh", *args, "-o", "StrictHostKeyChecking=yes", "-L", f"{port}:127.0.0.1:{sink.port}"
    )
    with started(argv, ready="connected to"):
        assert through(port)
    wrong = [item.replace("%r", "%x") for item in args]
    bad = run_portfwd("ssh", *wrong, "-L", f"{free_port()}:127.0.0.1:{sink.port}")
    assert bad.returncode == 2, bad.stderr
    assert "%x is not a token ssh expands here" in bad.stderr


def test_g_4_l_and_their_o_options(sshd: Sshd, sink: Sink) -> None:
    every, four = free_port(), free_port()
    args = [item for item in sshd.ssh_args() if item != "root@127.0.0.1"]
    argv = portfwd_argv(
        "ssh", "-g", "-4", "-l", "root", *args, "127.0.0.1", "-L", f"{every}:127.0.0.1:{sink.port}"
    )
    with started(argv, ready="connected to"):
        listening = subprocess.run(
            ["ss", "-Htln", f"sport = :{every}"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        assert f"0.0.0.0:{every}" in listening, listening
        assert through(every)
    argv = portfwd_argv("ssh", "-4", *sshd.ssh_args(), "-L", f"{four}:127.0.0.1:{sink.port}")
    with started(argv, ready="connected to"):
        listening = subprocess.run(
            ["ss", "-Htln", f"sport = :{four}"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        assert f"127.0.0.1:{four}" in listening
        assert f"[::1]:{four}" not in listening
    # the same from -o, as ssh takes them (and from ssh_config: tests/unit/test_sshargs.py)
    said = free_port()
    argv = portfwd_argv(
        "ssh",
        *sshd.ssh_args(),
        "-o",
        "GatewayPorts=yes",
        "-o",
        "AddressFamily=inet",
        "-L",
        f"{said}:127.0.0.1:{sink.port}",
    )
    with started(argv, ready="connected to"):
        listening = subprocess.run(
            ["ss", "-Htln", f"sport = :{said}"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        assert f"0.0.0.0:{said}" in listening, listening
        assert f"[::]:{said}" not in listening
        assert through(said)


def test_v_shows_the_ssh_conversation(sshd: Sshd, sink: Sink) -> None:
    argv = portfwd_argv("ssh", "-v", *sshd.ssh_args(), "-L", f"{free_port()}:127.0.0.1:{sink.port}")
    with started(argv, ready="connected to") as proc:
        proc.wait_for("Auth for user root succeeded")
    argv = portfwd_argv("ssh", "-vvv", *sshd.ssh_args(), "-L", f"{free_port()}:127.0.0.1:{sink.port}")
    with started(argv, ready="connected to") as proc:
        proc.wait_for("Key exchange algs:")


# ------------------------------------------------------------------------ dropbear as the server


class Dropbear:
    """A stock dropbear server on 127.0.0.1 that takes one user key for root (TESTBED §7).

    dropbear reads ~root/.ssh/authorized_keys; a private mount namespace binds a directory of
    ours over /root for it, so the machine's /root is never touched. Stopped by PID only.
    """

    def __init__(self, root: Path) -> None:
        need_root()
        self.dropbear = need_binary("dropbear", "dropbear-bin")
        need_binary("dropbearkey", "dropbear-bin")
        need_binary("unshare", "util-linux")
        self.root = root
        self.port = free_port()
        self.host_key = root / "dropbear_host"
        subprocess.run(
            ["dropbearkey", "-t", "ed25519", "-f", str(self.host_key)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        shown = subprocess.run(
            ["dropbearkey", "-y", "-f", str(self.host_key)],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        public = next(line for line in shown.splitlines() if line.startswith("ssh-")).split()
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {public[0]} {public[1]}\n")
        self.home = root / "root"
        (self.home / ".ssh").mkdir(mode=0o700, parents=True)
        self.home.chmod(0o700)
        self.user_key = root / "id_ed25519"
        self.authorized = self.home / ".ssh" / "authorized_keys"
        self.authorized.write_text(keygen(self.user_key) + "\n")
        self.authorized.chmod(0o600)
        self.proc: Proc | None = None

    def start(self) -> Dropbear:
        self.proc = Proc(
            [
                "unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount --bind "$1" /root && exec "$2" -F -E -s -p "127.0.0.1:{self.port}" -r "$3"',
                "dropbear", str(self.home), self.dropbear, str(self.host_key),
            ]
        )  # fmt: skip
        self.proc.wait_for("Not backgrounding")
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            assert self.proc.popen.poll() is None, self.proc.output()
            assert time.monotonic() < deadline, self.proc.output()
            time.sleep(0.02)

    def kill(self) -> None:
        """Stop dropbear and the sessions it forked, by PID (children first)."""
        if self.proc is None:
            return
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.stop(signal.SIGKILL)
        self.proc.close()
        self.proc = None

    def ssh_args(self) -> list[str]:
        return [
            "-F", "/dev/null", "-i", str(self.user_key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-p", str(self.port), "root@127.0.0.1",
        ]  # fmt: skip


@pytest.fixture
def dropbear(tmp_path: Path) -> Iterator[Dropbear]:
    server = Dropbear(tmp_path).start()
    yield server
    server.kill()


def test_dropbear_a_locked_key_on_the_terminal_and_a_remote_forward_that_loses_nothing(
    dropbear: Dropbear, sink: Sink, tmp_path: Path
) -> None:
    key = tmp_path / "locked"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-m", "PKCS8", "-N", PASSPHRASE, "-C", "locked", "-f", str(key)],
        check=True,
        timeout=30,
    )
    with dropbear.authorized.open("a") as keys:
        keys.write(Path(f"{key}.pub").read_text())
    remote = free_port()
    args = [str(key) if item == str(dropbear.user_key) else item for item in dropbear.ssh_args()]
    argv = portfwd_argv("ssh", *args, "-R", f"127.0.0.1:{remote}:127.0.0.1:{sink.port}")
    terminal = OnTerminal(argv, clean_env())
    accepted: list[bool] = []

    def read_terminal_while(busy: Callable[[], bool], timeout: float) -> None:
        """Keep reading the terminal while `busy` (bounded). portfwd logs each session there, and
        a pty holds only ~16 KiB: unread, portfwd's next log write blocks its event loop, every
        session in flight stalls, and the burst's clients time out as "lost"."""
        deadline = time.monotonic() + timeout
        while busy() and time.monotonic() < deadline:
            if not terminal._read(0.05):  # portfwd is gone: nothing more to read
                time.sleep(0.05)

    try:
        terminal.wait_for(f"Enter passphrase for key '{key}': ")
        terminal.type(PASSPHRASE)
        terminal.wait_for("-R listening on")
        for round_ in range(2, 4):  # two reconnects, each met by a burst
            restart(dropbear)
            stop = threading.Event()
            workers = [threading.Thread(target=hammer, args=(remote, stop, accepted)) for _ in range(4)]
            for worker in workers:
                worker.start()
            try:
                terminal.wait_for("-R listening on", count=round_, timeout=30)
                served = len(accepted)
                read_terminal_while(lambda: len(accepted) < served + 20, 10)  # noqa: B023 (called at once)
            finally:
                stop.set()
                read_terminal_while(lambda: any(worker.is_alive() for worker in workers), 30)  # noqa: B023
                for worker in workers:
                    worker.join(30)
        assert terminal.text.count("Enter passphrase") == 1
    finally:
        assert terminal.stop() == 0, terminal.text
    assert len(accepted) > 40
    assert all(accepted), f"{accepted.count(False)} of {len(accepted)} accepted connections lost"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
