"""Config files: `load` (read + validate); finding and reading them is portfwd.configfile's."""

from __future__ import annotations

from pathlib import Path

from portfwd.config.checks import validate
from portfwd.config.models import Config
from portfwd.configfile import MAX_CONFIG_BYTES, control_socket, find, parse, read
from portfwd.errors import ConfigError

__all__ = ["MAX_CONFIG_BYTES", "control_socket", "find", "load"]


def load(path: Path) -> Config:
    """Read and validate a TOML config file.

    Raises ConfigError for a missing/unreadable file, bad TOML or invalid values.
    """
    data = parse(path, read(path))
    try:
        return validate(data, str(path))
    except RecursionError as exc:
        raise ConfigError(f"{path}: a value is nested too deeply") from exc
