"""The PCP and NAT-PMP mappings portfwd made, kept in its state directory for `portfwd map list`.

Neither protocol can list a router's mappings, so portfwd writes down what it was granted
(`map add`, and `portfwd run` at every grant) and crosses it off when it removes it; `map list`
shows what is still leased. One line per mapping, fields separated by spaces (addresses, ports
and words never hold one), in a file locked while it is rewritten so that two processes do not
lose each other's lines. Plain `os` and `fcntl`: `portfwd map add` should not pay for json.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import NamedTuple

from portfwd.errors import RouterError
from portfwd.router.base import Granted
from portfwd.statedir import state_dir

#: The file's name in the state directory.
NAME = "mappings"
#: Lines kept at most: a bound on the file, whatever happens to it.
MAX_LINES = 1024


class Held(NamedTuple):
    """One mapping portfwd was granted by the router at `gateway`, until `expires` (wall clock)."""

    method: str
    gateway: str
    protocol: str
    internal_host: str
    internal_port: int
    external_host: str
    external_port: int
    expires: float

    def left(self, now: float) -> int:
        """Whole seconds of lease left (0 when over)."""
        return max(0, round(self.expires - now))

    @property
    def key(self) -> tuple[str, str, str, int]:
        """What identifies a mapping to its router: one per method, router, protocol and port."""
        return self.method, self.gateway, self.protocol, self.internal_port

    def line(self) -> str:
        return " ".join(map(str, (*self[:7], round(self.expires))))


def _parse(line: str) -> Held | None:
    fields = line.split()
    if len(fields) != 8:
        return None
    method, gateway, protocol, internal_host, internal_port, external_host, external_port, expires = fields
    try:
        return Held(
            method, gateway, protocol, internal_host, int(internal_port), external_host,
            int(external_port), float(expires),
        )  # fmt: skip
    except ValueError:
        return None


def _path() -> str:
    return os.path.join(state_dir(), NAME)


def _rewrite(
    change: str, drop: tuple[str, str, str, int], keep: Held | None = None, external: int | None = None
) -> None:
    """Under the file's lock: drop expired lines and the one `drop` names (with `external`,
    only if it has that external port), then add `keep`."""
    path = _path()
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+", encoding="ascii", errors="replace") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            now = time.time()
            rows = [row for line in f.read().splitlines() if (row := _parse(line)) is not None]
            rows = [
                row
                for row in rows
                if row.expires > now
                and not (row.key == drop and (external is None or row.external_port == external))
            ]
            if keep is not None:
                rows.append(keep)
            f.seek(0)
            f.truncate()
            f.write("".join(f"{row.line()}\n" for row in rows[-MAX_LINES:]))
    except OSError as exc:
        raise RouterError(
            f"cannot {change} in {path}: {exc.strerror}",
            reason="unsupported",
            hint="set PORTFWD_STATE_DIR to a writable directory",
        ) from exc


def record(gateway: str, granted: Granted) -> None:
    """Write down a PCP or NAT-PMP grant, replacing the last one for its port.

    Raises RouterError if the file cannot be written.
    """
    held = Held(
        granted.method, gateway, granted.protocol, granted.internal_host, granted.internal_port,
        granted.external_host, granted.external_port, time.time() + granted.lifetime,
    )  # fmt: skip
    _rewrite(f"record mapping {granted.public}/{granted.protocol}", held.key, held)


def forget(
    method: str, gateway: str, protocol: str, internal_port: int, external_port: int | None = None
) -> None:
    """Cross off the mapping of `internal_port` (with `external_port`: only the one to it);
    RouterError if the file cannot be written. No file: nothing was written down, none is made."""
    if not os.path.exists(_path()):
        return
    _rewrite(
        f"forget mapping {internal_port}/{protocol}",
        (method, gateway, protocol, internal_port),
        external=external_port,
    )


def held(gateway: str) -> list[Held]:
    """The mappings still leased from the router at `gateway`, oldest first (none if no file).

    Raises RouterError if the file is there but cannot be read.
    """
    path = _path()
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()[:MAX_LINES]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RouterError(
            f"cannot read portfwd's mappings in {path}: {exc.strerror}", reason="unsupported"
        ) from exc
    now = time.time()
    rows = [row for line in lines if (row := _parse(line)) is not None]
    return [row for row in rows if row.gateway == gateway and row.expires > now]
