"""The HA engines as processes: short commands, what their exits mean, dying with portfwd, and
/proc reads that tell an engine of ours from a stranger (hasupervisor.py runs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import signal
from collections.abc import Callable
from pathlib import Path

from portfwd.kernel.nft import GatewayError
from portfwd.relay import libc

#: A short command (ip, conntrackd -s, keepalived --config-test).
COMMAND_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1


def one_line(text: str, lines: int = 2) -> str:
    """The last non-empty lines of some output, joined into one line for an error message."""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(kept[-lines:])


def tail(path: Path, lines: int = 1) -> str:
    """The last non-empty lines of a log, for an error message."""
    try:
        return one_line(path.read_text(errors="replace"), lines)
    except OSError:
        return ""


def reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn that has the child get SIGTERM when portfwd dies, however it dies.

    prctl is looked up before the fork; the child only calls it. A portfwd that died between
    the fork and the prctl would never send the signal, so the child checks it still has its
    parent and gives up otherwise.
    """
    prctl = libc.function(
        "prctl", (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    )
    parent = os.getpid()

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def cmdline(pid: int) -> list[str] | None:
    """The argv of `pid` from /proc (empty for a zombie), or None when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]]


def exited(pidfd: int) -> bool:
    """Whether the process behind a pidfd has ended (a pidfd turns readable then)."""
    return bool(select.select([pidfd], [], [], 0)[0])


async def run_short(*argv: str) -> tuple[int, str]:
    """Run a short command; (exit code, stdout+stderr). Raises GatewayError if it cannot run."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise GatewayError(f"gateway.ha: cannot run {argv[0]}: {reason(exc)}") from exc
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except TimeoutError as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise GatewayError(
            f"gateway.ha: {' '.join(argv[:3])} did not finish in {COMMAND_TIMEOUT:g}s"
        ) from exc
    return int(proc.returncode or 0), out.decode(errors="replace")
