"""The HA engines as processes: short commands, what their exits mean, dying with portfwd, and
/proc reads that tell an engine of ours from a stranger (hasupervisor.py runs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
from pathlib import Path

from portfwd.kernel.nft import GatewayError

#: A short command (ip, conntrackd -s, keepalived --config-test).
COMMAND_TIMEOUT = 10.0


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


def die_with_parent(argv: list[str]) -> list[str]:
    """`argv` run so that the child gets SIGTERM when portfwd dies, however it dies: through
    util-linux's `setpriv --pdeathsig TERM`, which sets PR_SET_PDEATHSIG and then executes the
    engine in its place (same PID, the engine's own command line). Not a `preexec_fn` calling
    prctl: Python code between fork and exec is unsafe in a process with threads (the log
    writer is one), and runs every at-fork hook in a child about to be replaced. A portfwd that
    died between the fork and the prctl leaves its engine behind; the next start takes it over.
    Without setpriv (util-linux is Essential on Debian) the engine starts as it is."""
    setpriv = shutil.which("setpriv") or next(
        (path for path in ("/usr/bin/setpriv", "/bin/setpriv") if os.access(path, os.X_OK)), None
    )
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


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
