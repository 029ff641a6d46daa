"""Low ports without running the app as root: bind as root then drop to `user`, or CAP_NET_BIND_SERVICE.

Each test runs in its own network namespace, so port 80 there is free and nothing on the host
is touched. Traffic stays on the namespace's loopback.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import need, need_binary
from tests.integration.netns import in_ns, namespace, wait_listening_in
from tests.integration.processes import REPO, portfwd_argv, started

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.netns]

NOBODY = "nobody"


def status_field(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def echo_through(ns: str, port: int) -> None:
    socat = need_binary("socat", "socat")
    data = os.urandom(256 * 1024)
    result = subprocess.run(
        in_ns(ns, socat, "-t", "5", "-", f"TCP:127.0.0.1:{port}"),
        input=data,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_root_binds_port_80_then_drops_to_user(tmp_path: Path) -> None:
    socat = need_binary("socat", "socat")
    nobody = pwd.getpwnam(NOBODY)
    config = tmp_path / "portfwd.toml"
    config.write_text(
        f'user = "{NOBODY}"\n[[forward]]\nname = "web"\nlisten = "127.0.0.1:80"\nconnect = "localhost:8000"\n'
    )
    with namespace("low") as ns:
        with started(in_ns(ns, socat, "TCP-LISTEN:8000,bind=127.0.0.1,reuseaddr,fork", "EXEC:cat")):
            wait_listening_in(ns, 8000)
            argv = in_ns(ns, *portfwd_argv("run", "-c", str(config)))
            with started(argv, ready="ready", cwd=REPO) as proc:
                assert proc.wait_for("dropped privileges").endswith(
                    f"dropped privileges to user {NOBODY} (uid {nobody.pw_uid}, gid {nobody.pw_gid})"
                )
                uids = status_field(proc.pid, "Uid").split()
                assert uids == [str(nobody.pw_uid)] * 4, "real, effective, saved and fs uid are all nobody's"
                assert status_field(proc.pid, "CapEff") == "0000000000000000"
                echo_through(ns, 80)
                assert proc.popen.poll() is None, proc.output()


def _debian_python_env() -> tuple[str, dict[str, str]]:
    """A Python that an unprivileged user can execute, seeing this checkout and its venv packages.

    The project's own interpreter may live under /root (mode 0700), which `nobody` cannot enter.
    """
    python = "/usr/bin/python3"
    need(os.access(python, os.X_OK), "needs /usr/bin/python3 (apt-get install python3)")
    site = sysconfig.get_paths()["purelib"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO / 'src'}:{site}", "HOME": "/nonexistent"}
    check = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={pwd.getpwnam(NOBODY).pw_gid}",
            "--clear-groups",
            python,
            "-c",
            "import portfwd.cli, uvloop, pydantic_core",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    need(
        check.returncode == 0,
        f"nobody must be able to read this checkout and venv: {check.stderr.strip()[-200:]}",
    )
    return python, env


def test_unprivileged_user_with_cap_net_bind_service() -> None:
    """The systemd AmbientCapabilities=CAP_NET_BIND_SERVICE way, done with setpriv."""
    socat = need_binary("socat", "socat")
    need_binary("setpriv", "util-linux")
    python, env = _debian_python_env()
    gid = str(pwd.getpwnam(NOBODY).pw_gid)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={gid}", "--clear-groups"]
    with namespace("cap") as ns:
        with started(in_ns(ns, socat, "TCP-LISTEN:8000,bind=127.0.0.1,reuseaddr,fork", "EXEC:cat")):
            wait_listening_in(ns, 8000)
            spec = "127.0.0.1:80:127.0.0.1:8000"
            without = subprocess.run(
                in_ns(ns, *as_nobody, python, "-m", "portfwd", "forward", spec),
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert without.returncode == 1
            assert without.stderr.splitlines()[-1] == (
                "portfwd: nothing could start: forward[0]: cannot listen on 127.0.0.1:80: permission denied; "
                "ports below 1024 need root (with user = ...) or CAP_NET_BIND_SERVICE; see README, Low ports"
            )
            with_cap = [*as_nobody, "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"]
            with started(
                in_ns(ns, *with_cap, python, "-m", "portfwd", "forward", spec), ready="ready", env=env
            ) as proc:
                assert status_field(proc.pid, "Uid").split()[0] == str(pwd.getpwnam(NOBODY).pw_uid)
                assert int(status_field(proc.pid, "CapEff"), 16) == 1 << 10, "only CAP_NET_BIND_SERVICE"
                echo_through(ns, 80)
