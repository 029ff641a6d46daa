"""The service files: sd_notify from a real `portfwd run`, the systemd units (verify, exposure
score, MemoryDenyWriteExecute), the sysusers file, the man page and the shell completions.

No systemd runs as PID 1 here, so the units are checked by `systemd-analyze` offline and the
readiness protocol by a real datagram socket standing for systemd's $NOTIFY_SOCKET.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need, need_binary
from tests.integration.peers import free_port
from tests.integration.processes import REPO, Proc, portfwd_argv, run_portfwd, started

pytestmark = pytest.mark.integration
CONTRIB = REPO / "contrib"
UNITS = ("portfwd.service", "portfwd@.service")
COMMANDS = ["check", "forward", "gateway", "map", "reload", "run", "server", "ssh", "status"]


# ---------------------------------------------------------------------------- sd_notify
class Manager:
    """A datagram socket in systemd's place: what `portfwd run` tells $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.listener.bind(str(path))

    def receive(self, proc: Proc, timeout: float = 30.0) -> dict[str, str]:
        """The next message as KEY=VALUE fields; fails if portfwd exits or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.listener], [], [], 0.2)
            if readable:
                lines = self.listener.recv(4096).decode().split("\n")
                return dict(line.split("=", 1) for line in lines)
            assert proc.popen.poll() is None, f"portfwd exited {proc.popen.returncode}:\n{proc.output()}"
        raise AssertionError(f"no notify message within {timeout}s:\n{proc.output()}")

    def close(self) -> None:
        self.listener.close()


@contextlib.contextmanager
def echo_upstream() -> Iterator[int]:
    """A TCP server on loopback that echoes each client until its EOF; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def write_config(path: Path, control: Path, rules: dict[str, tuple[int, int]]) -> None:
    text = f'[control]\nsocket = "{control}"\n'
    for name, (listen, target) in rules.items():
        text += (
            f'[[forward]]\nname = "{name}"\nlisten = "127.0.0.1:{listen}"\nconnect = "127.0.0.1:{target}"\n'
        )
    path.write_text(text)


def echoes(port: int) -> bytes:
    """Connect once (no retry: the port must accept now), send, half-close, read the echo."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"ping")
        client.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := client.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_ready_once_every_listener_accepts_then_reload_and_stop_are_told(tmp_path: Path) -> None:
    port, control, config = free_port(), tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    manager = Manager(tmp_path / "notify")
    with echo_upstream() as upstream:
        write_config(config, control, {"web": (port, upstream)})
        env = {**os.environ, "NOTIFY_SOCKET": str(manager.path)}
        proc = Proc(portfwd_argv("run", "-c", str(config)), env=env)
        try:
            ready = manager.receive(proc)  # the first message portfwd sends is READY=1
            assert ready == {"READY": "1", "STATUS": "1 rule(s), 1 listening socket(s), 0 tunnel(s)"}
            assert echoes(port) == b"ping"  # READY=1 means accepting: connected at the first try

            # SIGHUP: RELOADING=1 stamped with the monotonic clock, then READY=1 again
            before = monotonic_usec()
            os.kill(proc.pid, signal.SIGHUP)
            reloading = manager.receive(proc)
            assert reloading["RELOADING"] == "1"
            assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
            assert manager.receive(proc)["READY"] == "1"

            # a config the instance refuses: reloading, then ready again on the old config
            config.write_text(config.read_text() + "bogus = true\n")
            os.kill(proc.pid, signal.SIGHUP)
            assert manager.receive(proc)["RELOADING"] == "1"
            assert manager.receive(proc) == ready
            proc.wait_for("reload refused")  # log lines are written by a thread, a moment later

            # ExecReload=portfwd reload: a rule that cannot start makes it exit non-zero (so
            # `systemctl reload` fails and says why), and systemd hears READY=1 all the same
            with socket.create_server(("127.0.0.1", 0)) as squatter:
                busy = squatter.getsockname()[1]
                write_config(config, control, {"web": (port, upstream), "busy": (busy, upstream)})
                reload = run_portfwd("reload", "-c", str(config))
            assert reload.returncode == 1, reload.stderr
            assert reload.stderr.startswith("portfwd: reloaded, but "), reload.stderr
            assert manager.receive(proc)["RELOADING"] == "1"
            assert manager.receive(proc) == {
                "READY": "1",
                "STATUS": "1 rule(s), 1 listening socket(s), 0 tunnel(s)",
            }
            assert echoes(port) == b"ping"

            os.kill(proc.pid, signal.SIGTERM)
            assert manager.receive(proc)["STOPPING"] == "1"
            assert proc.popen.wait(30) == 0
        finally:
            proc.stop()
            proc.close()
            manager.close()


# ---------------------------------------------------------------------------- the units
def shim(tmp_path: Path) -> Path:
    """A `portfwd` executable that runs this checkout's, in a directory of its own."""
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    executable = directory / "portfwd"
    executable.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m portfwd "$@"\n')
    executable.chmod(0o755)
    return executable


def local_copy(unit: str, tmp_path: Path) -> Path:
    """The unit with /usr/local/bin/portfwd pointing at this checkout (verify checks it exists);
    a template is given an instance name, as systemd would instantiate it."""
    text = (CONTRIB / unit).read_text().replace("/usr/local/bin/portfwd", str(shim(tmp_path)))
    copy = tmp_path / "units" / unit.replace("@.", "@edge.")
    copy.parent.mkdir(exist_ok=True)
    copy.write_text(text)
    return copy


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    analyze = need_binary("systemd-analyze", "systemd")
    copy = local_copy(unit, tmp_path)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    said = [line for line in (result.stdout + result.stderr).splitlines() if "portfwd" in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert not said, "\n".join(said)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_is_ok_or_better(unit: str, tmp_path: Path) -> None:
    """`systemd-analyze security` rates OK (exposure below 5.0) or better; 49 is that in tenths."""
    analyze = need_binary("systemd-analyze", "systemd")
    copy = local_copy(unit, tmp_path)
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=49", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    exposure, rating = float(found[1]), found[2]
    assert rating in ("OK", "SAFE", "PERFECT"), result.stdout
    assert exposure < 5.0
    assert result.returncode == 0, result.stderr


def unit_lines(unit: str) -> list[str]:
    return [line for line in (CONTRIB / unit).read_text().splitlines() if line and not line.startswith("#")]


def test_template_is_the_unit_but_for_its_config_and_runtime_directory() -> None:
    single = [
        line.replace("/etc/portfwd/portfwd.toml", "/etc/portfwd/%i.toml") for line in unit_lines(UNITS[0])
    ]
    template = unit_lines(UNITS[1])
    assert [line for line in single if line not in template] == [
        "Description=portfwd port forwarder",
        "RuntimeDirectoryPreserve=restart",
    ]
    assert [line for line in template if line not in single] == [
        "Description=portfwd port forwarder (/etc/portfwd/%i.toml)",
        "RuntimeDirectoryPreserve=yes",
    ]


def test_unit_runs_the_commands_a_service_needs() -> None:
    lines = unit_lines(UNITS[0])
    config = "-c /etc/portfwd/portfwd.toml"
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStartPre=/usr/local/bin/portfwd check {config}",
        f"ExecStart=/usr/local/bin/portfwd run {config}",
        f"ExecReload=/usr/local/bin/portfwd reload {config}",
        "RuntimeDirectory=portfwd",
        "StateDirectory=portfwd",
        "Environment=PORTFWD_RUNTIME_DIR=/run/portfwd",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "MemoryDenyWriteExecute=yes",
    ):
        assert line in lines


def test_sysusers_makes_the_units_user(tmp_path: Path) -> None:
    sysusers = need_binary("systemd-sysusers", "systemd")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = subprocess.run(
        [sysusers, f"--root={root}", str(CONTRIB / "portfwd.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    entry = next(
        line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("portfwd:")
    )
    _, _, uid, gid, _, home, shell = entry.split(":")
    assert int(uid) < 1000  # a system user...
    assert gid == uid  # ...with its own group
    assert (home, shell) == ("/var/lib/portfwd", "/usr/sbin/nologin")  # the unit's StateDirectory=
    assert "portfwd:" in (root / "etc/group").read_text()


# ---------------------------------------------------------------------------- MemoryDenyWriteExecute
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

#: Run under MDWE: portfwd's ctypes paths (libc, libcrypto, libsodium) against asyncssh's bytes.
CIPHERS = """
from asyncssh.encryption import get_encryption
from portfwd.ssh.lean.packets import _faster
for alg, keylen, ivlen in ((b"chacha20-poly1305@openssh.com", 64, 0), (b"aes128-gcm@openssh.com", 16, 12)):
    body = bytes([4]) + b"x" * 27 + bytes(4)
    header = len(body).to_bytes(4, "big")
    theirs = get_encryption(alg, bytes(range(keylen)), bytes(ivlen), b"", b"", False)
    ours = _faster(get_encryption(alg, bytes(range(keylen)), bytes(ivlen), b"", b"", False))
    assert type(ours).__module__ == "portfwd.ssh.lean.aead", type(ours)
    assert ours.encrypt_packet(7, header, body)[0] == b"".join(theirs.encrypt_packet(7, header, body))
print("ciphers ok")
"""


def mdwe_argv(*argv: str) -> list[str]:
    """`argv` run under PR_SET_MDWE, which execve keeps: the kernel's own MemoryDenyWriteExecute."""
    launcher = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
        "    sys.exit(f'prctl(PR_SET_MDWE): {os.strerror(ctypes.get_errno())}')\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    return [sys.executable, "-c", launcher, *argv]


def mdwe_supported() -> bool:
    probe = subprocess.run(mdwe_argv("/bin/true"), capture_output=True, text=True, timeout=30, check=False)
    return probe.returncode == 0


def test_portfwd_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: CPython, uvloop, splice and the ctypes ciphers
    must never need memory that is writable and executable."""
    need(mdwe_supported(), "needs prctl(PR_SET_MDWE) (Linux 6.3 or newer)")
    # the kernel refuses a write-and-execute mapping from then on: the check is real
    refused = subprocess.run(
        mdwe_argv(
            sys.executable,
            "-c",
            "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)",
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "PermissionError" in refused.stderr, refused.stderr
    ciphers = subprocess.run(
        mdwe_argv(sys.executable, "-c", CIPHERS), capture_output=True, text=True, timeout=60, check=False
    )
    assert ciphers.stdout == "ciphers ok\n", ciphers.stderr
    port = free_port()
    with echo_upstream() as upstream:
        argv = mdwe_argv(*portfwd_argv("forward", f"127.0.0.1:{port}:127.0.0.1:{upstream}"))
        with started(argv, ready=" ready: "):
            assert echoes(port) == b"ping"


def test_portfwd_makes_no_ctypes_callbacks() -> None:
    """A ctypes callback is a libffi closure: code written at run time, which MDWE may refuse.
    portfwd only calls into C (relay/libc.py, relay/mmsg.py, ssh/lean/aead.py), so none exists."""
    sources = {path: path.read_text() for path in (REPO / "src/portfwd").rglob("*.py")}
    assert [path for path, text in sources.items() if "FUNCTYPE" in text] == []


# ---------------------------------------------------------------------------- man page, completion
def generate(out: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/manpage"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


GENERATED = [
    "man/portfwd.1",
    "contrib/completion/portfwd.bash",
    "contrib/completion/_portfwd",
    "contrib/completion/portfwd.fish",
]


def test_man_page_and_completions_are_current(tmp_path: Path) -> None:
    """The files in the repository are what scripts/manpage makes from today's CLI."""
    generate(tmp_path)
    stale = [name for name in GENERATED if (tmp_path / name).read_text() != (REPO / name).read_text()]
    assert not stale, f"run scripts/manpage: {stale} differ from the CLI's help"


def test_man_page_renders_without_warnings_and_names_every_option() -> None:
    groff = need_binary("groff", "groff-base")
    page = REPO / "man/portfwd.1"
    result = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-rLL=100n", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    assert result.returncode == 0
    assert result.stderr == ""
    text = re.sub(r".\x08", "", result.stdout)  # overstrike bold and underline
    for command in COMMANDS:
        assert f"portfwd {command} " in text or f"portfwd {command}\n" in text, command
    for words in (
        "portfwd map add",
        "-c, --config FILE",
        "--no-ssh-fast-path",
        "NOTIFY_SOCKET",
        "EXIT STATUS",
    ):
        assert words in text, words


def bash_complete(script: Path, words: list[str], env: dict[str, str], prelude: str = "") -> list[str]:
    """What `words` + TAB offers in bash with `script` sourced (COMPREPLY, one per line)."""
    line = " ".join(shlex.quote(word) for word in words)
    program = (
        f"{prelude}\nsource {shlex.quote(str(script))}\n"
        f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
        '_portfwd_completion portfwd "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return [word for word in result.stdout.splitlines() if word]


def path_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{shim(tmp_path).parent}:{os.environ['PATH']}"}


def test_bash_completion_lists_commands_subcommands_and_options(tmp_path: Path) -> None:
    need_binary("bash", "bash")
    script, env = REPO / "contrib/completion/portfwd.bash", path_env(tmp_path)
    assert bash_complete(script, ["portfwd", ""], env) == COMMANDS
    assert bash_complete(script, ["portfwd", "re"], env) == ["reload"]
    assert bash_complete(script, ["portfwd", "map", ""], env) == ["add", "ip", "list", "remove"]
    assert bash_complete(script, ["portfwd", "run", "--con"], env) == ["--config", "--control"]
    assert bash_complete(script, ["portfwd", "run", "--log-format", ""], env) == ["text", "json"]


def test_bash_completion_installed_is_found_by_bash_completion(tmp_path: Path) -> None:
    """Installed as bash-completion expects (share/bash-completion/completions/portfwd), it
    loads when portfwd is first completed, with nothing in ~/.bashrc."""
    loader = Path("/usr/share/bash-completion/bash_completion")
    need(loader.is_file(), "needs bash-completion (apt-get install bash-completion)")
    share = tmp_path / "share"
    installed = share / "bash-completion/completions/portfwd"
    installed.parent.mkdir(parents=True)
    shutil.copy(REPO / "contrib/completion/portfwd.bash", installed)
    env = {
        **path_env(tmp_path),
        "XDG_DATA_DIRS": str(share),
        "BASH_COMPLETION_USER_DIR": str(tmp_path / "none"),
    }
    program = f"source {shlex.quote(str(loader))}\n__load_completion portfwd || exit 3\ncomplete -p portfwd\n"
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "complete -o nosort -F _portfwd_completion portfwd"
    assert bash_complete(installed, ["portfwd", "st"], env, prelude=f"source {shlex.quote(str(loader))}") == [
        "status"
    ]


def test_zsh_completion_parses() -> None:
    zsh = need_binary("zsh", "zsh")
    result = subprocess.run(
        [zsh, "--no-rcs", "-n", str(REPO / "contrib/completion/_portfwd")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
