"""Where the config file is and reading it as TOML, without validating it (no pydantic).

Apart from `portfwd.config` so that `portfwd status -c FILE` finds the instance's control
socket without importing the config models: that import is most of a status call's start-up
(0.7 of 1.3 s on a slow machine). `portfwd.config` re-exports these.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from portfwd.errors import ConfigError

#: A config file larger than this is refused: configs are a few KiB, and -c /dev/zero must end.
MAX_CONFIG_BYTES = 1 << 20


def read(path: Path) -> bytes:
    """The bytes of a regular config file of at most MAX_CONFIG_BYTES. Raises ConfigError.

    Opened without blocking and checked before reading, so that `-c` on a FIFO, a device or
    a directory is refused at once instead of waiting or reading forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file", hint="pass -c FILE or create portfwd.toml") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: not a regular file", hint="pass -c with a TOML file")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{path}: config is larger than {MAX_CONFIG_BYTES >> 20} MiB")
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def parse(path: Path, raw: bytes) -> dict[str, Any]:
    """TOML text to a table. Raises ConfigError (never RecursionError) for what is not a config."""
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from exc


def control_socket(path: Path) -> str | None:
    """Just `[control] socket` from a config file, or None, without validating the rest.

    Lets `portfwd status` see a running instance while the file on disk is being edited (its
    values may be wrong for a moment). Raises ConfigError when the file is missing or not TOML.
    """
    data = parse(path, read(path))
    section = data.get("control")
    value = section.get("socket") if isinstance(section, dict) else None
    return value if isinstance(value, str) and value else None


def find(explicit: str | None) -> Path:
    """Choose the config file: -c, then $PORTFWD_CONFIG, ./portfwd.toml, ~/.config, /etc.

    Raises ConfigError naming every place it looked when none exists.
    """
    if explicit:
        return Path(explicit)
    if env := os.environ.get("PORTFWD_CONFIG"):
        return Path(env)
    candidates = [
        Path("portfwd.toml"),
        Path.home() / ".config" / "portfwd" / "portfwd.toml",
        Path("/etc/portfwd/portfwd.toml"),
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "no config file found (looked in ./portfwd.toml, ~/.config/portfwd/portfwd.toml, "
        "/etc/portfwd/portfwd.toml)",
        hint="pass -c FILE or set PORTFWD_CONFIG",
    )
