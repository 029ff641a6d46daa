"""Instance identity: which control socket an instance serves, and where the CLI finds it.

Every running portfwd has a name and a control socket of its own, so that any number of them
run side by side and `status`/`reload` reach the one meant:

- `run -c FILE` and `server -c FILE`: `<stem>-<8 hex digits of the resolved FILE path>`, so the
  same file always maps to the same socket and two files never share one;
- `forward` and `ssh`: `<kind>-<pid>`, unless `--name` is given;
- `--name NAME` on any of them: `NAME`; `--control PATH`, or `[control] socket` in the config,
  an explicit path.

The sockets live in one runtime directory (`$PORTFWD_RUNTIME_DIR`, else `/run/portfwd` for
root, `$XDG_RUNTIME_DIR/portfwd` or `/tmp/portfwd-UID` for others), which `portfwd status`
lists when it is given no config.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from portfwd.errors import ConfigError

Kind = Literal["run", "forward", "ssh", "server"]
SUFFIX = ".sock"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: A Unix socket path holds 107 bytes; the stem is cut so that the name always fits.
_STEM = 32


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a running instance is: its name, its control socket, what started it and from what."""

    name: str
    socket: Path
    kind: Kind
    config: Path | None = None


def runtime_dir() -> Path:
    """The directory where instances put their control sockets (see the module docstring)."""
    if explicit := os.environ.get("PORTFWD_RUNTIME_DIR"):
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/run/portfwd")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "portfwd"
    return Path(f"/tmp/portfwd-{os.geteuid()}")


def check_name(name: str, field: str = "--name") -> str:
    """`name` when it can name an instance (and its socket file). Raises ConfigError."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{name!r} cannot name an instance",
            field=field,
            hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def name_for_config(path: Path) -> str:
    """The instance name a config file gives: its stem and a digest of its resolved path."""
    resolved = path.resolve()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", resolved.stem).lstrip("._-")[:_STEM] or "portfwd"
    digest = hashlib.sha256(os.fsencode(resolved)).hexdigest()[:8]
    return f"{stem}-{digest}"


def socket_for(name: str) -> Path:
    """The control socket of the instance called `name`, in the runtime directory."""
    return runtime_dir() / f"{name}{SUFFIX}"


def identify(
    kind: Kind,
    *,
    config: Path | None = None,
    name: str | None = None,
    control: str | None = None,
    configured: str | None = None,
    pid: int | None = None,
) -> Identity:
    """Name and socket for an instance: `--control`, then `--name`, then the config's socket,
    then the config file's name, then `<kind>-<pid>`. Raises ConfigError for a bad name."""
    resolved = config.resolve() if config is not None else None
    if name is not None:
        check_name(name)
    if control:
        socket = Path(control)
        return Identity(name or socket.stem, socket, kind, resolved)
    if name is not None:
        return Identity(name, socket_for(name), kind, resolved)
    if resolved is not None:
        derived = name_for_config(resolved)
        socket = Path(configured) if configured else socket_for(derived)
        return Identity(derived, socket, kind, resolved)
    derived = f"{kind}-{os.getpid() if pid is None else pid}"
    return Identity(derived, socket_for(derived), kind, None)


def listed() -> list[Path]:
    """The control sockets in the runtime directory, by name (what `status` with no config shows)."""
    directory = runtime_dir()
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    return [entry for entry in entries if entry.name.endswith(SUFFIX) and entry.is_socket()]
