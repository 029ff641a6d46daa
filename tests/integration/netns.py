"""Throwaway network namespaces for tests: unique names, loopback up, always deleted."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator

from tests.conftest import need, need_root


@contextlib.contextmanager
def namespace(role: str = "t") -> Iterator[str]:
    """Create `pft-<uuid8>-<role>` with lo up; delete it afterwards, also when the test fails.

    Processes started inside must be stopped (by PID) before the `with` ends.
    """
    need_root()
    need(shutil.which("ip") is not None, "needs ip (apt-get install iproute2)")
    name = f"pft-{uuid.uuid4().hex[:8]}-{role}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def in_ns(name: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


def wait_listening_in(name: str, port: int, timeout: float = 10.0) -> None:
    """Bounded wait until `ss` in the namespace shows a TCP listener on `port`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["ip", "netns", "exec", name, "ss", "-Htln", f"sport = :{port}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} in {name}")
