"""Starting and stopping real processes for tests: by PID only, with bounded readiness waits."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: The line portfwd prints when every listener is up ("already in use" must not match).
READY = " ready: "


class Proc:
    """A started process whose stderr (merged with stdout) we read line by line."""

    def __init__(
        self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        assert self.popen.stdout is not None
        os.set_blocking(self.popen.stdout.fileno(), False)
        self.lines: list[str] = []
        self._partial = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pump(self, timeout: float) -> bool:
        """Read what is available (waiting up to `timeout`); False at EOF."""
        assert self.popen.stdout is not None
        if self.popen.stdout.closed:
            return False
        with selectors.DefaultSelector() as selector:
            selector.register(self.popen.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                return True
        chunk = self.popen.stdout.read() or b""
        if not chunk:
            return self.popen.poll() is None
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        self.lines.extend(line.decode(errors="replace") for line in complete)
        return True

    def mark(self) -> int:
        """How many lines have been read so far; pass to wait_for(start=) to see only newer ones."""
        self._pump(0)
        return len(self.lines)

    def wait_for(self, needle: str, timeout: float = 15.0, start: int = 0) -> str:
        """Return the first output line (from line `start`) containing `needle`, within `timeout` s."""
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for line in self.lines[seen:]:
                if needle in line:
                    return line
            seen = len(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._pump(min(remaining, 0.5)):
                if self._partial and needle in self._partial.decode(errors="replace"):
                    return self._partial.decode(errors="replace")
                raise AssertionError(
                    f"{needle!r} not seen from {self.argv[:4]} (exit {self.popen.poll()}):\n"
                    + "\n".join(self.lines)
                )

    def output(self) -> str:
        """Everything printed so far (drains what is buffered)."""
        while self.popen.poll() is None and self._pump(0.05) and self._ready():
            pass
        self._pump(0.05)
        rest = self._partial.decode(errors="replace")
        return "\n".join(self.lines + ([rest] if rest else []))

    def _ready(self) -> bool:
        assert self.popen.stdout is not None
        if self.popen.stdout.closed:
            return False
        with selectors.DefaultSelector() as selector:
            selector.register(self.popen.stdout, selectors.EVENT_READ)
            return bool(selector.select(0))

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> int:
        """Signal our own process by PID, wait, then KILL after `grace`; returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        while self._pump(0.05):
            if self.popen.stdout is None or not self._ready():
                break
        return int(self.popen.returncode)

    def close(self) -> None:
        """Release our end of the output pipe."""
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def portfwd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "portfwd", *args]


@contextlib.contextmanager
def started(argv: Sequence[str], ready: str | None = None, **kwargs: object) -> Iterator[Proc]:
    """Start a process, optionally wait for a line, and always stop it by PID afterwards."""
    proc = Proc(argv, **kwargs)  # type: ignore[arg-type]
    try:
        if ready is not None:
            proc.wait_for(ready)
        yield proc
    finally:
        proc.stop()
        proc.close()


def wait_listening(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Bounded wait until a TCP port accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def run_portfwd(
    *args: str, timeout: float = 30.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short portfwd command and capture its output."""
    return subprocess.run(
        portfwd_argv(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, check=False
    )
