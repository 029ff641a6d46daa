"""Low ports without running the app as root: bind as root then drop to `user`, or CAP_NET_BIND_SERVICE.

Each test runs in its own network namespace, so port 80 there is free and nothing on the host
is touched. Traffic stays on the namespace's loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from portfwd.instances import name_for_config
from tests.conftest import need, need_binary
from tests.integration.netns import in_ns, namespace, wait_listening_in
from tests.integration.processes import READY, REPO, portfwd_argv, started

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
    shared = Path(tempfile.mkdtemp(prefix="pf-rootdir-"))  # root's: nobody cannot unlink in it
    shared.chmod(0o755)
    unix_listener = shared / "in.sock"
    config = tmp_path / "portfwd.toml"
    config.write_text(
        f'user = "{NOBODY}"\n[[forward]]\nname = "web"\nlisten = "127.0.0.1:80"\nconnect = "localhost:8000"\n'
        f'[[forward]]\nname = "sock"\nlisten = "unix:{unix_listener}"\nconnect = "127.0.0.1:8000"\n'
    )
    with namespace("low") as ns:
        with started(in_ns(ns, socat, "TCP-LISTEN:8000,bind=127.0.0.1,reuseaddr,fork", "EXEC:cat")):
            wait_listening_in(ns, 8000)
            argv = in_ns(ns, *portfwd_argv("run", "-c", str(config)))
            with started(argv, ready=READY, cwd=REPO) as proc:
                assert proc.wait_for("dropped privileges").endswith(
                    f"dropped privileges to user {NOBODY} (uid {nobody.pw_uid}, gid {nobody.pw_gid}); "
                    "no capabilities can come back; no_new_privs set"
                )
                uids = status_field(proc.pid, "Uid").split()
                assert uids == [str(nobody.pw_uid)] * 4, "real, effective, saved and fs uid are all nobody's"
                assert status_field(proc.pid, "CapEff") == "0000000000000000"
                assert status_field(proc.pid, "CapBnd") == "0000000000000000", "the bounding set is empty"
                assert status_field(proc.pid, "NoNewPrivs") == "1"
                control = Path(os.environ["PORTFWD_RUNTIME_DIR"]) / f"{name_for_config(config)}.sock"
                assert control.is_socket()
                echo_through(ns, 80)
                assert proc.popen.poll() is None, proc.output()
                assert unix_listener.stat().st_uid == nobody.pw_uid, "handed to the user before the drop"
                assert proc.stop() == 0
                assert not unix_listener.exists(), "removed at exit from a directory only root may write"
                assert not control.exists(), "and so is the control socket"
    shared.rmdir()


_PROBE = """
import sys, sysconfig, portfwd.cli.commands, portfwd.planner, portfwd.runtime, uvloop
roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
names = set()
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None) or ""
    for root in roots:
        if path.startswith(root + "/"):
            names.add(path[len(root) + 1 :].split("/")[0])
print("\\n".join(sorted(names)))
"""


@contextlib.contextmanager
def _readable_copy() -> Iterator[Path]:
    """portfwd and the packages it imports, copied where an unprivileged user can read them.

    The checkout and its venv may sit under a directory `nobody` cannot enter (/root is 0700).
    """
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, cwd=REPO
    )
    site = Path(sysconfig.get_paths()["purelib"])
    dest = Path(tempfile.mkdtemp(prefix="pf-nobody-"))
    try:
        dest.chmod(0o755)
        for name in probe.stdout.split():
            source = site / name
            if source.is_dir():
                shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif source.is_file():
                shutil.copy2(source, dest / name)
        shutil.copytree(
            REPO / "src" / "portfwd", dest / "portfwd", ignore=shutil.ignore_patterns("__pycache__")
        )
        for path in dest.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _debian_python_env(packages: Path) -> tuple[str, dict[str, str]]:
    """A Python that an unprivileged user can execute, seeing a readable copy of portfwd."""
    python = "/usr/bin/python3"
    need(os.access(python, os.X_OK), "needs /usr/bin/python3 (apt-get install python3)")
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(packages),
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    check = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={pwd.getpwnam(NOBODY).pw_gid}",
            "--clear-groups",
            python,
            "-c",
            "import portfwd.cli.commands, uvloop, pydantic_core",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    need(check.returncode == 0, f"nobody must be able to import portfwd: {check.stderr.strip()[-300:]}")
    return python, env


def test_unprivileged_user_with_cap_net_bind_service() -> None:
    """The systemd AmbientCapabilities=CAP_NET_BIND_SERVICE way, done with setpriv."""
    socat = need_binary("socat", "socat")
    need_binary("setpriv", "util-linux")
    gid = str(pwd.getpwnam(NOBODY).pw_gid)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={gid}", "--clear-groups"]
    with _readable_copy() as packages, namespace("cap") as ns:
        python, env = _debian_python_env(packages)
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
                in_ns(ns, *with_cap, python, "-m", "portfwd", "forward", spec), ready=READY, env=env
            ) as proc:
                assert status_field(proc.pid, "Uid").split()[0] == str(pwd.getpwnam(NOBODY).pw_uid)
                assert int(status_field(proc.pid, "CapEff"), 16) == 1 << 10, "only CAP_NET_BIND_SERVICE"
                echo_through(ns, 80)
