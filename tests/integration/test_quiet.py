"""No dependency's warning reaches a user's terminal: stderr of each entry point compared whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from portfwd import __version__
from tests.integration.peers import free_port
from tests.integration.processes import REPO, portfwd_argv, run_portfwd, wait_listening
from tests.integration.sshd import Sshd

pytestmark = pytest.mark.integration


def user_env() -> dict[str, str]:
    """The environment a user's shell gives: no warning options of the test run's."""
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    env.pop("PYTHONDEVMODE", None)
    return env


def run_quiet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        portfwd_argv(*args), capture_output=True, text=True, timeout=60, cwd=REPO, env=user_env(), check=False
    )


def serve_then_stop(argv: list[str], wait: Callable[[], None]) -> tuple[int, str, str]:
    """Start a long-running command, wait until `wait()` says it serves, TERM it; (code, out, err)."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=user_env(),
        cwd=REPO,
    )
    try:
        wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    return proc.returncode, out.decode(), err.decode()


def test_version_and_check_print_nothing_on_stderr() -> None:
    version = run_quiet("--version")
    assert (version.returncode, version.stdout, version.stderr) == (0, f"portfwd {__version__}\n", "")
    check = run_quiet("check", "-c", str(REPO / "portfwd.toml"))
    assert (check.returncode, check.stderr) == (0, "")
    assert check.stdout.endswith("config OK\n")


def test_forward_prints_nothing_with_q() -> None:
    port = free_port()
    code, out, err = serve_then_stop(
        portfwd_argv("forward", "-q", f"127.0.0.1:{port}:127.0.0.1:9"), lambda: wait_listening(port)
    )
    assert (code, out, err) == (0, "", "")


def test_ssh_prints_nothing_with_q(tmp_path: Path) -> None:
    server = Sshd(tmp_path).start()
    try:
        local = free_port()

        def up() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                answer = run_portfwd("status", "--json", "--name", "quiet")
                if answer.returncode == 0 and json.loads(answer.stdout)["tunnels"][0]["state"] == "up":
                    return
                time.sleep(0.05)
            raise AssertionError("the tunnel never came up")

        argv = portfwd_argv(
            "ssh", "-q", "--name", "quiet", *server.ssh_args(), "-N", "-L", f"{local}:127.0.0.1:9"
        )
        code, out, err = serve_then_stop(argv, up)
    finally:
        server.kill()
    assert (code, out, err) == (0, "", "")
